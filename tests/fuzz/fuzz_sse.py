"""SSE events (protocol.sse, protocol.openai_responses): any text -> one `data:` line per event, read back
unchanged by sseclient-py from a stream cut at random.

Input: one seed byte (the random split), then the text as UTF-16 (every code point reachable; unpaired
surrogates become U+FFFD: the request schemas refuse them, see fuzz_json_schema).
"""
from __future__ import annotations

from functools import partial

from tests.fuzz.harness import fuzz, instrumented, take_seed
from tests.fuzz.splits import random_cut

with instrumented(__name__):
    from tests.fuzz.drive_sse import run_sse


def one_input(data: bytes) -> None:
    seed, raw = take_seed(data)
    run_sse(raw.decode("utf-16-le", "replace"), partial(random_cut, seed=seed))


if __name__ == "__main__":
    fuzz(one_input)
