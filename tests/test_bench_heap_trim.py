"""bench.heap_trim: the fixed work runs and reports (whether a trim happens depends on the heap's free
memory reaching TrimPolicy's floor: tests/test_kernels_heap_trim.py covers the policy and the trim)."""
from __future__ import annotations

from bench import heap_trim


def test_fixed_work_runs_and_reports(tiny_model_dir, capsys) -> None:
    wall = heap_trim.main(["--interval", "0.5", "--jobs", "4", "--model-dir", str(tiny_model_dir)])
    out = capsys.readouterr().out
    assert wall > 0 and out.startswith("interval 0.5 s: ") and "speech-s/s" in out and "trims" in out
