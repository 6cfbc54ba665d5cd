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
    assert "advantages/ragged" in out and "median ms" in out
    payload = json.loads((tmp_path / "bench.json").read_text())
    (row,) = payload["rows"]
    assert row["impl"] == "eager" and row["ms"] > 0 and row["error"] is None
    assert payload["roofline"]["copy_GBps"] > 0


def test_sanitizer_driver_runs_every_kernel_call():
    # benchmarks/sanitize.py is what compute-sanitizer watches on a GPU; on the CPU it runs the
    # same calls through the Triton interpreter.
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "sanitize.py"), "--device=cpu"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for op in ("group_advantages/triton", "token_logprobs/triton", "policy_loss/triton", "policy_loss_from_logits/triton",
               "bank_info_nce/triton", "bank_topk/triton"):
        assert op in proc.stdout
