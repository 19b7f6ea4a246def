"""Failover with real processes (tiny model, loopback): 1 frontend + 2 backends. Both backends get work under
concurrency; `kill -9` of the backend running a stream ends that stream within 2 s (SSE: an error event, then
the end of the stream; WS: task-failed, and the connection runs a next task; non-stream: JSON 502), new
requests succeed on the other backend, and the killed one is re-admitted once it is back; SIGTERM of a
backend under load loses no request (its streams finish, the rest is refused and retried elsewhere) and it
exits 0."""
from __future__ import annotations

import base64
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import websocket
from sseclient import SSEClient

from bench.servers import stop, wait_healthy
from tests.server_helpers import AUTH, TOKEN, continue_task, finish_task, run_task, speech_body, upload
from tests.test_server_split_processes import INTERNAL, _free_port, _spawn

LONG = "The quick brown fox jumps over the lazy dog. " * 12  # many chunks: seconds of synthesis
INTERNAL_AUTH = {"Authorization": f"Bearer {INTERNAL}"}


class Cluster:
    def __init__(self, model_dir: Path, tmp: Path) -> None:
        self.tmp = tmp
        self.common = ["--host", "127.0.0.1", "--model-dir", str(model_dir), "--internal-token", INTERNAL,
                       "--text-process", "0", "--workers", "2"]
        self.ports = [_free_port(), _free_port()]
        self.backends: list[subprocess.Popen[bytes]] = [self._backend(i) for i in range(2)]
        self.fport = _free_port()
        self.frontend = _spawn(["--role", "frontend", "--port", str(self.fport), "--data-dir", str(tmp / "f"),
                                "--token", TOKEN, "--backend-check-s", "0.5", "--backend-eject-after", "2",
                                *[a for p in self.ports for a in ("--backend", f"http://127.0.0.1:{p}")],
                                *self.common], tmp / "frontend.log")
        for i in range(2):
            wait_healthy(self.burl(i), self.backends[i], 120)
        wait_healthy(self.url, self.frontend, 60)
        self.wait_admitted(0)
        self.wait_admitted(1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.fport}"

    def burl(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    def _backend(self, i: int) -> subprocess.Popen[bytes]:
        return _spawn(["--role", "backend", "--port", str(self.ports[i]), "--data-dir", str(self.tmp / f"b{i}"),
                       "--warmup", "0", "--shutdown-deadline-s", "90", *self.common], self.tmp / f"backend{i}.log")

    def restart(self, i: int) -> None:
        self.backends[i] = self._backend(i)
        wait_healthy(self.burl(i), self.backends[i], 120)

    def metrics(self, i: int) -> dict[str, float]:
        text = requests.get(f"{self.burl(i)}/metrics", headers=INTERNAL_AUTH, timeout=5).text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    def frontend_metrics(self) -> str:
        return requests.get(f"{self.url}/metrics", headers=AUTH, timeout=5).text

    def chunks_received(self) -> list[float]:
        """Audio chunks the frontend has received from each backend (a job with one is not retried)."""
        text = self.frontend_metrics()
        return [float(text.split(f'cosyserve_backend_chunks_total{{backend="127.0.0.1:{p}"}} ')[1].split()[0])
                for p in self.ports]

    def busy(self, wait_s: float = 20) -> int:
        """The backend running a job whose first chunk has reached the frontend (waits up to `wait_s`). The
        frontend's count, not the backend's: a chunk the backend sent may still be in flight when it is
        killed, and a job whose first chunk never arrived is retried elsewhere, invisibly, by design."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            for i, n in enumerate(self.chunks_received()):
                if n > self.seen[i]:
                    return i
            time.sleep(0.05)
        raise TimeoutError("no backend started streaming")

    def mark(self) -> None:
        self.seen = self.chunks_received()

    def frontend_up(self, i: int) -> bool:
        text = self.frontend_metrics()
        return f'cosyserve_backend_up{{backend="127.0.0.1:{self.ports[i]}"}} 1' in text

    def kill_restart_and_readmit(self, i: int, during: Callable[[], None]) -> None:
        """kill -9 backend i, run `during` (new requests go to the other), restart it, wait until re-admitted."""
        self.backends[i].kill()
        self.backends[i].wait(5)
        during()
        self.restart(i)
        self.wait_admitted(i)

    def wait_admitted(self, i: int) -> None:
        deadline = time.monotonic() + 10
        while not self.frontend_up(i):
            assert time.monotonic() < deadline, f"backend {i} was not (re-)admitted"
            time.sleep(0.1)

    def close(self) -> None:
        stop(self.frontend)
        for proc in self.backends:
            stop(proc)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tiny_model_dir, tmp_path_factory.mktemp("failover"))
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def voice(cluster: Cluster) -> str:
    r = upload(requests, cluster.url)
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def _speak(url: str, voice: str, text: str = "hello world", timeout_s: float = 60) -> requests.Response:
    return requests.post(f"{url}/api/v1/audio/speech", headers=AUTH, json=speech_body(voice, text=text),
                         timeout=timeout_s)


def _parallel(n: int, fn: Callable[[int], Any]) -> list[Any]:
    out: list[Any] = [None] * n

    def run(k: int) -> None:
        try:
            out[k] = fn(k)
        except Exception as exc:  # noqa: BLE001 - reported by the caller's assert
            out[k] = exc

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_both_backends_get_work_under_concurrency(cluster: Cluster, voice: str) -> None:
    before = [cluster.metrics(i)['cosyserve_backend_job_outcomes_total{outcome="finished"}'] for i in range(2)]
    answers = _parallel(6, lambda k: _speak(cluster.url, voice, f"hello number {k}, how are you?"))
    assert all(isinstance(r, requests.Response) and r.status_code == 200 for r in answers), answers
    after = [cluster.metrics(i)['cosyserve_backend_job_outcomes_total{outcome="finished"}'] for i in range(2)]
    assert all(a > b for a, b in zip(after, before)), (before, after, requests.get(
        f"{cluster.url}/metrics", headers=AUTH, timeout=5).text.split("# HELP cosyserve_backend_inflight")[-1])


def test_kill9_mid_sse_stream_ends_it_with_an_error_event_then_reroutes(cluster: Cluster, voice: str) -> None:
    cluster.mark()
    r = requests.post(f"{cluster.url}/api/v1/audio/speech", headers=AUTH,
                      json=speech_body(voice, text=LONG, stream=True), stream=True, timeout=30)
    assert r.status_code == 200
    events = SSEClient(r).events()
    assert json.loads(next(events).data)["output"]["finish_reason"] is None
    victim = cluster.busy()

    def during() -> None:
        killed = time.monotonic()
        rest = [json.loads(m.data) for m in events]  # the stream ends (no hang)
        assert time.monotonic() - killed < 2
        assert rest and rest[-1]["output"]["finish_reason"] == "error", rest[-1:]
        for _ in range(3):  # new requests succeed on the other backend
            assert _speak(cluster.url, voice).status_code == 200

    cluster.kill_restart_and_readmit(victim, during)


def test_kill9_mid_ws_task_fails_it_and_the_connection_runs_the_next(cluster: Cluster, voice: str) -> None:
    ws = websocket.create_connection(f"ws://127.0.0.1:{cluster.fport}/api-ws/v1/audio/speech", header=AUTH,
                                     timeout=30)
    try:
        cluster.mark()
        ws.send(run_task("t1", voice, output_format="pcm"))
        assert json.loads(ws.recv())["header"]["event"] == "task-started"
        ws.send(continue_task("t1", LONG))
        ws.send(finish_task("t1"))
        assert json.loads(ws.recv())["header"]["event"] == "result-generated"
        victim = cluster.busy()

        def during() -> None:
            killed = time.monotonic()
            event = ""
            while event not in ("task-finished", "task-failed"):
                event = json.loads(ws.recv())["header"]["event"]
            assert event == "task-failed" and time.monotonic() - killed < 2
            ws.send(run_task("t2", voice, output_format="pcm"))  # the same connection, the other backend
            assert json.loads(ws.recv())["header"]["event"] == "task-started"
            ws.send(continue_task("t2", "hello there."))
            ws.send(finish_task("t2"))
            audio, event = b"", ""
            while event not in ("task-finished", "task-failed"):
                msg = json.loads(ws.recv())
                event = msg["header"]["event"]
                if event == "result-generated":
                    audio += base64.b64decode(msg["payload"]["output"]["audio"]["data"])
            assert event == "task-finished" and audio

        cluster.kill_restart_and_readmit(victim, during)
    finally:
        ws.close()


def test_kill9_mid_non_stream_job_is_a_json_502(cluster: Cluster, voice: str) -> None:
    cluster.mark()
    box: list[requests.Response] = []
    # Non-stream: the first chunk is a whole sentence piece (~70 text tokens; on random weights it may run
    # to its max length), so it can take tens of seconds on 2 busy cores; the kill comes after it.
    t = threading.Thread(target=lambda: box.append(_speak(cluster.url, voice, LONG, timeout_s=300)))
    t.start()
    victim = cluster.busy(wait_s=120)

    def during() -> None:
        killed = time.monotonic()
        t.join(10)
        assert box and time.monotonic() - killed < 2
        r = box[0]
        assert r.status_code == 502 and r.headers["content-type"].startswith("application/json"), r.text
        assert r.json()["code"] == "InternalError" and r.json()["request_id"]
        assert _speak(cluster.url, voice).status_code == 200

    cluster.kill_restart_and_readmit(victim, during)


def test_zz_sigterm_of_a_backend_under_load_loses_no_request(cluster: Cluster, voice: str) -> None:
    cluster.mark()

    def sse(k: int) -> str:
        r = requests.post(f"{cluster.url}/api/v1/audio/speech", headers=AUTH,
                          json=speech_body(voice, text=f"request {k}. " + LONG[:45], stream=True), stream=True,
                          timeout=150)
        if r.status_code != 200:
            return f"HTTP {r.status_code}"
        return str([json.loads(m.data) for m in SSEClient(r).events()][-1]["output"]["finish_reason"])

    box: list[list[Any]] = []
    t = threading.Thread(target=lambda: box.append(_parallel(4, sse)))
    t.start()
    victim = cluster.busy()
    cluster.backends[victim].terminate()  # SIGTERM: the drain; its streams finish
    late = _parallel(2, lambda k: _speak(cluster.url, voice, f"late {k}"))  # refused there, retried elsewhere
    t.join(150)
    assert box and box[0] == ["stop"] * 4, box  # the drain let them finish (a deadline of 90 s: busy CI cores)
    assert [r.status_code for r in late] == [200, 200], late
    assert cluster.backends[victim].wait(100) == 0
    cluster.restart(victim)
