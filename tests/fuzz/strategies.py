"""hypothesis strategies and settings the property tests (tests/test_protocol_fuzz_*.py) share."""
from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# Byte offsets where a socket read may end (taken modulo nothing: out-of-range ones are dropped by `cut`).
cuts = st.lists(st.integers(min_value=1, max_value=2048), max_size=16)


def examples(n: int) -> settings:
    """`n` examples, the same ones every run (derandomize), no per-example deadline (2 shared cores)."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def mutated(base: st.SearchStrategy[bytes], tokens: list[bytes], max_edits: int = 3) -> st.SearchStrategy[bytes]:
    """`base` with up to `max_edits` edits: a byte flipped, a token inserted, a range deleted, a tail cut."""
    edit = st.tuples(st.sampled_from(("flip", "insert", "delete", "truncate")),
                     st.integers(min_value=0, max_value=1 << 16), st.integers(min_value=0, max_value=255),
                     st.sampled_from(tokens))
    return st.builds(_apply_edits, base, st.lists(edit, max_size=max_edits))


def _apply_edits(data: bytes, edits: list[tuple[str, int, int, bytes]]) -> bytes:
    for kind, where, value, token in edits:
        i = where % (len(data) + 1)
        if kind == "flip" and data:
            i %= len(data)
            data = data[:i] + bytes([data[i] ^ (value or 1)]) + data[i + 1:]
        elif kind == "insert":
            data = data[:i] + token + data[i:]
        elif kind == "delete":
            data = data[:i] + data[i + 1 + value % 8:]
        elif kind == "truncate":
            data = data[:i]
    return data
