"""The frontend's routing over several backends (server/backend_pool.py + RemoteEngine), in one process:
`--role backend` servers with fake engines, a `--role frontend` server in front of them."""
from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from server.backend_pool import Backend
from server.config import ServerConfig
from server.remote_engine import RemoteEngine
from server.server_thread import ServerThread
from server.serving import start
from server.wiring import create_app
from tests.fakes import FakeBackendEngine, FakeEngine, FakeExtractor, fake_text_preparer
from tests.server_helpers import AUTH, TOKEN, speech_body, upload
from tests.test_server_split import INTERNAL, backend_server


class PortServerThread(ServerThread):
    """A ServerThread on a given port: a backend "restarted" where the frontend knows it."""

    def __init__(self, app: Any, port: int) -> None:
        super().__init__(app)
        self._want = port

    async def _start(self) -> None:
        self._server = await start(self.app, "127.0.0.1", self._want)
        self.port = self._server.sockets[0].getsockname()[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: nothing listens there


def _remote(urls: Sequence[str], **kw: Any) -> RemoteEngine:
    return RemoteEngine(urls, INTERNAL, fake_text_preparer(FakeEngine()), check_s=60.0, **kw)  # type: ignore[arg-type]


@contextmanager
def frontend(data_dir: Path, remote: RemoteEngine) -> Iterator[ServerThread]:
    cfg = ServerConfig(role="frontend", port=0, data_dir=data_dir, tokens=(TOKEN,), internal_token=INTERNAL,
                       backends=tuple(b.url for b in remote.pool.backends()), workers=2)
    with ServerThread(create_app(cfg, engine=remote, extract_prompt=FakeExtractor())) as srv:
        yield srv


def _on_loop(srv: ServerThread, coro: Any) -> Any:
    assert srv._loop is not None
    return asyncio.run_coroutine_threadsafe(coro, srv._loop).result(5)


def _voice(front: ServerThread) -> str:
    r = upload(requests, front.url)
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def _speak(front: ServerThread, voice: str, text: str = "hello there") -> requests.Response:
    return requests.post(f"{front.url}/api/v1/audio/speech", headers=AUTH, json=speech_body(voice, text=text),
                         timeout=10)


def _backends(front: ServerThread) -> list[Backend]:
    remote = front.app.engine
    assert isinstance(remote, RemoteEngine)
    return front.call(remote.pool.backends)


def test_least_loaded_routing_spreads_concurrent_jobs_over_both_backends(tmp_path: Path) -> None:
    e1, e2 = FakeBackendEngine(chunk_chars=2, delay_s=0.02), FakeBackendEngine(chunk_chars=2, delay_s=0.02)
    with backend_server(tmp_path / "b1", e1) as b1, backend_server(tmp_path / "b2", e2) as b2, \
            frontend(tmp_path / "f", _remote([b1.url, b2.url])) as front:
        voice = _voice(front)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: _speak(front, voice, "x" * 20), range(8)))
        assert [r.status_code for r in answers] == [200] * 8
        assert len(e1.jobs) + len(e2.jobs) == 8 and min(len(e1.jobs), len(e2.jobs)) >= 3  # spread, not piled
        metrics = requests.get(f"{front.url}/metrics", headers=AUTH, timeout=5).text
        for b in _backends(front):
            assert f'cosyserve_backend_jobs_total{{backend="{b.key}"}} {b.jobs}' in metrics
            assert f'cosyserve_backend_inflight{{backend="{b.key}"}} 0' in metrics
            assert f'cosyserve_backend_up{{backend="{b.key}"}} 1' in metrics


def test_a_refusing_backend_gets_the_job_retried_on_the_other(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{_free_port()}"
    engine = FakeBackendEngine(chunk_chars=4)
    with backend_server(tmp_path / "b", engine) as live, frontend(tmp_path / "f", _remote([dead, live.url])) as front:
        voice = _voice(front)
        r = _speak(front, voice)
        assert r.status_code == 200, r.text  # invisible to the client
        down, up = _backends(front)
        assert (down.failed, down.retries, up.jobs) == (1, 1, 1) and len(engine.jobs) == 1
        assert down.chunks == 0 < up.chunks  # the audio came from the live one
        metrics = requests.get(f"{front.url}/metrics", headers=AUTH, timeout=5).text
        assert f'cosyserve_backend_chunks_total{{backend="{up.key}"}} {up.chunks}' in metrics
        assert f'cosyserve_backend_retries_total{{backend="{down.key}"}} 1' in metrics
        assert f'cosyserve_backend_failures_total{{backend="{down.key}"}} 1' in metrics


def test_a_draining_backend_is_retried_elsewhere_then_skipped(tmp_path: Path) -> None:
    e1, e2 = FakeBackendEngine(chunk_chars=4), FakeBackendEngine(chunk_chars=4)
    with backend_server(tmp_path / "b1", e1) as b1, backend_server(tmp_path / "b2", e2) as b2, \
            frontend(tmp_path / "f", _remote([b1.url, b2.url])) as front:
        voice = _voice(front)
        b1.call(lambda: setattr(b1.app, "draining", True))
        assert _speak(front, voice).status_code == 200  # b1 refused it (busy): retried on b2
        remote = front.app.engine
        assert isinstance(remote, RemoteEngine)
        first, _ = _backends(front)
        _on_loop(front, remote.check(first))  # the health check says draining: no new jobs there
        assert front.call(lambda: first.draining and first.retries == 1)
        for _ in range(3):
            assert _speak(front, voice).status_code == 200
        assert (len(e1.jobs), len(e2.jobs)) == (0, 4)


def test_an_ejected_backend_is_readmitted_when_its_health_check_answers(tmp_path: Path) -> None:
    port = _free_port()
    engine = FakeBackendEngine(chunk_chars=4)
    with backend_server(tmp_path / "b", engine) as live, \
            frontend(tmp_path / "f", _remote([f"http://127.0.0.1:{port}", live.url], eject_after=2)) as front:
        voice = _voice(front)
        remote = front.app.engine
        assert isinstance(remote, RemoteEngine)
        down, _ = _backends(front)
        for _ in range(4):
            assert _speak(front, voice).status_code == 200  # each try on the dead one was retried
        # its first health check (at start) and one refused job, or two refused jobs: 2 in a row
        assert front.call(lambda: (down.ejected, down.ejections, down.failed == down.retries >= 1)) == (True, 1, True)
        _on_loop(front, remote.check(down))  # still down: stays out
        assert front.call(lambda: down.ejected)
        restarted = FakeBackendEngine(chunk_chars=4)
        cfg = ServerConfig(role="backend", port=0, data_dir=tmp_path / "b2", internal_token=INTERNAL, workers=2)
        with PortServerThread(create_app(cfg, engine=restarted, extract_prompt=FakeExtractor()), port):
            _on_loop(front, remote.check(down))
            assert front.call(lambda: (down.ejected, down.failures)) == (False, 0)
            for _ in range(4):
                assert _speak(front, voice).status_code == 200
            assert len(restarted.jobs) >= 1  # work reaches it again


def test_with_every_backend_down_the_job_fails_at_once_with_503(tmp_path: Path) -> None:
    remote = _remote([f"http://127.0.0.1:{_free_port()}", f"http://127.0.0.1:{_free_port()}"], eject_after=1)
    with frontend(tmp_path / "f", remote) as front:
        voice = _voice(front)  # uploads need no backend here (FakeExtractor)
        started = time.monotonic()
        r = _speak(front, voice)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["code"] == "Overloaded"
        assert front.call(lambda: all(b.ejected for b in remote.pool.backends()))  # tried both, once each
        r = _speak(front, voice)  # now refused before anything is submitted
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert time.monotonic() - started < 1.0


def test_backend_dns_is_reconciled_without_a_restart(tmp_path: Path) -> None:
    answers: list[list[tuple[str, int]]] = [[("10.0.0.1", 8001), ("10.0.0.2", 8001)]]

    async def resolver(name: str, port: int) -> list[tuple[str, int]]:
        assert (name, port) == ("backends.svc", 8001)
        answer = answers[-1]
        if not answer:
            raise OSError("no such host")
        return answer

    remote = RemoteEngine([], INTERNAL, fake_text_preparer(FakeEngine()), dns="backends.svc:8001",  # type: ignore[arg-type]
                          resolver=resolver)
    keys = lambda: [b.key for b in remote.pool.backends()]
    asyncio.run(remote.resolve())
    assert keys() == ["10.0.0.1:8001", "10.0.0.2:8001"] and remote.can_admit()
    answers.append([("10.0.0.2", 8001), ("fd00::7", 8001)])
    asyncio.run(remote.resolve())
    assert keys() == ["10.0.0.2:8001", "[fd00::7]:8001"]
    answers.append([])  # the lookup fails: keep what we had
    asyncio.run(remote.resolve())
    assert keys() == ["10.0.0.2:8001", "[fd00::7]:8001"]
    assert "DNS backends.svc:8001" in remote.describe()


def test_the_health_check_reports_the_backends_load(tmp_path: Path) -> None:
    engine = FakeBackendEngine(chunk_chars=2, delay_s=0.2)
    with backend_server(tmp_path / "b", engine) as back:
        remote = _remote([back.url])
        backend = remote.pool.backends()[0]
        engine.admit = False  # the backend says it is full
        asyncio.run(remote.check(backend))
        assert backend.can_admit is False and not remote.can_admit()
        engine.admit = True
        asyncio.run(remote.check(backend))
        assert backend.can_admit and remote.can_admit() and backend.failures == 0
