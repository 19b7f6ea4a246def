"""WebSocket frames under fuzzed input after an accepted handshake (tests/fuzz/drive_ws.py): messages, pongs
and exactly one close with a valid code, never an exception; the same whole, byte by byte and cut anywhere.
Frames are built by hand here so they can break every rule of RFC 6455 (mask, opcodes, lengths, RSV bits)."""
from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.drive_ws import run_ws
from tests.fuzz.splits import bytewise, cut
from tests.fuzz.strategies import cuts, examples, mutated

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def frame(opcode: int, payload: bytes, fin: bool = True, masked: bool = True, rsv: int = 0,
          mask: bytes = b"\x01\x02\x03\x04") -> bytes:
    """One frame as RFC 6455 5.2 lays it out (7-bit, 16-bit or 64-bit length)."""
    head = bytes([(0x80 if fin else 0) | (rsv & 7) << 4 | opcode & 0xF])
    n = len(payload)
    size = bytes([n]) if n < 126 else b"\x7e" + struct.pack("!H", n) if n < 65536 else b"\x7f" + struct.pack("!Q", n)
    if not masked:
        return head + size + payload
    return head + bytes([size[0] | 0x80]) + size[1:] + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def close_payload(code: int, reason: bytes) -> bytes:
    return struct.pack("!H", code) + reason


good_frames = st.one_of(
    st.builds(lambda t, fin: frame(TEXT, t.encode(), fin), st.text(max_size=40), st.booleans()),
    st.builds(lambda t, fin: frame(0, t.encode(), fin), st.text(max_size=20), st.booleans()),  # continuation
    st.builds(lambda b: frame(BINARY, b), st.binary(max_size=40)),
    st.builds(lambda b: frame(PING, b), st.binary(max_size=20)),
    st.builds(lambda b: frame(PONG, b), st.binary(max_size=20)),
    st.builds(lambda c, r: frame(CLOSE, close_payload(c, r.encode())),
              st.sampled_from([1000, 1001, 1002, 1003, 1007, 1011, 1012, 1013, 1014, 3000, 4999, 999, 1004,
                               1005, 1006, 1015, 2999, 5000]),
              st.text(max_size=10)),
    st.just(frame(CLOSE, b"")), st.just(frame(CLOSE, b"\x03")),  # no code; a 1-byte payload (invalid)
)
odd_frames = st.builds(frame, st.integers(0, 15), st.binary(max_size=130), st.booleans(),
                       st.sampled_from([True, True, True, False]), st.integers(0, 7))
TOKENS = [frame(TEXT, b"\xff"), frame(TEXT, "é".encode()[:1], fin=False), frame(PING, b"x" * 126),
          frame(TEXT, b"x" * 70), b"\x00", b"\xff" * 9, frame(TEXT, b"ok", masked=False)]
streams = st.lists(st.one_of(good_frames, odd_frames), max_size=6).map(b"".join)
options = st.fixed_dictionaries({"binary": st.booleans(), "server_closes_first": st.booleans()})


def same_whatever_the_cuts(data: bytes, extra_cuts: list[int], **kw: bool) -> list[tuple]:
    whole = run_ws([data], **kw)
    assert run_ws(bytewise(data), **kw) == whole
    assert run_ws(cut(data, extra_cuts), **kw) == whole
    return whole


whole_messages = st.one_of(
    st.builds(lambda t: frame(TEXT, t.encode()), st.text(max_size=40)),
    st.builds(lambda t, u: frame(TEXT, t.encode(), fin=False) + frame(0, u.encode()), st.text(max_size=20),
              st.text(max_size=20)),
    st.builds(lambda b: frame(BINARY, b), st.binary(max_size=40)),
    st.builds(lambda b: frame(PING, b), st.binary(max_size=20)),
    st.builds(lambda b: frame(PONG, b), st.binary(max_size=20)),
)


@examples(40)
@given(st.lists(whole_messages, max_size=5).map(b"".join), cuts)
def test_well_formed_frames_give_the_same_events_however_they_are_cut(data: bytes, extra_cuts: list[int]) -> None:
    trace = same_whatever_the_cuts(data, extra_cuts, binary=True)
    assert trace[-1] == ("closed", 1006), trace  # nothing refused: the close is the EOF's


@examples(300)
@given(mutated(streams, TOKENS), cuts, options)
def test_any_frames_give_events_and_one_close_however_they_are_cut(data: bytes, extra_cuts: list[int],
                                                                   opts: dict[str, bool]) -> None:
    same_whatever_the_cuts(data, extra_cuts, **opts)


@examples(40)
@given(st.binary(max_size=200), cuts, options)
def test_any_bytes_give_events_and_one_close(data: bytes, extra_cuts: list[int], opts: dict[str, bool]) -> None:
    same_whatever_the_cuts(data, extra_cuts, **opts)
