"""WebSocket duplex: the zh document's websocket-client usage, several tasks, errors; raw wsproto edge cases."""
from __future__ import annotations

import base64
import io
import json
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
import soundfile as sf
import websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from tests.fakes import SAMPLES_PER_CHAR, FakeEngine
from tests.server_helpers import (
    AUTH,
    TOKEN,
    DocClient,
    assert_ms_times,
    continue_task,
    finish_task,
    run_task,
    running_server,
    upload,
)

WS_PATH = "/api-ws/v1/audio/speech"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with running_server(tmp_path_factory.mktemp("data"), FakeEngine(chunk_chars=5),
                        max_ws_message_bytes=4096) as srv:
        yield srv


@pytest.fixture(scope="module")
def voice(server) -> str:
    return upload(requests, server.url).json()["id"]


def _ws_url(server) -> str:
    return f"ws://127.0.0.1:{server.port}{WS_PATH}"


@pytest.mark.parametrize("fmt", ["wav", "mp3", "pcm"])
def test_document_client_duplex(server, voice: str, fmt: str) -> None:
    texts = ["收到好友從遠方寄來的生日禮物,", "那份意外的驚喜與深深的祝福", "讓我心中充滿了甜蜜的快樂。"]
    client = DocClient(_ws_url(server), {"voice": voice, "output_format": fmt, "sample_rate": 24000, "texts": texts,
                                         "volume": 2.0, "bit_rate": "48k"})
    client.run()
    assert not client.errors, client.errors
    assert client.events[0] == "task-started" and client.events[-1] == "task-finished"
    assert client.metrics["speech_len"] > 0 and client.metrics["server_rtf"] >= 0
    expected_s = sum(len(t) for t in texts) * SAMPLES_PER_CHAR / 24000
    if fmt == "pcm":
        seconds = len(client.audio) / 2 / 24000
    else:
        data, sr = sf.read(io.BytesIO(client.audio), dtype="float32")
        seconds = len(data) / sr
    assert abs(seconds - expected_s) < (0.08 if fmt == "mp3" else 0.01)
    assert abs(client.metrics["speech_len"] - expected_s) < (0.01 if fmt != "mp3" else 0.08)


def _recv_until_done(ws: websocket.WebSocket) -> list[dict[str, Any]]:
    out = []
    while True:
        msg = json.loads(ws.recv())
        out.append(msg)
        if msg["header"]["event"] in ("task-finished", "task-failed"):
            return out


def test_two_tasks_on_one_connection(server, voice: str) -> None:
    ws = websocket.create_connection(_ws_url(server), header=[f"Authorization: Bearer {TOKEN}"], timeout=10)
    try:
        for n in range(2):
            tid = str(uuid.uuid4())
            ws.send(run_task(tid, voice, output_format="pcm"))
            ws.send(continue_task(tid, "first piece "))
            ws.send(continue_task(tid, "second piece"))
            ws.send(finish_task(tid))
            msgs = _recv_until_done(ws)
            kinds = [m["header"]["event"] for m in msgs]
            assert kinds[0] == "task-started" and kinds[-1] == "task-finished", kinds
            assert all(m["header"]["task_id"] == tid for m in msgs)
            chunks = [m for m in msgs if m["header"]["event"] == "result-generated"]
            pcm = b"".join(base64.b64decode(m["payload"]["output"]["audio"]["data"]) for m in chunks)
            assert len(pcm) // 2 == len("first piece second piece") * SAMPLES_PER_CHAR
            assert all(m["payload"]["metrics"]["speech_len"] > 0 for m in chunks)
            for m in chunks:
                assert_ms_times(m["payload"]["metrics"])
    finally:
        ws.close()


@pytest.mark.parametrize("messages,code", [
    (["{not json"], "InvalidMessage"),
    (['[1,2]'], "InvalidMessage"),
    (["[" * 4000], "InvalidMessage"),  # json's decoder recursed: the connection dropped, no close frame
    ([json.dumps({"header": {"action": "dance", "task_id": "t"}, "payload": {}})], "UnknownAction"),
    ([continue_task("t", "hi")], "TaskNotStarted"),
    ([finish_task("t")], "TaskNotStarted"),
    (["RUN:bad-mode"], "InvalidParameter"),
    (["RUN:unknown-voice"], "NotFound"),
    (["RUN", continue_task("T", "")], "InvalidParameter"),
    # the task may finish before "late" arrives: then it is simply not started
    (["RUN", continue_task("T", "hi"), finish_task("T"), continue_task("T", "late")],
     "InvalidState|TaskNotStarted"),
    (["RUN", finish_task("T")], "InvalidParameter"),
])
def test_ws_protocol_errors_give_task_failed(server, voice: str, messages: list[str], code: str) -> None:
    ws = websocket.create_connection(_ws_url(server), header=[f"Authorization: Bearer {TOKEN}"], timeout=10)
    try:
        for m in messages:
            if m == "RUN":
                m = run_task("T", voice)
            elif m == "RUN:bad-mode":
                m = run_task("T", voice, mode="sing")
            elif m == "RUN:unknown-voice":
                m = run_task("T", "00000000-0000-4000-8000-000000000000")
            ws.send(m)
        while True:
            msg = json.loads(ws.recv())
            if msg["header"]["event"] == "task-failed":
                break
        assert msg["header"]["error_code"] in code.split("|") and msg["header"]["error_message"]
        # the connection stays usable for a new task
        ws.send(run_task("next", voice, output_format="pcm"))
        ws.send(continue_task("next", "ok"))
        ws.send(finish_task("next"))
        assert _recv_until_done(ws)[-1]["header"]["event"] == "task-finished"
    finally:
        ws.close()


@pytest.mark.parametrize("texts", [[], ["  \n "]])
def test_finish_without_text_fails_with_no_audio(server, voice: str, texts: list[str]) -> None:
    ws = websocket.create_connection(_ws_url(server), header=[f"Authorization: Bearer {TOKEN}"], timeout=10)
    try:
        ws.send(run_task("T", voice))
        for text in texts:
            ws.send(continue_task("T", text))
        ws.send(finish_task("T"))
        msgs = _recv_until_done(ws)
    finally:
        ws.close()
    kinds = [m["header"]["event"] for m in msgs]
    assert kinds[-1] == "task-failed" and "result-generated" not in kinds, kinds
    assert msgs[-1]["header"]["error_code"] == "InvalidParameter"
    assert msgs[-1]["header"]["error_message"] == ("no text was sent before finish-task" if not texts else
                                                   "'payload.input.text' must not be empty")


def _metrics_text(srv) -> str:
    return requests.get(f"{srv.url}/metrics", headers=AUTH, timeout=5).text


def test_metrics_count_ws_tasks_by_outcome(tmp_path: Path) -> None:
    with running_server(tmp_path, FakeEngine(delay_s=0.05, chunk_chars=2)) as srv:
        vid = upload(requests, srv.url).json()["id"]
        ws = websocket.create_connection(_ws_url(srv), header=[f"Authorization: Bearer {TOKEN}"], timeout=10)
        for messages in ([run_task("ok", vid), continue_task("ok", "hi"), finish_task("ok")],  # finished
                         [run_task("empty", vid), finish_task("empty")],  # failed by the protocol
                         [run_task("nf", "00000000-0000-4000-8000-000000000000")]):  # failed: unknown voice
            for m in messages:
                ws.send(m)
            _recv_until_done(ws)
        ws.send(run_task("gone", vid))
        ws.send(continue_task("gone", "x" * 300))
        while json.loads(ws.recv())["header"]["event"] != "result-generated":
            pass
        ws.sock.close()  # vanish mid-task: cancelled
        want = {f'cosyserve_ws_tasks_total{{outcome="{k}"}} {n}'
                for k, n in (("cancelled", 1), ("failed", 2), ("finished", 1))}
        deadline = time.time() + 5
        while time.time() < deadline and not want <= set(_metrics_text(srv).splitlines()):
            time.sleep(0.02)  # the cancelled runner ends on the server's loop, a moment after the close
        text = _metrics_text(srv)
        assert want <= set(text.splitlines()), text
        assert 'route="ws_task"' not in text  # tasks have no HTTP status: not in requests_total


def _wsproto_handshake(server, headers: list[tuple[str, str]]) -> tuple[socket.socket, WSConnection, list]:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    conn = WSConnection(ConnectionType.CLIENT)
    sock.sendall(conn.send(Request(host="x", target=WS_PATH, extra_headers=headers)))
    events: list = []
    while not events or not isinstance(events[-1], (AcceptConnection, RejectData)) or (
            isinstance(events[-1], RejectData) and not events[-1].body_finished):
        data = sock.recv(65536)
        conn.receive_data(data or None)
        events += list(conn.events())
        if not data:
            break
    return sock, conn, events


@pytest.mark.parametrize("headers", [[], [("Authorization", "Bearer nope")]])
def test_ws_upgrade_without_token_is_401(server, headers) -> None:
    sock, _, events = _wsproto_handshake(server, headers)
    sock.close()
    assert isinstance(events[0], RejectConnection) and events[0].status_code == 401
    body = b"".join(e.data for e in events if isinstance(e, RejectData))
    assert json.loads(body)["code"] == "Unauthorized"


def test_ws_oversized_message_closes_1009(server) -> None:
    sock, conn, events = _wsproto_handshake(server, [("Authorization", f"Bearer {TOKEN}")])
    assert isinstance(events[-1], AcceptConnection)
    sock.sendall(conn.send(TextMessage(data="x" * 5000)))
    got: list = []
    while not any(isinstance(e, CloseConnection) for e in got):
        conn.receive_data(sock.recv(65536) or None)
        got += list(conn.events())
    sock.close()
    assert [e.code for e in got if isinstance(e, CloseConnection)] == [1009]


def test_ws_client_disconnect_cancels_job(tmp_path: Path) -> None:
    engine = FakeEngine(delay_s=0.05, chunk_chars=2)
    with running_server(tmp_path, engine) as srv:
        vid = upload(requests, srv.url).json()["id"]
        ws = websocket.create_connection(_ws_url(srv), header=[f"Authorization: Bearer {TOKEN}"], timeout=10)
        ws.send(run_task("t", vid))
        ws.send(continue_task("t", "x" * 300))
        while json.loads(ws.recv())["header"]["event"] != "result-generated":
            pass
        assert engine.running == 1
        ws.sock.close()  # vanish without a close frame
        deadline = time.time() + 5
        while time.time() < deadline and engine.running:
            time.sleep(0.02)
        assert engine.running == 0
        text = requests.get(f"{srv.url}/metrics", headers=AUTH, timeout=5).text
        assert "cosyserve_inflight 0" in text
