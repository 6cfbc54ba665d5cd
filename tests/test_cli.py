"""The command line: `negkernels check` and `negkernels bench` run on the CPU."""

import json

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
