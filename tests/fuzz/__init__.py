"""Fuzzing the protocol layer: one atheris harness per parser (`fuzz_*.py`) over shared drivers (`drive_*.py`).

The drivers feed a parser the way the server does and check the invariants on every input: an input is
accepted or refused with the module's documented error (never another exception, never a hang), and the
result does not depend on how the bytes were split. The property tests (tests/test_protocol_fuzz_*.py)
drive them with hypothesis; `python -m tests.fuzz --seconds N` runs every harness under libFuzzer.
"""
