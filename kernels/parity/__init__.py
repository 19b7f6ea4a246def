"""Numerical parity against the upstream reference cases (see `python -m kernels.parity`)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CaseResult:
    name: str  # e.g. "llm.zero_shot.logp_kv"
    max_abs: float
    max_rel: float  # max_abs / max |reference|
    tolerance: float  # on max_abs (0 for exact integer checks)
    passed: bool
    note: str = ""


def compare(name: str, ours, ref, tolerance: float, note: str = "") -> CaseResult:
    """Compare two tensors/arrays elementwise; shapes must match exactly."""
    import numpy as np

    a = np.asarray(ours.detach().cpu().numpy() if hasattr(ours, "detach") else ours, dtype=np.float64)
    b = np.asarray(ref.detach().cpu().numpy() if hasattr(ref, "detach") else ref, dtype=np.float64)
    if a.shape != b.shape:
        return CaseResult(name, float("inf"), float("inf"), tolerance, False, f"shape {a.shape} != {b.shape}")
    if a.size == 0:
        return CaseResult(name, 0.0, 0.0, tolerance, True, note)
    max_abs = float(np.max(np.abs(a - b)))
    scale = float(np.max(np.abs(b))) or 1.0
    return CaseResult(name, max_abs, max_abs / scale, tolerance, max_abs <= tolerance, note)


@functools.lru_cache(maxsize=2)
def loaded_model(model_dir: Path):
    """The model as the server loads it (strict checks, weight-norm folding): parity proves the loader too."""
    from kernels.weights.model import load_model

    return load_model(Path(model_dir), device="cpu")
