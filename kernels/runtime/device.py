"""torch's process-wide device and thread settings, chosen at start-up (the server calls these, never torch)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def default_device(requested: str | None = None) -> str:
    """`requested` if given, else "cuda" when a CUDA device is usable, else "cpu"."""
    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def set_intra_op_threads(threads: int) -> None:
    """torch's intra-op thread count; set before the engine thread starts (it inherits the count)."""
    torch.set_num_threads(threads)


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """The calling thread's intra-op thread count set to `n` while inside (0: unchanged), then restored;
    a thread started inside inherits it."""
    before = torch.get_num_threads()
    change = bool(n) and n != before
    if change:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if change:
            torch.set_num_threads(before)
