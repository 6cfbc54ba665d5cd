"""The command line: `negkernels check` and `negkernels bench` run on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

from negkernels.__main__ import main


def test_check_passes(capsys):
    # conftest sets TRITON_INTERPRET=1 on a CPU: the Triton rows run in the interpreter.
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "0 failed" in out and "group_advantages" in out
    assert "the Triton kernels run in the interpreter" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("op "))
    rows = lines[header : lines.index(next(line for line in lines if " passed, " in line))]
    # one column layout for every row: each field starts where its header does
    starts = [lines[header].index(name) for name in ("config", "backend", "result", "max rel err")]
    for row in rows[1:]:
        assert all(row[s - 2 : s] == "  " and row[s] != " " for s in starts), row
    assert any(" triton " in row for row in rows) and any(" reference " in row for row in rows)


def test_check_says_why_rows_are_missing(monkeypatch):
    import torch

    from negkernels import _cuda_ext, check

    monkeypatch.delenv("TRITON_INTERPRET")
    (note,) = check._missing_backend_notes(torch.device("cpu"))
    assert "only the reference backend runs" in note and "TRITON_INTERPRET=1" in note
    monkeypatch.setattr(_cuda_ext, "has_cuda_ext", lambda: False)
    monkeypatch.setattr(_cuda_ext, "load_error", lambda: "not built (run `negkernels build-ext`)")
    (note,) = check._missing_backend_notes(torch.device("cuda"))
    assert note == "CUDA extension not loaded, so no cuda rows: not built (run `negkernels build-ext`)"


def test_bench_says_why_kernel_rows_are_missing(monkeypatch):
    import torch

    import negkernels as nk
    from negkernels import _cuda_ext, bench
    from negkernels.cases import select

    cases = select("kv")
    (line,) = bench.missing_kernel_rows(torch.device("cpu"), cases)
    assert line == "not measured here (no CUDA device): the triton and cuda rows of every case"
    monkeypatch.setattr(nk, "available_backends", lambda device, op=None: ("reference", "triton"))
    monkeypatch.setattr(_cuda_ext, "has_cuda_ext", lambda: False)
    monkeypatch.setattr(_cuda_ext, "load_error", lambda: "ImportError: libcudart.so.12")
    (line,) = bench.missing_kernel_rows(torch.device("cuda"), cases, impls=["cuda"])
    assert line == "no cuda rows: the CUDA extension is not loaded: ImportError: libcudart.so.12"


def test_bench_writes_table_and_json(tmp_path, capsys):
    assert main(["bench", "--case", "advantages/ragged", "--impl", "eager", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "advantages/ragged" in out and "wall ms" in out
    payload = json.loads((tmp_path / "bench.json").read_text())
    (row,) = payload["rows"]
    assert row["impl"] == "eager" and row["ms"] > 0 and row["error"] is None
    assert payload["roofline"]["copy_GBps"] > 0


def test_sanitizer_driver_runs_every_kernel_call():
    # benchmarks/sanitize.py is what compute-sanitizer watches on a GPU; on the CPU it runs its own
    # calls through the Triton interpreter (the check table's rows run in test_check_passes).
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "sanitize.py"), "--device=cpu", "--skip-table"],
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
    assert (
        "SMOKE TEST" in out
        and "not measured here (no CUDA device): the triton and cuda rows of advantages/uniform-g64" in out
    )
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


def test_bench_plot_has_one_panel_per_family_and_says_what_was_timed(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from negkernels.bench import plot

    def row(case, impl, ms, family):
        return dict(case=case, impl=impl, ms=ms, floor_ms=ms / 7, op_family=family)

    rows = [
        row("kv/evict", "eager", 0.5, "kv"),
        row("kv/evict", "compile", 0.3, "kv"),
        row("advantages/ragged", "eager", 0.1, "advantages"),
        row("advantages/ragged", "triton", float("nan"), "advantages"),
    ]
    title, panels = plot(rows, torch.device("cpu"), "cpu", tmp_path / "cpu.png", plt)
    assert panels == ["kv", "advantages"] and "SMOKE TEST" in title and (tmp_path / "cpu.png").stat().st_size > 0
    title, _ = plot(rows, torch.device("cuda"), "NVIDIA H200", tmp_path / "gpu.png", plt)
    assert "NVIDIA H200" in title and "kernels measured" in title
