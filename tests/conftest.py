"""Shared fixtures: the project's own tiny random-weight model (generated once per session), and the
upstream reference fixtures (`../shared/reference` beside the checkout, or $COSYSERVE_REFERENCE_DIR).

Tests that need the reference fixtures say so with `@needs_reference("tiny/flow.pt", ...)` (or a module's
`pytestmark = needs_reference(...)`). Without the files such a test is skipped with a reason that names
what is missing and where it looked; with COSYSERVE_REQUIRE_REFERENCE=1 (CI, `.ci/run`) every skip of
such a test -- for that reason or any other -- is turned into a failure, so CI cannot pass without them.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernels.parity.reference import ENV as REFERENCE_ENV
from kernels.parity.reference import reference_dir

REQUIRE_ENV = "COSYSERVE_REQUIRE_REFERENCE"
_MARKER = "reference"
# $COSYSERVE_REFERENCE_DIR if set, else <repo root>/../shared/reference (nothing else is tried); the same
# lookup as `python -m kernels.parity`.
REFERENCE_DIR = reference_dir().expanduser().resolve()


def reference_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def missing_reference(*paths: str) -> str | None:
    """None when every path exists under REFERENCE_DIR, else the skip reason (what, where, how to point)."""
    missing = [p for p in paths or (".",) if not (REFERENCE_DIR / p).exists()]
    if not missing:
        return None
    origin = f"${REFERENCE_ENV}" if os.environ.get(REFERENCE_ENV) else f"<repo root>/../shared/reference (${REFERENCE_ENV} unset)"
    return (f"upstream reference fixtures missing: {', '.join(missing)} not found in {REFERENCE_DIR} "
            f"(looked in {origin}); set {REFERENCE_ENV} to the folder holding tiny/ and cases/")


def needs_reference(*paths: str) -> pytest.MarkDecorator:
    """Marks a test (or a module, as `pytestmark`) that reads these paths, relative to REFERENCE_DIR."""
    return getattr(pytest.mark, _MARKER)(*paths)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{_MARKER}(*paths): needs the upstream reference fixtures (skipped without them; "
        f"a failure under {REQUIRE_ENV}=1)")
    config.addinivalue_line(
        "markers", "soak: a real bench.soak run against a spawned server (minutes; `-m 'not soak'` skips)")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip before any fixture loads the files, so a missing folder reads as one clear reason."""
    for mark in item.iter_markers(name=_MARKER):
        reason = missing_reference(*mark.args)
        if reason:
            pytest.skip(reason)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    """Under COSYSERVE_REQUIRE_REFERENCE=1 a skipped reference test is reported as failed (exit code 1)."""
    report: pytest.TestReport = yield
    required = reference_required() and item.get_closest_marker(_MARKER) is not None
    if report.skipped and required and not hasattr(report, "wasxfail"):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        report.outcome = "failed"
        report.longrepr = (f"{REQUIRE_ENV}=1: this test needs the upstream reference fixtures and may not be "
                           f"skipped, but it was: {reason}")
    return report


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python -m kernels.weights.make_checkpoint --preset tiny` into a session temp dir (no ../shared needed)."""
    from kernels.weights.make_checkpoint import main

    out = tmp_path_factory.mktemp("tiny-model")
    main(["--preset", "tiny", "--out", str(out)])
    return out


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SeaweedFS S3 server for the session (tests/s3_server.py); skips where it cannot run."""
    from tests.s3_server import weed_mini

    with weed_mini(tmp_path_factory.mktemp("weed")) as url:
        yield url
