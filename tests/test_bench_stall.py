"""Smoke run of `python -m bench.stall` on the tiny model: every mode runs, gaps are counted, files written."""
from __future__ import annotations

import json
from pathlib import Path

from bench import stall


def test_stall_bench_runs_each_mode_and_writes_its_tables(tiny_model_dir: Path, tmp_path: Path) -> None:
    out, md = tmp_path / "stall.json", tmp_path / "stall.md"
    res = stall.main(["--model-dir", str(tiny_model_dir), "--streams", "2", "--tokens", "60", "--chars", "300",
                      "--rounds", "1", "--text-process", "1", "--json", str(out), "--markdown", str(md)])
    assert [r["mode"] for r in res["rounds"]] == ["short text", "long text, in a child process"]
    for r in res["rounds"]:
        assert r["gaps"] >= 1 and 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
    assert json.loads(out.read_text())["meta"]["streams"] == 2
    assert "long text, in a child process" in md.read_text()


def test_long_text_is_long_and_cut_exactly() -> None:
    assert len(stall.long_text(4500)) == 4500 and stall.long_text(10) == stall.LONG_UNIT[:10]
