"""The conftest rule behind CI's guarantee: a test marked `needs_reference` is skipped (with a reason that
says what is missing, where it looked and how to point elsewhere) without the fixtures, and under
COSYSERVE_REQUIRE_REFERENCE=1 any skip of such a test fails the run (pytest exit code 1).

Each case runs pytest in a subprocess on a small generated test file, with tests/conftest.py loaded as a
plugin (`-p tests.conftest`), so the hooks are exercised exactly as in the real suite.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels.parity.reference import REPO as REPO_ROOT

GENERATED = '''
import pytest
from tests.conftest import needs_reference

pytestmark = needs_reference("tiny/flow.pt")


def test_reads_flow():
    pass


@needs_reference("cases")
def test_skips_inside():
    pytest.skip("gave up inside the test")
'''

UNMARKED = '''
import pytest


def test_optional_tool():
    pytest.skip("optional tool absent")
'''


def _run(tmp_path: Path, source: str, reference: Path, require: bool) -> subprocess.CompletedProcess[str]:
    test_file = tmp_path / "test_generated.py"
    test_file.write_text(source)
    env = {k: v for k, v in os.environ.items() if not k.startswith("COSYSERVE_")}
    env["COSYSERVE_REFERENCE_DIR"] = str(reference)
    if require:
        env["COSYSERVE_REQUIRE_REFERENCE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-p", "no:asyncio", "-rA", "-q",
         "--rootdir", str(tmp_path), "-c", os.devnull, str(test_file)],
        check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )


@pytest.fixture
def empty_reference(tmp_path: Path) -> Path:
    ref = tmp_path / "elsewhere" / "reference"
    ref.mkdir(parents=True)
    return ref


def test_missing_fixtures_skip_with_a_helpful_reason(tmp_path: Path, empty_reference: Path) -> None:
    proc = _run(tmp_path, GENERATED, empty_reference, require=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "2 skipped" in out, out
    assert "tiny/flow.pt" in out and str(empty_reference) in out and "COSYSERVE_REFERENCE_DIR" in out, out


def test_required_reference_turns_every_skip_into_a_failure(tmp_path: Path, empty_reference: Path) -> None:
    proc = _run(tmp_path, GENERATED, empty_reference, require=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "skipped" not in out.splitlines()[-1], out
    assert "2 errors" in out and "COSYSERVE_REQUIRE_REFERENCE=1" in out and "tiny/flow.pt" in out, out


def test_present_fixtures_run_and_a_skip_inside_still_fails(tmp_path: Path, empty_reference: Path) -> None:
    (empty_reference / "tiny").mkdir()
    (empty_reference / "tiny" / "flow.pt").write_bytes(b"")
    (empty_reference / "cases").mkdir()
    proc = _run(tmp_path, GENERATED, empty_reference, require=False)
    assert proc.returncode == 0 and "1 passed, 1 skipped" in proc.stdout, proc.stdout + proc.stderr
    proc = _run(tmp_path, GENERATED, empty_reference, require=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "1 failed, 1 passed" in out, out
    assert "gave up inside the test" in out, out  # a skip from the test body counts too


def test_other_skips_are_left_alone(tmp_path: Path, empty_reference: Path) -> None:
    proc = _run(tmp_path, UNMARKED, empty_reference, require=True)  # not a reference test: stays a skip
    assert proc.returncode == 0 and "1 skipped" in proc.stdout, proc.stdout + proc.stderr
