"""WebSocket frames (protocol.websocket.WebSocketSession): after an accepted handshake any bytes -> messages,
pongs and one close with a valid code, never an exception; the same whole, byte by byte and cut at random.

Input: one seed byte (the random split), one flags byte (bit 0: a binary session as the internal API's;
bit 1: the server already sent its close), then the bytes the client sends.
"""
from __future__ import annotations

from tests.fuzz.harness import fuzz, instrumented, take_seed
from tests.fuzz.splits import splits

with instrumented(__name__):
    from tests.fuzz.drive_ws import run_ws


def one_input(data: bytes) -> None:
    seed, rest = take_seed(data)
    flags, stream = take_seed(rest)
    options = {"binary": bool(flags & 1), "server_closes_first": bool(flags & 2)}
    traces = {name: run_ws(pieces, **options) for name, pieces in splits(stream, seed).items()}
    assert traces["bytewise"] == traces["whole"], traces
    assert traces["random"] == traces["whole"], traces


if __name__ == "__main__":
    fuzz(one_input)
