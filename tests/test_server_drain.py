"""SIGTERM's drain on both roles, in process (ServerThread.begin_drain is what the signal starts): readiness
answers 503 at once while the listener stays open, new work gets a retryable 503, in-flight streams finish,
then the listener closes. And the backend's /metrics (internal token)."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import requests
import websocket
from sseclient import SSEClient

from protocol import internal as wire
from tests.fakes import FakeBackendEngine, FakeEngine
from tests.server_helpers import AUTH, running_server, speech_body, upload
from tests.test_server_split import INTERNAL, backend_server, frontend_server


def _stream_in_thread(url: str, voice: str, text: str) -> tuple[threading.Thread, list[dict], threading.Event]:
    events: list[dict] = []
    started = threading.Event()

    def go() -> None:
        r = requests.post(f"{url}/api/v1/audio/speech", headers=AUTH, json=speech_body(voice, text=text, stream=True),
                          stream=True, timeout=30)
        assert r.status_code == 200, r.text
        try:
            for m in SSEClient(r).events():
                events.append(json.loads(m.data))
                started.set()
        except requests.RequestException:  # a drain past its deadline cuts the stream
            events.append({"cut": True})

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, events, started


def test_public_drain_keeps_the_listener_open_refuses_new_work_and_finishes_streams(tmp_path: Path) -> None:
    with running_server(tmp_path, FakeEngine(delay_s=0.05, chunk_chars=4), shutdown_deadline_s=10) as srv:
        voice = upload(requests, srv.url).json()["id"]
        assert requests.get(f"{srv.url}/ready", timeout=5).json() == {"status": "ready"}
        t, events, started = _stream_in_thread(srv.url, voice, "x" * 60)  # ~15 chunks, ~0.75 s
        assert started.wait(5)
        done = srv.begin_drain()
        time.sleep(0.05)
        ready = requests.get(f"{srv.url}/ready", timeout=5)
        assert ready.status_code == 503 and ready.headers["retry-after"] == "1"
        assert ready.json() == {"status": "draining"}
        assert requests.get(f"{srv.url}/health", timeout=5).status_code == 200  # liveness: the loop answers
        new = requests.post(f"{srv.url}/api/v1/audio/speech", headers=AUTH, json=speech_body(voice), timeout=5)
        assert new.status_code == 503 and "retry-after" in new.headers, new.text
        assert not done.done()
        t.join(10)
        assert events and events[-1]["output"]["finish_reason"] == "stop"
        done.result(10)
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{srv.url}/health", timeout=2)


def test_a_drain_cancels_what_outlives_the_deadline(tmp_path: Path) -> None:
    with running_server(tmp_path, FakeEngine(delay_s=0.1, chunk_chars=1), shutdown_deadline_s=0.5) as srv:
        voice = upload(requests, srv.url).json()["id"]
        t, _events, started = _stream_in_thread(srv.url, voice, "x" * 200)  # ~20 s of fake model time
        assert started.wait(5)
        begin = time.monotonic()
        srv.begin_drain().result(10)
        assert time.monotonic() - begin < 3
        t.join(5)
        assert not t.is_alive()


def test_backend_drain_readiness_503_and_jobs_refused(tmp_path: Path) -> None:
    engine = FakeBackendEngine(chunk_chars=2, delay_s=0.05)
    with backend_server(tmp_path / "b", engine) as back, frontend_server(tmp_path / "f", back.url) as front:
        voice = upload(requests, front.url).json()["id"]
        t, events, started = _stream_in_thread(front.url, voice, "y" * 40)
        assert started.wait(5)
        done = back.begin_drain()
        time.sleep(0.05)
        for path in (wire.HEALTH_PATH, "/ready"):
            r = requests.get(f"{back.url}{path}", timeout=5)
            assert r.status_code == 503 and r.headers["retry-after"] == "1", path
        with pytest.raises(websocket.WebSocketBadStatusException) as err:
            websocket.create_connection(f"ws://127.0.0.1:{back.port}{wire.JOBS_PATH}",
                                        header={"Authorization": f"Bearer {INTERNAL}"}, timeout=5)
        assert err.value.status_code == 503
        t.join(10)
        assert events[-1]["output"]["finish_reason"] == "stop"  # the stream in flight finished
        done.result(10)


def test_backend_metrics_need_the_internal_token_and_count_jobs(tmp_path: Path) -> None:
    with backend_server(tmp_path / "b", FakeBackendEngine(chunk_chars=3)) as back, \
            frontend_server(tmp_path / "f", back.url) as front:
        assert requests.get(f"{back.url}/metrics", timeout=5).status_code == 401
        assert requests.get(f"{back.url}/metrics", headers=AUTH, timeout=5).status_code == 401  # public token
        voice = upload(requests, front.url).json()["id"]
        r = requests.post(f"{front.url}/api/v1/audio/speech", headers=AUTH, json=speech_body(voice, text="abcdefghi"),
                          timeout=10)
        assert r.status_code == 200, r.text
        m = requests.get(f"{back.url}/metrics", headers={"Authorization": f"Bearer {INTERNAL}"}, timeout=5)
        assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
        values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                  for line in m.text.splitlines() if line and not line.startswith("#")}
        assert values["cosyserve_backend_queue_depth"] == 0
        assert values["cosyserve_backend_running_jobs"] == 0
        assert 0 <= values["cosyserve_backend_batch_occupancy"] <= 1
        assert values["cosyserve_backend_llm_tokens_total"] > 0
        assert values['cosyserve_backend_job_outcomes_total{outcome="finished"}'] == 1
        assert values['cosyserve_backend_job_outcomes_total{outcome="refused"}'] == 0
        assert "# TYPE cosyserve_backend_llm_tokens_total counter" in m.text
