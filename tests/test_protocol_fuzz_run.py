"""A short fuzzing run in CI: every atheris harness (tests/fuzz/) for 1,500 inputs under libFuzzer, fixed seed.

Each harness first replays its committed corpus (seeds and the reproducer of every bug fixed), so the run
is a regression test before it is a search. A count of inputs, not a time budget, so the same inputs are
tried on every machine (a time budget explores further on a faster one, and CI would fail by discovery).
For a real search: `python -m tests.fuzz --seconds 600`.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="atheris (the `test` extra) runs the harnesses")

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.fuzz
def test_every_harness_survives_a_short_run(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "tests.fuzz", "--runs", "1500", "--seconds", "60", "--seed", "1",
               "--artifacts", str(tmp_path)]
    done = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("ok ") == 6, done.stdout  # every harness ran and reported
