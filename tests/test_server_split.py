"""The frontend/backend split in one process: a `--role backend` server with a fake engine, a `--role
frontend` server whose RemoteEngine talks to it over loopback, and `--role all` with the same fake, so the
answers can be compared byte for byte. (Real processes with the tiny model: test_server_split_processes.)"""
from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import websocket
from sseclient import SSEClient

from protocol import internal as wire
from scheduler.jobs import (
    AudioChunk,
    ChunkMetrics,
    Failed,
    Finished,
    Mode,
    PreparedJob,
    SpeechJob,
    VoicePrompt,
)
from server.config import ServerConfig
from server.remote_engine import RemoteEngine
from server.server_thread import ServerThread
from server.wiring import create_app
from tests.fakes import FakeBackendEngine, FakeEngine, FakeExtractor, fake_text_preparer
from tests.server_helpers import (
    AUTH,
    TOKEN,
    continue_task,
    finish_task,
    run_task,
    running_server,
    speech_body,
    upload,
)

INTERNAL = "internal-secret"
TEXT = "hello world, this is a test"


@contextmanager
def backend_server(data_dir: Path, engine: FakeEngine | None = None) -> Iterator[ServerThread]:
    cfg = ServerConfig(role="backend", port=0, data_dir=data_dir, internal_token=INTERNAL, workers=2)
    with ServerThread(create_app(cfg, engine=engine or FakeBackendEngine(chunk_chars=6),
                                 extract_prompt=FakeExtractor())) as srv:
        yield srv


@contextmanager
def frontend_server(data_dir: Path, backend_url: str) -> Iterator[ServerThread]:
    remote = RemoteEngine(backend_url, INTERNAL, fake_text_preparer(FakeEngine()))  # type: ignore[arg-type]
    cfg = ServerConfig(role="frontend", port=0, data_dir=data_dir, tokens=(TOKEN,), internal_token=INTERNAL,
                       backends=(backend_url,), workers=2)
    with ServerThread(create_app(cfg, engine=remote, extract_prompt=remote.extract_prompt)) as srv:
        yield srv


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory):
    with backend_server(tmp_path_factory.mktemp("backend")) as back, \
            frontend_server(tmp_path_factory.mktemp("frontend"), back.url) as front, \
            running_server(tmp_path_factory.mktemp("all"), FakeEngine(chunk_chars=6)) as whole:
        yield back, front, whole


def _voice(srv: ServerThread) -> str:
    r = upload(requests, srv.url)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _speak(url: str, voice: str, **inp: Any) -> dict[str, Any]:
    r = requests.post(f"{url}/api/v1/audio/speech", headers=AUTH, json=speech_body(voice, **inp), timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def _sse(url: str, voice: str, **inp: Any) -> list[dict[str, Any]]:
    r = requests.post(f"{url}/api/v1/audio/speech", headers=AUTH, json=speech_body(voice, stream=True, **inp),
                      stream=True, timeout=10)
    assert r.status_code == 200, r.text
    return [json.loads(m.data) for m in SSEClient(r).events()]


def _duplex(port: int, voice: str, texts: list[str]) -> tuple[list[str], bytes]:
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/api-ws/v1/audio/speech", header=AUTH, timeout=10)
    try:
        ws.send(run_task("t1", voice, output_format="pcm"))
        events, audio = [], b""
        while True:
            msg = json.loads(ws.recv())
            event = msg["header"]["event"]
            events.append(event)
            if event == "task-started":
                for text in texts:
                    ws.send(continue_task("t1", text))
                ws.send(finish_task("t1"))
            elif event == "result-generated":
                audio += base64.b64decode(msg["payload"]["output"]["audio"]["data"])
            elif event in ("task-finished", "task-failed"):
                return events, audio
    finally:
        ws.close()


def _without_times(obj: Any) -> Any:
    """The answer minus what legitimately differs between two runs (ids, wall-clock times)."""
    if isinstance(obj, dict):
        return {k: _without_times(v) for k, v in obj.items()
                if k not in ("request_id", "server_cost_time", "first_package_time", "generate_time", "rtf", "id")}
    if isinstance(obj, list):
        return [_without_times(v) for v in obj]
    return obj


def test_non_stream_speech_through_the_frontend_equals_role_all(split) -> None:
    _, front, whole = split
    got, want = _speak(front.url, _voice(front)), _speak(whole.url, _voice(whole))
    assert got["output"]["audio"]["data"] == want["output"]["audio"]["data"]  # byte for byte
    assert _without_times(got) == _without_times(want)


def test_sse_through_the_frontend_equals_role_all(split) -> None:
    _, front, whole = split
    got, want = _sse(front.url, _voice(front), debug=True), _sse(whole.url, _voice(whole), debug=True)
    assert len(got) == len(want) > 2
    assert [e["output"]["audio"]["data"] for e in got] == [e["output"]["audio"]["data"] for e in want]
    assert _without_times(got) == _without_times(want)  # per-chunk metrics (llm_tokens, batches) came along


def test_ws_duplex_through_the_frontend_equals_role_all(split) -> None:
    _, front, whole = split
    texts = ["收到好友從遠方寄來的生日禮物,", "那份意外的驚喜", "讓我心中充滿了甜蜜的快樂。"]
    got_events, got = _duplex(front.port, _voice(front), texts)
    want_events, want = _duplex(whole.port, _voice(whole), texts)
    assert got_events[0] == "task-started" and got_events[-1] == "task-finished"
    assert got == want and len(got) > 0  # byte for byte
    # How many result-generated events the audio comes in depends on when each piece reached the engine
    # (in either role), so the sequences are compared with repeats collapsed.
    assert _collapsed(got_events) == _collapsed(want_events)


def _collapsed(events: list[str]) -> list[str]:
    return [e for i, e in enumerate(events) if i == 0 or e != events[i - 1]]


def test_upload_features_come_from_the_backend(split) -> None:
    back, front, _ = split
    extractor = back.app.extract_prompt
    before = extractor.calls  # type: ignore[attr-defined]
    _voice(front)
    assert extractor.calls == before + 1  # type: ignore[attr-defined]
    assert back.app.store.list(10, "desc") == []  # the backend keeps no voices


def test_the_backend_caches_a_voice_by_content_hash(split) -> None:
    back, front, _ = split
    voice = _voice(front)
    _speak(front.url, voice, text="one")
    cached = len(back.app.features)  # type: ignore[arg-type]
    _speak(front.url, voice, text="two")
    assert len(back.app.features) == cached  # type: ignore[arg-type]


def test_backend_health_and_auth(split) -> None:
    back, _, _ = split
    assert requests.get(f"{back.url}{wire.HEALTH_PATH}", timeout=5).json()["status"] == "ready"
    assert requests.get(f"{back.url}/api/v1/audio/reference_audio", headers=AUTH, timeout=5).status_code == 401
    bad = requests.post(f"{back.url}{wire.FEATURES_PATH}", headers={"Authorization": "Bearer wrong"}, data=b"x",
                        timeout=5)
    assert bad.status_code == 401
    public = requests.post(f"{back.url}{wire.FEATURES_PATH}", headers=AUTH, data=b"x", timeout=5)
    assert public.status_code == 401  # a public token is no internal token
    with pytest.raises(websocket.WebSocketBadStatusException) as err:
        websocket.create_connection(f"ws://127.0.0.1:{back.port}{wire.JOBS_PATH}",
                                    header={"Authorization": "Bearer wrong"}, timeout=5)
    assert err.value.status_code == 401


def _voice_prompt() -> VoicePrompt:
    return FakeExtractor()(np.zeros(16000, np.float32), 16000, "transcript")


def _run_remote(url: str, job: SpeechJob, pieces: tuple[tuple[int, ...], ...], timeout_s: float = 5.0) -> list[Any]:
    """Submit one job through a RemoteEngine on a private loop; the events the sink got, in order."""
    import asyncio

    remote = RemoteEngine(url, INTERNAL, fake_text_preparer(FakeEngine()))  # type: ignore[arg-type]

    async def go() -> list[Any]:
        events: list[Any] = []
        done = asyncio.Event()

        def sink(event: Any) -> None:
            events.append(event)
            if isinstance(event, (Finished, Failed)):
                done.set()

        remote.submit(PreparedJob(job, pieces=pieces), sink)
        await asyncio.wait_for(done.wait(), timeout_s)
        await asyncio.sleep(0.05)  # nothing may follow the final event
        return events

    return asyncio.run(go())


def test_a_backend_that_closes_mid_stream_fails_the_job_promptly(tmp_path: Path) -> None:
    engine = FakeBackendEngine(chunk_chars=2, delay_s=0.05)
    with backend_server(tmp_path, engine) as back:
        import threading
        threading.Timer(0.2, lambda: back.call(lambda: [c.abort() for c in list(back.app.connections)])).start()
        job = SpeechJob("r1", Mode.ZERO_SHOT, _voice_prompt(), text="x" * 40)
        events = _run_remote(back.url, job, (tuple(map(ord, "x" * 40)),))
    assert isinstance(events[0], AudioChunk) and isinstance(events[0].metrics, ChunkMetrics)
    assert isinstance(events[-1], Failed) and "before it ended" in events[-1].message
    assert sum(isinstance(e, (Finished, Failed)) for e in events) == 1


def test_an_unreachable_backend_fails_the_job_as_overloaded() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    events = _run_remote(f"http://127.0.0.1:{port}", SpeechJob("r", Mode.ZERO_SHOT, _voice_prompt(), text="a"),
                         ((97,),))
    assert len(events) == 1 and isinstance(events[0], Failed) and events[0].code.value == "Overloaded"


def test_duplex_text_is_forwarded_as_it_arrives(split) -> None:
    """Audio for the first piece comes back before finish-task is sent: nothing waits for the whole text."""
    _, front, _ = split
    ws = websocket.create_connection(f"ws://127.0.0.1:{front.port}/api-ws/v1/audio/speech", header=AUTH, timeout=5)
    try:
        ws.send(run_task("t1", _voice(front), output_format="pcm"))
        assert json.loads(ws.recv())["header"]["event"] == "task-started"
        ws.send(continue_task("t1", "first piece"))
        assert json.loads(ws.recv())["header"]["event"] == "result-generated"  # before finish-task
        ws.send(finish_task("t1"))
        events = []
        while not events or events[-1] not in ("task-finished", "task-failed"):
            events.append(json.loads(ws.recv())["header"]["event"])
        assert events[-1] == "task-finished"
    finally:
        ws.close()


def test_a_backend_that_lost_the_voice_asks_for_it_again(split) -> None:
    """The frontend sends only the hash of a voice it sent before; a backend that evicted it (or restarted)
    answers need_voice and gets the features, invisibly to the client."""
    back, front, _ = split
    voice = _voice(front)
    first = _speak(front.url, voice, text="before")
    back.call(lambda: back.app.features.clear())  # type: ignore[union-attr]
    again = _speak(front.url, voice, text="before")
    assert again["output"]["audio"]["data"] == first["output"]["audio"]["data"]
    assert len(back.app.features) == 1  # type: ignore[arg-type]


def test_the_frontend_reports_the_backends_load(split) -> None:
    _, front, _ = split
    _speak(front.url, _voice(front), text="load")
    remote = front.app.engine
    assert isinstance(remote, RemoteEngine) and remote.can_admit() and remote.stats().waiting == 0
    assert front.call(lambda: len(remote.jobs)) == 0  # finished jobs are forgotten


def test_without_its_backend_the_frontend_answers_503_with_retry_after(tmp_path: Path) -> None:
    with backend_server(tmp_path / "b") as back, frontend_server(tmp_path / "f", back.url) as front:
        voice = _voice(front)
        back.stop()
        r = requests.post(f"{front.url}/api/v1/audio/speech", headers=AUTH, json=speech_body(voice), timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["code"] == "Overloaded"
        r = upload(requests, front.url)
        assert r.status_code == 503 and r.json()["code"] == "Overloaded", r.text


def test_a_client_that_goes_away_cancels_the_backend_job(tmp_path: Path) -> None:
    import time

    engine = FakeBackendEngine(chunk_chars=2, delay_s=0.05)  # 60 characters: 1.5 s if left to run
    with backend_server(tmp_path / "b", engine) as back, frontend_server(tmp_path / "f", back.url) as front:
        r = requests.post(f"{front.url}/api/v1/audio/speech", headers=AUTH,
                          json=speech_body(_voice(front), text="x" * 60, stream=True), stream=True, timeout=10)
        next(r.iter_lines())  # the first event has come: the job runs on the backend
        started = time.monotonic()
        r.close()
        while engine.running and time.monotonic() - started < 1.0:
            time.sleep(0.02)
        assert engine.running == 0 and time.monotonic() - started < 1.0


def test_a_frontend_without_the_tokenizer_files_says_so(tmp_path: Path) -> None:
    cfg = ServerConfig(role="frontend", data_dir=tmp_path, tokens=(TOKEN,), internal_token=INTERNAL,
                       backends=("http://127.0.0.1:1",))
    with pytest.raises(SystemExit, match="tokenizer"):
        create_app(cfg)


def test_the_backend_answers_a_malformed_frame_with_failed_and_closes(split) -> None:
    back, _, _ = split
    ws = websocket.create_connection(f"ws://127.0.0.1:{back.port}{wire.JOBS_PATH}",
                                     header={"Authorization": f"Bearer {INTERNAL}"}, timeout=5)
    try:
        ws.send("not json")
        msg = wire.Reader(to_backend=False).feed(ws.recv())
        assert isinstance(msg, wire.Failed) and msg.code.value == "BadRequest" and "not JSON" in msg.message
        ws.recv()  # the close frame
        assert not ws.connected
    finally:
        ws.close()
