"""The size limits no other test reached through a real server (README "Security" lists them all, with
the test of each): the upload transcript, the form's parts and fields, a WebSocket task's text over
several pieces, the OpenAI input. Each is refused with its status and changes nothing."""
from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
import requests
import websocket

from protocol.multipart import DEFAULT_MAX_FIELD_BYTES, DEFAULT_MAX_PARTS
from tests.server_helpers import (
    AUTH,
    TOKEN,
    continue_task,
    finish_task,
    run_task,
    running_server,
    upload,
    wav_bytes,
)

MAX_TEXT = 100
REF = "/api/v1/audio/reference_audio"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    with running_server(tmp_path_factory.mktemp("data"), max_text_chars=MAX_TEXT) as srv:
        yield srv


@pytest.fixture(scope="module")
def voice(server) -> str:
    return upload(requests, server.url).json()["id"]


def _voices(server) -> list:
    return requests.get(f"{server.url}{REF}", headers=AUTH, timeout=10).json()


def _form(fields: list[tuple[str, bytes]], file: bytes | None = None) -> tuple[bytes, dict[str, str]]:
    boundary = uuid.uuid4().hex
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n".encode() + value + b"\r\n"
             for name, value in fields]
    if file is not None:
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n"
                     .encode() + file + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), {
        **AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.mark.parametrize(("name", "fields", "status", "says"), [
    ("transcript over --max-text-chars", [("text", b"t" * (MAX_TEXT + 1))], 400, "'text' is too long"),
    ("more form parts than allowed", [("text", b"t")] + [(f"f{i}", b"x") for i in range(DEFAULT_MAX_PARTS)],
     400, "too many form parts"),
    ("a form field over its limit", [("text", b"t"), ("note", b"x" * (DEFAULT_MAX_FIELD_BYTES + 1))], 413,
     "larger than"),
])
def test_upload_limits(server, voice: str, name: str, fields: list, status: int, says: str) -> None:
    before = _voices(server)
    body, headers = _form(fields, wav_bytes())
    r = requests.post(f"{server.url}{REF}", data=body, headers=headers, timeout=10)
    assert r.status_code == status and says in r.json()["message"], (name, r.text)
    assert _voices(server) == before


def test_a_websocket_tasks_text_is_limited_over_all_its_pieces(server, voice: str) -> None:
    ws = websocket.create_connection(server.url.replace("http", "ws") + "/api-ws/v1/audio/speech",
                                     header=[f"Authorization: Bearer {TOKEN}"], timeout=10)
    try:
        ws.send(run_task("a", voice))
        assert json.loads(ws.recv())["header"]["event"] == "task-started"
        ws.send(continue_task("a", "x" * 60))
        ws.send(continue_task("a", "y" * 60))  # 120 > 100 together
        events = [json.loads(ws.recv())]
        while events[-1]["header"]["event"] == "result-generated":
            events.append(json.loads(ws.recv()))
        assert events[-1]["header"]["event"] == "task-failed"
        assert events[-1]["header"]["error_code"] == "InvalidParameter"
        ws.send(run_task("b", voice))  # the connection goes on
        assert json.loads(ws.recv())["header"]["event"] == "task-started"
        ws.send(continue_task("b", "z" * MAX_TEXT))
        ws.send(finish_task("b"))
        event = ""
        while event not in ("task-finished", "task-failed"):
            event = json.loads(ws.recv())["header"]["event"]
        assert event == "task-finished"
    finally:
        ws.close()


def test_the_openai_input_is_limited_by_the_servers_text_limit(server, voice: str) -> None:
    r = requests.post(f"{server.url}/v1/audio/speech", headers=AUTH, timeout=10,
                      json={"model": "tts-1", "voice": voice, "input": "x" * (MAX_TEXT + 1)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    assert f"at most {MAX_TEXT}" in r.json()["error"]["message"]
