"""Faults in the middle of serving: an engine that raises for one request, a voice deleted while it is in use.

- An engine exception (in prepare, in submit, in a duplex piece's encoding) or a `Failed` mid-stream fails
  that request only, with the InternalError the README promises on each transport (HTTP: a 500 JSON error
  before any audio; SSE after audio began: an error event; WebSocket: task-failed), while concurrent
  requests complete, the server stays up, and /metrics counts it.
- A voice deleted while syntheses use it: those finish whole (the job holds its features), the id is 404
  from then on, its files / objects are gone; deleted while its features load: a 404, never a 500.
"""
from __future__ import annotations

import base64
import concurrent.futures
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import requests
import websocket
from sseclient import SSEClient

from scheduler.jobs import AudioChunk, ErrorCode, EventSink, Failed, Finished, PreparedJob, SpeechJob
from server.paths import REFERENCE as REF
from tests.fakes import SAMPLES_PER_CHAR, FakeEngine, _FakeJob
from tests.server_helpers import (
    AUTH,
    continue_task,
    finish_task,
    run_task,
    running_server,
    speech_body,
    upload,
)

SPEECH = "/api/v1/audio/speech"


class FaultyEngine(FakeEngine):
    """FakeEngine that fails the requests whose text asks for it, and only those: "prepare-boom" raises in
    prepare, "submit-boom" in submit, "encode-boom" (a duplex piece) in encode_text, "stream-boom" sends
    `Failed` after its first chunk (an engine-side error mid-stream)."""

    def prepare(self, job: SpeechJob) -> PreparedJob:
        if job.text and "prepare-boom" in job.text:
            raise RuntimeError("prepare exploded")
        return super().prepare(job)

    def encode_text(self, text: str) -> list[int]:
        if "encode-boom" in text:
            raise RuntimeError("encode exploded")
        return super().encode_text(text)

    def submit(self, prepared: PreparedJob, sink: EventSink) -> _FakeJob:
        text = prepared.job.text or ""
        if "submit-boom" in text:
            raise RuntimeError("submit exploded")
        if "stream-boom" in text:
            sink = _fail_after_first_chunk(sink, prepared.request_id)
        return super().submit(prepared, sink)


def _fail_after_first_chunk(sink: EventSink, request_id: str) -> EventSink:
    """The first chunk goes out; whatever the engine says next becomes a `Failed`, and nothing after it."""
    state = {"chunks": 0, "failed": False}

    def failing(event: Any) -> None:
        if state["failed"]:
            return
        if state["chunks"] == 0 or not isinstance(event, (AudioChunk, Finished)):
            state["chunks"] += isinstance(event, AudioChunk)
            sink(event)
            return
        state["failed"] = True
        sink(Failed(request_id, ErrorCode.INTERNAL_ERROR, "the engine failed mid-stream"))

    return failing


def _metric(url: str, line_start: str) -> float:
    text = requests.get(f"{url}/metrics", headers=AUTH, timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start))


def _one_shot(url: str, voice: str, text: str) -> requests.Response:
    return requests.post(f"{url}{SPEECH}", headers=AUTH, timeout=20,
                         json=speech_body(voice, text=text, output_format="pcm", sample_rate=24000))


def _sse(url: str, voice: str, text: str) -> tuple[int, list[dict[str, Any]] | dict[str, Any]]:
    r = requests.post(f"{url}{SPEECH}", headers=AUTH, stream=True, timeout=20,
                      json=speech_body(voice, text=text, stream=True, output_format="pcm", sample_rate=24000))
    if r.headers["content-type"].startswith("application/json"):
        return r.status_code, r.json()
    return r.status_code, [json.loads(e.data) for e in SSEClient(r).events()]


def test_an_engine_exception_fails_that_request_only(tmp_path: Path) -> None:
    engine = FaultyEngine(delay_s=0.01, chunk_chars=4)
    with running_server(tmp_path, engine) as srv:
        voice = upload(requests, srv.url).json()["id"]
        good = "a healthy request, spoken whole"
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            fine = [pool.submit(_one_shot, srv.url, voice, f"{good} {n}") for n in range(5)]
            fine_sse = [pool.submit(_sse, srv.url, voice, f"{good} {n}") for n in range(2)]
            bad = {marker: pool.submit(_one_shot, srv.url, voice, f"this one {marker}s")
                   for marker in ("prepare-boom", "submit-boom", "stream-boom")}
            bad_sse = {marker: pool.submit(_sse, srv.url, voice, f"this one {marker}s")
                       for marker in ("prepare-boom", "stream-boom")}
            for n, f in enumerate(fine):
                r = f.result()
                assert r.status_code == 200, r.text
                pcm = base64.b64decode(r.json()["output"]["audio"]["data"])
                assert len(pcm) == len(f"{good} {n}") * SAMPLES_PER_CHAR * 2  # the whole text, s16le
            for f in fine_sse:
                status, events = f.result()
                assert status == 200 and isinstance(events, list)
                assert events[-1]["output"]["finish_reason"] == "stop"
            for marker, f in bad.items():  # before any audio went out: a plain HTTP error
                r = f.result()
                assert r.status_code == 500, (marker, r.text)
                assert r.json()["code"] == "InternalError"
                assert set(r.json()) == {"code", "message", "request_id"}
            status, body = bad_sse["prepare-boom"].result()
            assert status == 500 and isinstance(body, dict) and body["code"] == "InternalError"
            status, events = bad_sse["stream-boom"].result()  # after audio began: an error event, the end
            assert status == 200 and isinstance(events, list) and events[0]["error"] is None
            assert events[-1]["output"]["finish_reason"] == "error"
            assert events[-1]["error"]["code"] == "InternalError"
        assert requests.get(f"{srv.url}/health", timeout=5).status_code == 200  # still up
        assert _one_shot(srv.url, voice, "and after it all").status_code == 200
        assert _metric(srv.url, 'cosyserve_errors_total{code="InternalError"}') == 5
        assert _metric(srv.url, 'cosyserve_requests_total{route="speech",status="500"}') == 4
        assert _metric(srv.url, "cosyserve_inflight") == 0 and engine.running == 0


def test_an_engine_exception_in_a_duplex_task_fails_that_task_only(tmp_path: Path) -> None:
    with running_server(tmp_path, FaultyEngine()) as srv:
        voice = upload(requests, srv.url).json()["id"]
        ws = websocket.create_connection(f"ws://127.0.0.1:{srv.port}/api-ws/v1/audio/speech", header=AUTH,
                                         timeout=10)
        try:
            outcomes = []
            for task, pieces in (("t1", ["fine, ", "then encode-boom"]), ("t2", ["a task after it"])):
                ws.send(run_task(task, voice))
                events = _task_events(ws, pieces, task)
                outcomes.append(events[-1]["header"])
            assert outcomes[0]["event"] == "task-failed" and outcomes[0]["error_code"] == "InternalError"
            assert outcomes[1]["event"] == "task-finished"  # the same connection goes on
        finally:
            ws.close()
        assert _metric(srv.url, 'cosyserve_ws_tasks_total{outcome="failed"}') == 1


def _task_events(ws: websocket.WebSocket, pieces: Sequence[str], task: str) -> list[dict[str, Any]]:
    events = [json.loads(ws.recv())]
    assert events[0]["header"]["event"] == "task-started", events
    for piece in pieces:
        ws.send(continue_task(task, piece))
    ws.send(finish_task(task))
    while events[-1]["header"]["event"] not in ("task-finished", "task-failed"):
        events.append(json.loads(ws.recv()))
    return events


# ---- a voice deleted while in use ----------------------------------------------------------------------

class GatedEngine(FakeEngine):
    """Holds every job right after its first chunk until `gate` opens: the voice is deleted meanwhile."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.gate = threading.Event()
        self.first_chunks = threading.Semaphore(0)

    def submit(self, prepared: PreparedJob, sink: EventSink) -> _FakeJob:
        held = {"done": False}

        def gated(event: Any) -> None:
            sink(event)
            if isinstance(event, AudioChunk) and not held["done"]:
                held["done"] = True
                self.first_chunks.release()
                self.gate.wait(20)  # the job's own thread: the stream stops mid-way

        return super().submit(prepared, gated)


def _delete_while_in_use(srv: Any, contents: Any) -> None:
    engine: GatedEngine = srv.app.engine
    voice = upload(requests, srv.url).json()["id"]
    text = "a sentence that is cut in the middle"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        one_shot = pool.submit(_one_shot, srv.url, voice, text)
        streamed = pool.submit(_sse, srv.url, voice, text)
        for _ in range(2):
            assert engine.first_chunks.acquire(timeout=10)  # both are mid-stream, holding the voice
        r = requests.delete(f"{srv.url}{REF}/{voice}", headers=AUTH, timeout=10)
        assert r.status_code == 200, r.text
        assert requests.get(f"{srv.url}{REF}/{voice}", headers=AUTH, timeout=10).status_code == 404
        late = _one_shot(srv.url, voice, "too late")
        assert late.status_code == 404 and late.json()["code"] == "NotFound"
        assert contents() == set()  # nothing of the voice is kept
        engine.gate.set()
        r = one_shot.result()
        assert r.status_code == 200, r.text
        assert len(base64.b64decode(r.json()["output"]["audio"]["data"])) == len(text) * SAMPLES_PER_CHAR * 2
        status, events = streamed.result()
        assert status == 200 and isinstance(events, list) and events[-1]["output"]["finish_reason"] == "stop"
        assert round(sum(e["metrics"]["speech_len"] for e in events), 3) == round(len(text) * 0.05, 3)


def test_deleting_a_voice_in_use_lets_its_syntheses_finish(tmp_path: Path) -> None:
    with running_server(tmp_path, GatedEngine(chunk_chars=4)) as srv:
        _delete_while_in_use(srv, lambda: {p.name for p in (tmp_path / "voices").iterdir()})


def test_deleting_a_voice_in_use_lets_its_syntheses_finish_s3(tmp_path: Path, s3_endpoint: str) -> None:
    from tests.s3_server import keys, new_prefix, server_options
    prefix = new_prefix()
    with running_server(tmp_path, GatedEngine(chunk_chars=4), **server_options(s3_endpoint, prefix)) as srv:
        _delete_while_in_use(srv, lambda: set(keys(s3_endpoint, prefix)))


def test_a_voice_deleted_while_its_features_load_is_404(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with running_server(tmp_path) as srv:
        voice = upload(requests, srv.url).json()["id"]
    with running_server(tmp_path) as srv:  # a fresh cache: the synthesis reads the features from disk
        import server.store as store_module
        real = store_module.prompt_from_npz

        def deleted_meanwhile(source: Any) -> Any:
            srv.app.store.delete(voice)  # after load_prompt saw the row, before it reads the file
            return real(source)

        monkeypatch.setattr(store_module, "prompt_from_npz", deleted_meanwhile)
        r = _one_shot(srv.url, voice, "hello")
        assert r.status_code == 404 and r.json()["code"] == "NotFound", r.text
