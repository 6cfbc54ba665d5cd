"""The command line: `negkernels check` and `negkernels bench` run on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

from negkernels.__main__ import main


def test_check_passes(capsys):
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "0 failed" in out and "group_advantages" in out


def test_bench_writes_table_and_json(tmp_path, capsys):
    assert main(["bench", "--case", "advantages/ragged", "--impl", "eager", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "advantages/ragged" in out and "wall ms" in out
    payload = json.loads((tmp_path / "bench.json").read_text())
    (row,) = payload["rows"]
    assert row["impl"] == "eager" and row["ms"] > 0 and row["error"] is None
    assert payload["roofline"]["copy_GBps"] > 0


def test_sanitizer_driver_runs_every_kernel_call():
    # benchmarks/sanitize.py is what compute-sanitizer watches on a GPU; on the CPU it runs the
    # same calls through the Triton interpreter.
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "sanitize.py"), "--device=cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for op in (
        "group_advantages/triton",
        "token_logprobs/triton",
        "policy_loss/triton",
        "policy_loss_from_logits/triton",
        "bank_info_nce/triton",
        "bank_topk/triton",
    ):
        assert op in proc.stdout


def test_bench_on_a_cpu_says_it_is_a_smoke_test(tmp_path, capsys):
    assert main(["bench", "--case", "advantages/uniform-g64", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "SMOKE TEST" in out and "not measured here" in out and "advantages/uniform-g64 · triton" in out
    payload = json.loads((tmp_path / "bench.json").read_text())
    assert payload["smoke_test"] is True
    assert all(r["pct_roofline"] is None and r["device_ms"] is None and r["wall_ms"] > 0 for r in payload["rows"])


def test_bench_host_times_every_op_with_launches_stubbed(tmp_path, capsys):
    assert main(["bench", "--host", "--reps", "20", "--out", str(tmp_path)]) == 0
    assert "host overhead per call" in capsys.readouterr().out
    result = json.loads((tmp_path / "host.json").read_text())
    ops = {r["op"] for r in result["rows"]}
    assert {"policy_loss fwd+bwd", "bank_info_nce fwd+bwd", "group_discriminative_loss fwd+bwd", "evict"} <= {
        o.split(",")[0] for o in ops
    }
    assert result["baseline_us"] > 0 and all(r["us"] > 0 and r["ratio"] > 0 for r in result["rows"])


def test_stubbed_launches_run_no_kernel_and_restore_triton():
    import torch
    import triton.runtime.jit as jit

    import negkernels as nk
    from negkernels.host_overhead import stubbed_launches

    from .helpers import poisoned_allocations

    original = jit.JITFunction.__getitem__
    before = os.environ.get("TRITON_INTERPRET")
    rewards = torch.randn(64)
    with stubbed_launches(), poisoned_allocations():
        adv = nk.group_advantages(rewards, group_size=8, backend="triton")
    assert adv.isnan().all()  # the kernel never wrote its output
    assert jit.JITFunction.__getitem__ is original and os.environ.get("TRITON_INTERPRET") == before
