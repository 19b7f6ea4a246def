"""`python -m kernels.parity` on the upstream reference fixtures (../shared/reference).

Like every test that reads the fixtures, it is skipped where they are absent and FAILS under
COSYSERVE_REQUIRE_REFERENCE=1, which CI (.ci/run) sets: there is no other way to opt out of it.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REFERENCE_DIR, needs_reference

ROOT = Path(__file__).resolve().parents[1]


@needs_reference("tiny", "cases")
def test_parity_cli_all_cases_pass() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kernels.parity", "--model-dir", str(REFERENCE_DIR / "tiny"),
         "--cases", str(REFERENCE_DIR / "cases")],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = lines[-1]
    passed = int(summary.split()[0])
    assert summary.endswith("0 failed") and passed >= 100, summary
    for section in ("features.", "frontend.", "llm.", "flow.", "hift."):
        assert any(section in line for line in lines), f"no {section} cases ran"
