"""HTTP/1.1 framing (protocol.http.HttpConnection): any bytes -> requests or a 400/413/431, split-independent.

Input: one seed byte (the random split), then the bytes a client sends.
"""
from __future__ import annotations

from tests.fuzz.harness import fuzz, instrumented, take_seed
from tests.fuzz.splits import splits

with instrumented(__name__):
    from tests.fuzz.drive_http import run_http


def one_input(data: bytes) -> None:
    seed, stream = take_seed(data)
    traces = {name: run_http(pieces) for name, pieces in splits(stream, seed).items()}
    assert traces["bytewise"] == traces["whole"], traces
    assert traces["random"] == traces["whole"], traces


if __name__ == "__main__":
    fuzz(one_input)
