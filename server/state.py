"""What every handler shares: config, engine, store, voice cache, metrics, thread pool, drain flag.

Handlers depend on this module only, never on the wiring that fills it (server.wiring) or on
the serving loop (server.serving).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, TypeVarTuple

import numpy as np

from protocol.errors import Overloaded
from scheduler.jobs import EngineProtocol, VoicePrompt
from server.config import ServerConfig
from server.metrics import Metrics
from server.store_base import VoiceStoreBase
from server.voice_ids import check_voice_id, not_found
from server.voices import FeatureCache, VoiceCache

log = logging.getLogger(__name__)

T = TypeVar("T")
Args = TypeVarTuple("Args")
ExtractPrompt = Callable[[np.ndarray, int, str], VoicePrompt]


class OpenConnection(Protocol):
    """What the drain needs from a client connection."""

    def close_if_idle(self) -> None: ...
    def abort(self) -> None: ...


@dataclass
class ServerState:
    config: ServerConfig
    engine: EngineProtocol
    extract_prompt: ExtractPrompt
    store: VoiceStoreBase
    voices: VoiceCache
    metrics: Metrics = field(default_factory=Metrics)
    pool: concurrent.futures.ThreadPoolExecutor | None = None
    loop: asyncio.AbstractEventLoop | None = None
    draining: bool = False
    tasks: set[asyncio.Task[None]] = field(default_factory=set)  # in-flight handlers, for the drain
    connections: set[OpenConnection] = field(default_factory=set)
    features: FeatureCache | None = None  # --role backend: the voices jobs brought, by content hash
    background: set[asyncio.Future[bool]] = field(default_factory=set)  # work nobody awaits (warm_voice)

    async def run_blocking(self, fn: Callable[[*Args], T], *args: *Args) -> T:
        """CPU/disk work (decode, encode, features, fsync) goes to the pool, never the loop; in the caller's
        context, so what it logs carries the caller's request id (server/log_lines.py)."""
        run_here = contextvars.copy_context().run
        return await asyncio.get_running_loop().run_in_executor(self.pool, run_here, fn, *args)

    def warm_voice(self, prompt: VoicePrompt) -> None:
        """Let the engine precompute a new voice's work on the pool, in the background (its first stream then
        starts from it: kernels/runtime/voice_prefix.py). A failure is logged: the upload already succeeded."""
        future = asyncio.ensure_future(self.run_blocking(self.engine.warm_voice, prompt))
        self.background.add(future)
        future.add_done_callback(self._background_done)

    def _background_done(self, future: asyncio.Future[bool]) -> None:
        self.background.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.warning("precomputing a voice failed: %r", future.exception())

    async def voice(self, voice_id: str) -> VoicePrompt:
        prompt = self.voices.peek(check_voice_id(voice_id))
        if prompt is not None and self.config.store == "s3" \
                and await self.run_blocking(self.store.get, voice_id) is None:
            # Replicas share the bucket: another one may have deleted the voice we cached (one GET).
            self.voices.drop(voice_id)
            raise not_found(voice_id)
        prompt = prompt or await self.run_blocking(self.voices.get, voice_id)
        if prompt is None:
            raise not_found(voice_id)
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
