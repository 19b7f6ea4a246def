"""HTTP framing under fuzzed input (tests/fuzz/drive_http.py drives HttpConnection as the server does).

Invariants: any bytes -> requests, then the peer's close or one 400/413/431 that can be sent (never another
exception); the same trace whole, one byte at a time and cut anywhere.
"""
from __future__ import annotations

import h11
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.drive_http import run_http
from tests.fuzz.splits import bytewise, cut
from tests.fuzz.strategies import cuts, examples, mutated

WS_UPGRADE = [("upgrade", "websocket"), ("connection", "Upgrade"), ("sec-websocket-version", "13"),
              ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")]
EXTRA_HEADERS = [("connection", "close"), ("expect", "100-continue"), ("x-a", "b"), ("content-type", "text/plain")]
TOKENS = [b"\r\n", b"\r\n\r\n", b"\n", b" ", b":", b"\x00", b"\xff", b"0\r\n\r\n", b"ffffffffffffffffff\r\n",
          b"content-length: 5\r\n", b"content-length: 9999\r\n", b"transfer-encoding: chunked\r\n",
          b"HEAD / HTTP/1.1\r\nhost: x\r\n\r\n", b"GET / HTTP/1.0\r\n\r\n", b"connection: close\r\n",
          b"expect: 100-continue\r\n", b"upgrade: websocket\r\n", b"HTTP/1.1", b"x" * 300]


def request_bytes(method: str, target: str, body: bytes, chunked: bool, extra: list[tuple[str, str]]) -> bytes:
    """One request as a real client (h11) writes it."""
    client = h11.Connection(h11.CLIENT)
    headers = [("host", "x"), *extra]
    if body and method != "HEAD":
        headers.append(("transfer-encoding", "chunked") if chunked else ("content-length", str(len(body))))
    else:
        body = b""
    out = client.send(h11.Request(method=method, target=target, headers=headers)) or b""
    if body:
        out += client.send(h11.Data(data=body)) or b""
    return out + (client.send(h11.EndOfMessage()) or b"")


requests_ = st.builds(
    request_bytes, st.sampled_from(["GET", "POST", "HEAD", "DELETE", "PUT"]),
    st.from_regex(r"\A/[a-z0-9/_.?=&%-]{0,20}\Z"), st.binary(max_size=300), st.booleans(),
    st.lists(st.sampled_from(EXTRA_HEADERS), max_size=2, unique=True))
upgrade = st.just(request_bytes("GET", "/api-ws/v1/audio/speech", b"", False, WS_UPGRADE) + b"\x81\x80abcd")
streams = st.lists(st.one_of(requests_, upgrade), min_size=1, max_size=3).map(b"".join)


def same_whatever_the_cuts(data: bytes, extra_cuts: list[int]) -> list[tuple]:
    whole = run_http([data])
    assert run_http(bytewise(data)) == whole
    assert run_http(cut(data, extra_cuts)) == whole
    return whole


@examples(60)
@given(streams, cuts)
def test_valid_requests_parse_the_same_however_they_are_cut(data: bytes, extra_cuts: list[int]) -> None:
    trace = same_whatever_the_cuts(data, extra_cuts)
    assert all(kind != "error" for kind, *_ in trace), trace  # a real client's requests are all accepted


@examples(300)
@given(mutated(streams, TOKENS), cuts)
def test_mutated_requests_are_accepted_or_refused_the_same_however_they_are_cut(data: bytes,
                                                                                extra_cuts: list[int]) -> None:
    same_whatever_the_cuts(data, extra_cuts)


@examples(100)
@given(st.binary(max_size=300), cuts)
def test_any_bytes_are_accepted_or_refused_the_same_however_they_are_cut(data: bytes, extra_cuts: list[int]) -> None:
    same_whatever_the_cuts(data, extra_cuts)
