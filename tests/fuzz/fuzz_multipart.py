"""multipart/form-data (protocol.multipart.MultipartReader): any body and Content-Type -> a form or a
400/413/415, the same whole, byte by byte and cut at random.

Input: one seed byte (the random split), the Content-Type line, a newline, then the body.
"""
from __future__ import annotations

from tests.fuzz.harness import fuzz, instrumented, take_seed
from tests.fuzz.splits import splits

with instrumented(__name__):
    from tests.fuzz.drive_multipart import parse_input, run_multipart


def verdict(result: tuple[object, ...]) -> tuple[object, ...]:
    """A form must be the same form however it was cut; a refusal only a refusal. A body with two faults
    (a part over its limit and malformed framing) is refused for whichever the parser reaches first, and
    python-multipart hands over part data at the end of each piece, so that depends on the cuts."""
    return ("refused",) if result[0] == "error" else result


def one_input(data: bytes) -> None:
    seed, rest = take_seed(data)
    content_type, body = parse_input(rest)
    results = {name: run_multipart(pieces, content_type) for name, pieces in splits(body, seed).items()}
    assert verdict(results["bytewise"]) == verdict(results["whole"]), results
    assert verdict(results["random"]) == verdict(results["whole"]), results


if __name__ == "__main__":
    fuzz(one_input)
