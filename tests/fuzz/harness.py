"""atheris glue: a `fuzz_*.py` module imports its driver under `instrumented(__name__)`, defines
`one_input(data)` and ends with `fuzz(one_input)`.

atheris is imported only when a harness runs as a program, so the drivers and the property tests never
need it. Only the parsers under test are instrumented (instrumenting everything loaded costs ~15 s a
start). Any exception out of `one_input` (an invariant's AssertionError included) is a crash: libFuzzer
writes the input to its artifact path and exits non-zero; `python -m tests.fuzz.fuzz_http FILE` replays it.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable

# The code whose branches guide the fuzzer: ours and the parsers it builds on.
INSTRUMENTED = ["protocol", "h11", "wsproto", "python_multipart", "sseclient"]


def instrumented(module_name: str) -> contextlib.AbstractContextManager[object]:
    """Imports inside it are instrumented when the harness runs as a program (`__main__`)."""
    if module_name != "__main__":
        return contextlib.nullcontext()
    import atheris

    return atheris.instrument_imports(include=INSTRUMENTED)


def fuzz(one_input: Callable[[bytes], None]) -> None:
    import atheris

    logging.disable(logging.WARNING)  # python-multipart logs every refusal: noise at thousands of runs a second
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


def take_seed(data: bytes) -> tuple[int, bytes]:
    """The first byte seeds the random split; the rest is the input (so seed files carry one extra byte)."""
    return (data[0], data[1:]) if data else (0, b"")
