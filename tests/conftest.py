"""Shared fixtures: the project's own tiny random-weight model (generated once per session)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


def _reference_dir() -> Path:
    """The upstream fixtures: $COSYSERVE_REFERENCE_DIR, else ../shared/reference beside the checkout."""
    if os.environ.get("COSYSERVE_REFERENCE_DIR"):
        return Path(os.environ["COSYSERVE_REFERENCE_DIR"])
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "reference", Path("/work/shared/reference")]
    return next((c for c in candidates if c.is_dir()), candidates[0])


REFERENCE_DIR = _reference_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python -m kernels.make_checkpoint --preset tiny` into a session temp dir (no ../shared needed)."""
    from kernels.make_checkpoint import main

    out = tmp_path_factory.mktemp("tiny-model")
    main(["--preset", "tiny", "--out", str(out)])
    return out
