"""multipart/form-data (protocol.multipart.MultipartReader): any body and Content-Type -> a form or a
400/413/415, the same whole, byte by byte and cut at random.

Input: one seed byte (the random split), the Content-Type line, a newline, then the body.
"""
from __future__ import annotations

from tests.fuzz.harness import fuzz, instrumented, take_seed
from tests.fuzz.splits import splits

with instrumented(__name__):
    from tests.fuzz.drive_multipart import parse_input, run_multipart


def one_input(data: bytes) -> None:
    seed, rest = take_seed(data)
    content_type, body = parse_input(rest)
    results = {name: run_multipart(pieces, content_type) for name, pieces in splits(body, seed).items()}
    assert results["bytewise"] == results["whole"], results
    assert results["random"] == results["whole"], results


if __name__ == "__main__":
    fuzz(one_input)
