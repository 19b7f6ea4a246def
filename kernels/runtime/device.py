"""torch's process-wide device and thread settings, chosen at start-up (the server calls these, never torch)."""
from __future__ import annotations

import torch


def default_device(requested: str | None = None) -> str:
    """`requested` if given, else "cuda" when a CUDA device is usable, else "cpu"."""
    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def set_intra_op_threads(threads: int) -> None:
    """torch's intra-op thread count; set before the engine thread starts (it inherits the count)."""
    torch.set_num_threads(threads)
