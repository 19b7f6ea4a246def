"""Build the application (store, cache, metrics, engine, thread pool) and run it on a loop.

`create_app(config, engine=..., extract_prompt=...)` takes the engine and the prompt
extractor as injected objects (tests pass fakes); `build_engine(config)` and
`build_extractor(config)` import the torch side lazily for production. `serve()` runs
until SIGTERM/SIGINT; `ServerThread` runs one on a free loopback port for tests.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

import numpy as np

from protocol.errors import NotFound, Overloaded
from scheduler.jobs import EngineProtocol, VoicePrompt
from server.config import ServerConfig
from server.metrics import Metrics
from server.store import VoiceStore
from server.store_base import VoiceStoreBase
from server.voices import VoiceCache

log = logging.getLogger("server")
T = TypeVar("T")
ExtractPrompt = Callable[[np.ndarray, int, str], VoicePrompt]


@dataclass
class App:
    config: ServerConfig
    engine: EngineProtocol
    extract_prompt: ExtractPrompt
    store: VoiceStoreBase
    voices: VoiceCache
    metrics: Metrics = field(default_factory=Metrics)
    pool: concurrent.futures.ThreadPoolExecutor | None = None
    loop: asyncio.AbstractEventLoop | None = None
    draining: bool = False
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)  # in-flight handlers, for the drain
    connections: set[Any] = field(default_factory=set)

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """CPU/disk work (decode, encode, features, fsync) goes to the pool, never the loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def voice(self, voice_id: str) -> VoicePrompt:
        prompt = self.voices.peek(voice_id)
        if prompt is not None and self.config.store == "s3" \
                and await self.run_blocking(self.store.get, voice_id) is None:
            # Replicas share the bucket: another one may have deleted the voice we cached (one GET).
            self.voices.drop(voice_id)
            raise NotFound(f"reference audio not found: {voice_id}")
        prompt = prompt or await self.run_blocking(self.voices.get, voice_id)
        if prompt is None:
            raise NotFound(f"reference audio not found: {voice_id}")
        return prompt

    def admit(self) -> None:
        """Raise 429/503 with Retry-After before anything is submitted."""
        if self.draining:
            raise Overloaded("server is shutting down", status=503, retry_after_s=self.config.retry_after_s)
        if self.metrics.inflight >= self.config.max_inflight:
            raise Overloaded("too many concurrent requests", status=429,
                             retry_after_s=self.config.retry_after_s)
        if not self.engine.can_admit():
            raise Overloaded("engine queue is full", status=503, retry_after_s=self.config.retry_after_s)


def new_request_id() -> str:
    return str(uuid.uuid4())


def create_app(config: ServerConfig, engine: EngineProtocol | None = None,
               extract_prompt: ExtractPrompt | None = None) -> App:
    model_dir = resolve_model_dir(config) if engine is None or extract_prompt is None else None
    engine = engine if engine is not None else build_engine(config, model_dir)
    extract_prompt = extract_prompt if extract_prompt is not None else build_extractor(model_dir)
    store = build_store(config)
    return App(config=config, engine=engine, extract_prompt=extract_prompt, store=store,
               voices=VoiceCache(store, config.voice_cache_size),
               pool=concurrent.futures.ThreadPoolExecutor(config.workers, thread_name_prefix="cosy-work"))


def build_store(config: ServerConfig) -> VoiceStoreBase:
    """`--store local` (default): data_dir; `--store s3`: a bucket that several replicas share."""
    if config.store == "s3":
        from server.store_s3 import S3Settings, S3VoiceStore  # lazy: boto3 is an optional extra
        return S3VoiceStore(S3Settings(
            bucket=config.s3_bucket, prefix=config.s3_prefix, endpoint_url=config.s3_endpoint,
            region=config.s3_region, access_key=config.s3_access_key, secret_key=config.s3_secret_key,
            addressing_style=config.s3_addressing_style, max_connections=config.workers + 10))  # + the list fetchers
    return VoiceStore(config.data_dir)


# ---- production wiring (torch side imported lazily) --------------------------------------------

def resolve_model_dir(config: ServerConfig) -> Path:
    if config.model_dir is not None:
        return config.model_dir
    out = config.data_dir / "tiny-model"
    for line in ("=" * 72,
                 f"NO --model-dir GIVEN: using a TINY model with RANDOM WEIGHTS at {out}",
                 "Every response will be NOISE, not speech.",
                 "Pass --model-dir /path/to/CosyVoice2-0.5B (the released directory) for real output.",
                 "=" * 72):
        log.warning(line)
    if not (out / "cosyvoice2.yaml").exists():
        from kernels.make_checkpoint import main as make_checkpoint  # lazy: pulls torch
        make_checkpoint(["--preset", "tiny", "--out", str(out)])
    return out


def build_engine(config: ServerConfig, model_dir: Path | None = None) -> EngineProtocol:
    """The one place the real engine is constructed (kernels.engine.Engine, imported lazily), with
    the CPU settings left on auto chosen from the model's size and the cores (logged)."""
    import torch

    from kernels.auto_settings import choose_settings
    from kernels.config import read_model_config
    from kernels.engine import Engine, EngineConfig  # lazy: torch
    from kernels.host_memory import usable_cores

    directory = model_dir if model_dir is not None else resolve_model_dir(config)
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = choose_settings(
        threads=config.threads, stage_workers=config.stage_workers, overlap_stages=config.overlap_stages,
        llm_hidden=read_model_config(directory).llm.qwen.hidden_size, cores=usable_cores(),
        cuda=device.startswith("cuda"))
    for reason in settings.reasons:
        log.info("auto setting: %s", reason)
    if settings.threads:
        torch.set_num_threads(settings.threads)  # before the engine thread starts: it inherits the count
    engine_config = EngineConfig(
        num_slots=config.max_batch,
        cuda_graphs=bool(config.cuda_graphs),
        overlap_stages=settings.overlap_stages,
        max_jobs=1 if config.max_batch == 1 else 0,  # batching off = one request at a time, end to end
        stage_workers=settings.stage_workers,
        llm_dtype=config.llm_dtype,
        flow_dtype=config.flow_dtype,
        flow_cache_pool_bytes=config.flow_cache_mb << 20 if config.flow_cache_mb >= 0 else -1,
    )
    engine = Engine(directory, device=device, config=engine_config)
    if engine.model.load_stats is not None:
        log.info("model %s loaded in %.1f s", directory, engine.model.load_stats.seconds)
    if config.warmup:
        from kernels.warmup import warm_up
        warm_up(engine)
    return engine  # type: ignore[return-value]


def build_extractor(model_dir: Path | None) -> ExtractPrompt:
    from frontend.prompt import PromptExtractor  # lazy: onnxruntime
    assert model_dir is not None
    return PromptExtractor(model_dir).extract  # type: ignore[no-any-return]


# ---- running ---------------------------------------------------------------------------------

async def start(app: App, host: str, port: int) -> asyncio.base_events.Server:
    from server.connection import HttpProtocol
    app.loop = asyncio.get_running_loop()
    return await app.loop.create_server(lambda: HttpProtocol(app), host, port, backlog=1024)


async def drain(app: App, server: asyncio.base_events.Server) -> None:
    """Stop accepting, let in-flight work finish within the deadline, then cancel the rest."""
    app.draining = True
    server.close()
    for conn in list(app.connections):
        conn.close_if_idle()
    pending = {t for t in app.tasks if not t.done()}
    if pending:
        _, late = await asyncio.wait(pending, timeout=app.config.shutdown_deadline_s)
        for t in late:
            t.cancel()
        if late:
            await asyncio.wait(late, timeout=1.0)
    for conn in list(app.connections):
        conn.abort()
    await app.run_blocking(app.engine.shutdown, 1.0)
    if app.pool is not None:
        app.pool.shutdown(wait=False, cancel_futures=True)
    app.store.close()


async def serve(app: App) -> None:
    server = await start(app, app.config.host, app.config.port)
    log.info("ready on %s", startup_line(app, server.sockets[0].getsockname()[1]))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining in-flight work (deadline %.1fs)", app.config.shutdown_deadline_s)
    await drain(app, server)


def startup_line(app: App, port: int) -> str:
    """The URL, then what the engine runs with (device, dtypes, threads, batch, attention, flow cache)."""
    host = app.config.host
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    describe = getattr(app.engine, "describe", None)
    engine = describe() if callable(describe) else type(app.engine).__name__
    return (f"{url} · {engine}, max inflight {app.config.max_inflight} · "
            f"model {app.config.model_dir or 'TINY RANDOM (noise)'} · store {app.config.store}")


def run(app: App) -> None:
    try:
        import uvloop
        uvloop.run(serve(app))
    except ImportError:  # uvloop is a dependency; plain asyncio still works
        asyncio.run(serve(app))


class ServerThread:
    """Tests: serve `app` on 127.0.0.1:<free port> in a background thread with its own loop."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
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
        import uvloop
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

    def stop(self) -> None:
        if self._loop is None or not self._thread.is_alive():
            return
        assert self._server is not None
        asyncio.run_coroutine_threadsafe(drain(self.app, self._server), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
