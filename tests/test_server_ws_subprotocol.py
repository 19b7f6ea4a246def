"""WebSocket auth for browsers: the token in the subprotocol offer (never echoed), never in the query string."""
from __future__ import annotations

import base64
import json
import logging
import socket

import pytest
import requests
import websocket

from server.auth import subprotocol_token
from tests.server_helpers import TOKEN, continue_task, finish_task, run_task, running_server, upload

WS_PATH = "/api-ws/v1/audio/speech"


def _b64url(token: str, padded: bool = False) -> str:
    encoded = base64.urlsafe_b64encode(token.encode("utf-8")).decode("ascii")
    return encoded if padded else encoded.rstrip("=")


def _offer(token: str) -> list[str]:
    return ["cosyserve", f"bearer.{_b64url(token)}"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with running_server(tmp_path_factory.mktemp("data")) as srv:
        yield srv


def _handshake(server, target: str = WS_PATH, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    """The raw answer to an upgrade request: (status, headers, the bytes of the whole answer)."""
    lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8"))
        raw = b""
        while b"\r\n\r\n" not in raw:
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
        if not raw.startswith(b"HTTP/1.1 101"):
            while chunk := sock.recv(65536):  # a refusal closes after its JSON body
                raw += chunk
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    got = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
    return status, got, raw


def test_subprotocol_token_runs_a_task(server) -> None:
    voice = upload(requests, server.url).json()["id"]
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}{WS_PATH}", subprotocols=_offer(TOKEN),
                                     timeout=10)
    try:
        assert ws.getsubprotocol() == "cosyserve"
        ws.send(run_task("t", voice, output_format="pcm"))
        ws.send(continue_task("t", "hello"))
        ws.send(finish_task("t"))
        events = []
        while not events or events[-1] not in ("task-finished", "task-failed"):
            events.append(json.loads(ws.recv())["header"]["event"])
    finally:
        ws.close()
    assert events[0] == "task-started" and events[-1] == "task-finished" and "result-generated" in events


@pytest.mark.parametrize("offer", [
    _offer(TOKEN), _offer("second-token"), list(reversed(_offer(TOKEN))),
    ["cosyserve", f"bearer.{_b64url(TOKEN, padded=True)}"],
])
def test_the_answer_names_only_cosyserve(server, offer: list[str]) -> None:
    status, headers, raw = _handshake(server, headers={"Sec-WebSocket-Protocol": ", ".join(offer)})
    assert status == 101 and headers["sec-websocket-protocol"] == "cosyserve"
    assert _b64url(TOKEN).encode() not in raw and b"bearer" not in raw.lower()


def test_header_auth_still_works_and_names_no_subprotocol(server) -> None:
    status, headers, _ = _handshake(server, headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 101 and "sec-websocket-protocol" not in headers


@pytest.mark.parametrize("headers", [
    {"Sec-WebSocket-Protocol": ", ".join(_offer("wrong-token"))},
    {"Sec-WebSocket-Protocol": "cosyserve, bearer.!!not-base64!!"},
    {"Sec-WebSocket-Protocol": "cosyserve, bearer.__79"},  # base64url of bytes that are not UTF-8
    {"Sec-WebSocket-Protocol": "cosyserve, bearer."},
    {"Sec-WebSocket-Protocol": "cosyserve"},
    {"Sec-WebSocket-Protocol": f"cosyserve, {TOKEN}"},  # the bare token is not the scheme
    # the header, when sent, decides alone: a wrong one is not rescued by a right offer
    {"Authorization": "Bearer wrong", "Sec-WebSocket-Protocol": ", ".join(_offer(TOKEN))},
])
def test_wrong_or_missing_subprotocol_token_is_401(server, headers: dict[str, str]) -> None:
    status, _, raw = _handshake(server, headers=headers)
    assert status == 401
    assert json.loads(raw.split(b"\r\n\r\n", 1)[1])["code"] == "Unauthorized"


@pytest.mark.parametrize("query", [f"token={TOKEN}", f"access_token={TOKEN}", f"authorization=Bearer%20{TOKEN}",
                                   f"api_key={TOKEN}", f"bearer={_b64url(TOKEN)}"])
def test_token_in_the_query_string_is_refused(server, query: str) -> None:
    status, headers, raw = _handshake(server, target=f"{WS_PATH}?{query}")
    assert status == 401 and "sec-websocket-protocol" not in headers
    assert TOKEN.encode() not in raw


def test_refused_upgrades_never_log_the_token(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cret-never-logged"
    caplog.set_level(logging.DEBUG)
    with running_server(tmp_path) as srv:
        for target, headers in [(f"{WS_PATH}?token={secret}", {}),
                                (WS_PATH, {"Sec-WebSocket-Protocol": ", ".join(_offer(secret))}),
                                (WS_PATH, {"Authorization": f"Bearer {secret}"}),
                                (f"/nope?token={secret}", {"Sec-WebSocket-Protocol": ", ".join(_offer(secret))})]:
            status, _, raw = _handshake(srv, target=target, headers=headers)
            assert status in (401, 404)
            assert secret.encode() not in raw and _b64url(secret).encode() not in raw
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert secret not in logged and _b64url(secret) not in logged


@pytest.mark.parametrize("offer,want", [
    (["cosyserve", f"bearer.{_b64url('tök=n/+')}"], "tök=n/+"),
    ([f"bearer.{_b64url('abc', padded=True)}"], "abc"),
    (["cosyserve"], None),
    (["bearer.%%%"], None),
    (["bearer.__79"], None),  # not UTF-8
    (["bearer.//8"], None),  # base64, not base64url
    (["bearer.a"], None),  # no whole byte
    ([], None),
])
def test_subprotocol_token_parsing(offer: list[str], want: str | None) -> None:
    assert subprotocol_token(offer) == want
