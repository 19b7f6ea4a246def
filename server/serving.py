"""Serve a built ServerState: listen, run until SIGTERM/SIGINT, then drain within the deadline."""
from __future__ import annotations

import asyncio
import logging
import signal

import uvloop

from server.connection_limit import accept
from server.loop_lag import LoopLagProbe
from server.state import ServerState
from server.wiring import startup_line

log = logging.getLogger("server")


async def start(state: ServerState, host: str, port: int) -> asyncio.base_events.Server:
    state.loop = asyncio.get_running_loop()
    # A frontend decodes nothing itself: its --max-batch says nothing about what it admits.
    state.metrics.set_limits(state.config.max_inflight,
                             state.config.max_batch if state.config.role != "frontend" else None)
    LoopLagProbe(state.loop, state.metrics.loop_lag).start()  # the loop holds its timer: no reference kept
    start_monitor = getattr(state.engine, "start_monitor", None)  # a frontend's RemoteEngine: health checks
    if callable(start_monitor):
        start_monitor()
    return await state.loop.create_server(lambda: accept(state), host, port, backlog=1024)


async def drain(state: ServerState, server: asyncio.base_events.Server) -> None:
    """Readiness goes false at once (`draining`: the readiness probes answer 503, new work a retryable 503
    with Retry-After) while the listener stays open, so a probe sees the drain rather than a refused
    connection; in-flight work finishes within the deadline, the rest is cancelled, then the listener
    closes."""
    state.draining = True
    for conn in list(state.connections):
        conn.close_if_idle()
    loop = asyncio.get_running_loop()
    end = loop.time() + state.config.shutdown_deadline_s
    while True:  # handlers that start meanwhile (probes, refusals) are short; they are waited for too
        pending = {t for t in state.tasks if not t.done()}
        left = end - loop.time()
        if not pending or left <= 0:
            break
        await asyncio.wait(pending, timeout=left)
    late = {t for t in state.tasks if not t.done()}
    for t in late:
        t.cancel()
    if late:
        await asyncio.wait(late, timeout=1.0)
    server.close()
    for conn in list(state.connections):
        conn.abort()
    await state.run_blocking(state.engine.shutdown, 1.0)
    if state.pool is not None:
        state.pool.shutdown(wait=False, cancel_futures=True)
    state.store.close()


async def serve(state: ServerState) -> None:
    server = await start(state, state.config.host, state.config.port)
    log.info("ready on %s", startup_line(state, server.sockets[0].getsockname()[1]))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining in-flight work (deadline %.1fs)", state.config.shutdown_deadline_s)
    await drain(state, server)


def run(state: ServerState) -> None:
    uvloop.run(serve(state))
