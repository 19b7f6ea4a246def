"""Tests: serve a ServerState on 127.0.0.1:<free port> in a background thread with its own loop."""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Self, TypeVar

import uvloop

from server.serving import drain, start
from server.state import ServerState

T = TypeVar("T")


class ServerThread:
    def __init__(self, app: ServerState) -> None:
        self.app = app  # the served state (tests read config, store, fakes through it)
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._drain: concurrent.futures.Future[None] | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="test-server")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        self._loop = uvloop.new_event_loop()
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _start(self) -> None:
        self._server = await start(self.app, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the server loop (to read state safely)."""
        assert self._loop is not None
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._loop.call_soon_threadsafe(lambda: fut.set_result(fn()))
        return fut.result(5)

    def begin_drain(self) -> concurrent.futures.Future[None]:
        """Start the drain (what SIGTERM does) without waiting for it; `stop()` afterwards finishes."""
        assert self._loop is not None and self._server is not None
        self._drain = asyncio.run_coroutine_threadsafe(drain(self.app, self._server), self._loop)
        return self._drain

    def stop(self) -> None:
        if self._loop is None or not self._thread.is_alive():
            return
        assert self._server is not None
        if self._drain is None:
            self._drain = asyncio.run_coroutine_threadsafe(drain(self.app, self._server), self._loop)
        self._drain.result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
