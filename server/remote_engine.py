"""`--role frontend`: an EngineProtocol whose engine is a backend process, over the internal API.

`prepare` / `encode_text` run the torch-free text frontend here (frontend/prepare.py; it needs the model
directory for the tokenizer files only), so jobs travel as token ids. `submit` (called on the event
loop, as server.bridge does) starts one asyncio task that picks a backend (server/backend_pool.py: least
outstanding work, never an ejected or draining one), opens the job's WebSocket to it, sends the job -- the
voice's features the first time that backend sees them, its content hash after -- then forwards
`push_tokens` / `finish_text` as they are called and turns the backend's frames into `AudioChunk`s, then
exactly one `Finished` or `Failed`, given to the sink on the loop. A backend that refuses the connection,
resets it or answers 503 / `failed(Overloaded)` before the first chunk gets the job retried once on
another backend, invisibly; with no other, the job fails as OVERLOADED (503, retryable). One that closes
mid-stream or sends a malformed frame fails it as INTERNAL_ERROR at once. `cancel` sends `cancel` and
closes; no event follows. `stats` / `can_admit` are the load the backends reported (every frame and every
health answer).

`start_monitor` (on the loop) runs the active health checks of `GET /internal/v1/health` every
`--backend-check-s` and, with `--backend-dns name:port`, re-resolves the name each round and reconciles the
table: backends come and go without a restart.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import logging
import socket
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from frontend.prepare import TextPreparer
from frontend.prompt import PromptAudioError
from protocol import internal as wire
from protocol.errors import ErrorCode, Overloaded
from scheduler.jobs import (
    AudioChunk,
    EngineEvent,
    EngineStats,
    EventSink,
    Failed,
    Finished,
    PreparedJob,
    SpeechJob,
    VoicePrompt,
)
from server.backend_pool import Backend, BackendPool, Outcome, backend_key, parse_url
from server.internal_jobs import event_of, features_of, prompt_of, submit_of

log = logging.getLogger("server.remote")
SAMPLE_RATE = 24000  # CosyVoice2's output rate; the backend's PCM arrives at this rate
_UNUSABLE = "reference audio cannot be used: "
_CONNECT_TIMEOUT_S = 5.0


class RemoteEngine:
    sample_rate = SAMPLE_RATE

    def __init__(self, backends: str | Sequence[str], internal_token: str, text: TextPreparer,
                 voices_kept: int = 256, *, dns: str = "", check_s: float = 2.0, eject_after: int = 3,
                 resolver: Resolver | None = None) -> None:
        urls = [backends] if isinstance(backends, str) else list(backends)
        self.pool = BackendPool([parse_url(u) for u in urls], eject_after=eject_after, check_s=check_s)
        self.dns: tuple[str, int] | None = None
        if dns:
            name, _, port = dns.rpartition(":")
            if not name or not port.isdigit():
                raise ValueError(f"--backend-dns must be name:port: {dns!r}")
            self.dns = (name.strip("[]"), int(port))
        self._resolver = resolver or _getaddrinfo
        self.token = internal_token
        self.text = text
        self._voices_kept = voices_kept
        self._hashes: OrderedDict[int, tuple[VoicePrompt, str]] = OrderedDict()  # id(voice) -> (voice, sha)
        self._lock = threading.Lock()
        self._monitor: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.jobs: set[RemoteJob] = set()

    # ---- EngineProtocol ----
    def prepare(self, job: SpeechJob) -> PreparedJob:
        prepared = self.text.prepare(job)
        self.voice_sha256(job.voice)  # hashed here, on the worker thread, not on the loop at submit
        return prepared

    def encode_text(self, text: str) -> list[int]:
        return self.text.encode(text)

    def submit(self, job: PreparedJob, sink: EventSink) -> RemoteJob:
        """Call on the event loop (server.bridge does); events reach `sink` on the loop."""
        remote = RemoteJob(self, job, sink, asyncio.get_running_loop())
        self.jobs.add(remote)
        return remote

    def stats(self) -> EngineStats:
        """The load the usable backends last reported, summed (call on the loop)."""
        usable = [b for b in self.pool.backends() if b.usable]
        return EngineStats(running=sum(b.running for b in usable), waiting=sum(b.waiting for b in usable),
                           kv_used_tokens=0, kv_total_tokens=0, last_decode_batch=0, last_flow_batch=0,
                           last_vocoder_batch=0, steps=0)

    def warm_voice(self, voice: VoicePrompt) -> bool:
        """Nothing here: a backend computes a voice's prefix at its first stream there."""
        return False

    def can_admit(self) -> bool:
        """Some backend is usable (not ejected, not draining, not full); else the job fails at once (503)."""
        return self.pool.usable()

    def shutdown(self, deadline_s: float) -> None:
        for job in list(self.jobs):
            job.cancel()
        if self._monitor is not None and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._monitor.cancel)
            except RuntimeError:  # loop closed
                pass
        self.text.close()

    def describe(self) -> str:
        where = f"DNS {self.dns[0]}:{self.dns[1]}" if self.dns else ", ".join(b.url for b in self.pool.backends())
        return f"remote engine at {where}"

    # ---- health checks and DNS (a task on the loop: start_monitor) ----
    def start_monitor(self) -> None:
        """Call on the event loop once it runs (server.serving.start does): checks every --backend-check-s."""
        if self._monitor is None:
            self._loop = asyncio.get_running_loop()
            self._monitor = self._loop.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            try:
                await self.check_now()
            except Exception:
                log.exception("backend health round failed")
            await asyncio.sleep(self.pool.check_s / 4)  # due() spaces each backend's checks check_s apart

    async def check_now(self) -> None:
        """One round: re-resolve --backend-dns (if given), then run the health checks that are due."""
        if self.dns is not None:
            await self.resolve()
        due = self.pool.due()
        if due:
            await asyncio.gather(*(self.check(b) for b in due))

    async def resolve(self) -> None:
        assert self.dns is not None
        try:
            addresses = await self._resolver(*self.dns)
        except OSError as exc:
            log.warning("backend DNS %s:%d: %s (keeping %d backends)", *self.dns, exc, len(self.pool.backends()))
            return
        added, removed = self.pool.reconcile(addresses)
        for key in added:
            log.info("backend %s added (DNS)", key)
        for key in removed:
            log.info("backend %s removed (DNS)", key)

    async def check(self, backend: Backend) -> None:
        """GET the backend's readiness (HEALTH_PATH) and tell the pool: 200 re-admits, 503 = draining."""
        status, body = None, {}
        try:
            status, body = await asyncio.wait_for(_get_health(backend.host, backend.port),
                                                  timeout=max(1.0, self.pool.check_s))
        except (TimeoutError, OSError, ValueError, IndexError) as exc:
            log.debug("backend %s health: %s", backend.key, exc)
        was = (backend.ejected, backend.draining)
        self.pool.checked(backend, status, int(body.get("running", 0)), int(body.get("waiting", 0)),
                          bool(body.get("can_admit", True)))
        if (backend.ejected, backend.draining) != was:
            state = "ejected" if backend.ejected else "draining" if backend.draining else "re-admitted"
            log.warning("backend %s %s (health: %s)", backend.key, state, status or "no answer")

    # ---- voices ----
    def voice_sha256(self, voice: VoicePrompt) -> str:
        with self._lock:
            hit = self._hashes.get(id(voice))
            if hit is not None and hit[0] is voice:
                self._hashes.move_to_end(id(voice))
                return hit[1]
        sha = wire.voice_sha256(voice.speech_tokens, voice.embedding, voice.mel)
        with self._lock:
            self._hashes[id(voice)] = (voice, sha)  # holding the voice keeps its id unique
            while len(self._hashes) > self._voices_kept:
                self._hashes.popitem(last=False)
        return sha

    def mark_sent(self, backend: Backend, sha: str) -> None:
        """On the loop: `backend` has these features (it may evict them: it asks again, need_voice)."""
        sent = backend.sent_voices
        sent.pop(sha, None)
        sent[sha] = None
        while len(sent) > self._voices_kept:
            del sent[next(iter(sent))]

    # ---- prompt features at upload (a backend computes them: they need torch) ----
    def extract_prompt(self, wav: np.ndarray, sample_rate: int, text: str) -> VoicePrompt:
        """Blocking (a worker thread): POST the decoded audio to the least-loaded backend's features
        endpoint; one other backend is tried if it cannot be reached."""
        body = wire.encode_features_request(wav, sample_rate, text)
        tried: list[Backend] = []
        while True:
            backend = self.pool.choose(exclude=tried)  # read from a worker thread: a snapshot is enough
            if backend is None or len(tried) == 2:
                raise Overloaded("no backend available for prompt features", status=503)
            tried.append(backend)
            conn = http.client.HTTPConnection(backend.host, backend.port, timeout=300)
            try:
                conn.request("POST", wire.FEATURES_PATH, body, {"authorization": f"Bearer {self.token}",
                                                                 "content-type": "application/octet-stream"})
                resp = conn.getresponse()
                data = resp.read()
            except OSError as exc:  # no backend to compute them: retryable, as a full server is
                log.warning("backend %s features: %s", backend.key, exc)
                continue
            finally:
                conn.close()
            if resp.status == 503:
                continue
            if resp.status == 400:
                message = str(json.loads(data).get("message", "rejected by the backend"))
                raise PromptAudioError(message.removeprefix(_UNUSABLE))
            if resp.status != 200:
                raise RuntimeError(f"backend {backend.url} answered the features request with HTTP {resp.status}")
            return prompt_of(wire.decode_voice(data))


Resolver = Callable[[str, int], Awaitable[list[tuple[str, int]]]]


async def _getaddrinfo(name: str, port: int) -> list[tuple[str, int]]:
    """A and AAAA records of a headless Service, in the resolver's order, without duplicates."""
    infos = await asyncio.get_running_loop().getaddrinfo(name, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys((str(info[4][0]), port) for info in infos))


async def _get_health(host: str, port: int) -> tuple[int, dict[str, Any]]:
    """(status, JSON body or {}) of GET HEALTH_PATH, one connection (Connection: close)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {wire.HEALTH_PATH} HTTP/1.1\r\nHost: {backend_key(host, port)}\r\n"
                     f"Connection: close\r\n\r\n".encode())
        data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])  # ValueError / IndexError on garbage
    try:
        parsed = json.loads(body) if status == 200 else {}
    except ValueError:
        parsed = {}
    return status, parsed if isinstance(parsed, dict) else {}


class RemoteJob:
    """JobControl of one job on a backend; every method may be called from any thread."""

    def __init__(self, engine: RemoteEngine, prepared: PreparedJob, sink: EventSink,
                 loop: asyncio.AbstractEventLoop) -> None:
        self._engine = engine
        self._sink = sink
        self._loop = loop
        self._rid = prepared.request_id
        self._outbox: asyncio.Queue[wire.ToBackend] = asyncio.Queue()
        self._controls: list[wire.ToBackend] = []  # control messages sent so far: replayed on a retry
        self._ended = False  # the final event was given, or the job was cancelled: nothing more
        self._streamed = False  # a chunk reached the sink: no retry from here on
        self._ws: WSConnection | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.backend: Backend | None = None  # where the job runs now
        self._task = loop.create_task(self._run(prepared))
        self._task.add_done_callback(lambda _: engine.jobs.discard(self))  # also when cancelled before it ran

    # ---- JobControl ----
    def push_tokens(self, ids: Sequence[int]) -> None:
        self._post(wire.PushTokens(tuple(int(i) for i in ids)))

    def finish_text(self) -> None:
        self._post(wire.FinishText())

    def cancel(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._cancel)
        except RuntimeError:  # loop closed
            pass

    def _post(self, msg: wire.ToBackend) -> None:
        try:
            self._loop.call_soon_threadsafe(self._outbox.put_nowait, msg)
        except RuntimeError:
            pass

    def _cancel(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self._ws is not None and self._writer is not None and not self._writer.is_closing():
            try:
                self._send(wire.Cancel())
                self._writer.write(self._ws.send(CloseConnection(code=1000, reason="cancelled")))
            except (LocalProtocolError, RuntimeError):
                pass
        self._task.cancel()

    def _emit(self, event: EngineEvent) -> None:
        if self._ended:
            return
        if isinstance(event, (Finished, Failed)):
            self._ended = True
        elif isinstance(event, AudioChunk):
            self._streamed = True
            if self.backend is not None:
                self.backend.chunks += 1
        self._sink(event)

    def _fail(self, code: ErrorCode, message: str, status: int | None = None) -> None:
        if not self._ended:
            log.warning("request %s: %s", self._rid, message)
        self._emit(Failed(self._rid, code, message, status))

    # ---- the socket ----
    def _send(self, msg: wire.ToBackend) -> None:
        assert self._ws is not None and self._writer is not None
        for frame in wire.encode(msg):
            event = TextMessage(data=frame) if isinstance(frame, str) else BytesMessage(data=frame)
            self._writer.write(self._ws.send(event))

    async def _run(self, prepared: PreparedJob) -> None:
        """Route the job (BackendPool.choose); retry it once elsewhere if its backend refuses, resets or is
        busy before the first chunk (BackendPool.retryable); otherwise its first failure is the job's."""
        if prepared.refusal is not None:  # nothing to send: refused as the engine itself would refuse it
            self._emit(Failed(self._rid, ErrorCode.INVALID_PARAMETER, prepared.refusal))
            return
        pool = self._engine.pool
        tried: list[Backend] = []
        backend = pool.choose()
        while True:
            if backend is None:
                self._fail(ErrorCode.OVERLOADED, "no backend available")
                return
            tried.append(backend)
            self.backend = backend
            pool.started(backend)
            try:
                outcome, code, message = await self._attempt(backend, prepared)
            finally:
                pool.ended(backend)
            pool.outcome(backend, outcome)
            if outcome is Outcome.OK or self._ended:
                return
            retry = pool.retryable(outcome, len(tried) - 1, self._streamed, tried)
            if retry is None:  # a backend lost mid-job is the gateway's failure: 502 where a status is sent
                self._fail(code, message, 502 if outcome is Outcome.RESET else None)
                return
            pool.retried(backend)
            log.info("request %s: %s; retrying on %s", self._rid, message, retry.key)
            backend = retry

    async def _attempt(self, backend: Backend, prepared: PreparedJob) -> tuple[Outcome, ErrorCode, str]:
        """One connection to `backend`. OK: the job ended here (its final event given); otherwise what went
        wrong, for `_run` to retry or to fail the job with."""
        engine = self._engine
        pump: asyncio.Task[None] | None = None
        self._ws, self._writer = None, None
        try:
            try:
                reader, self._writer = await asyncio.wait_for(
                    asyncio.open_connection(backend.host, backend.port), timeout=_CONNECT_TIMEOUT_S)
            except (TimeoutError, OSError) as exc:
                return Outcome.REFUSED, ErrorCode.OVERLOADED, f"backend {backend.key} unreachable: {exc}"
            self._ws = ws = WSConnection(ConnectionType.CLIENT)
            self._writer.write(ws.send(Request(host=backend.key, target=wire.JOBS_PATH,
                                               extra_headers=[(b"authorization", f"Bearer {engine.token}".encode())])))
            decoder = wire.Reader(to_backend=False)
            parts: list[str | bytes] = []
            accepted = False
            voice = prepared.job.voice
            while True:
                data = await reader.read(65536)
                ws.receive_data(data or None)
                for event in ws.events():
                    if isinstance(event, AcceptConnection):
                        accepted = True
                        sha = engine.voice_sha256(voice)
                        attach = sha not in backend.sent_voices
                        self._send(submit_of(prepared, sha, attach))
                        if attach:
                            engine.mark_sent(backend, sha)
                        for msg in self._controls:  # a retry: what the first backend was sent already
                            self._send(msg)
                        pump = self._loop.create_task(self._pump())
                    elif isinstance(event, RejectConnection):
                        what = f"backend {backend.key} refused the job: HTTP {event.status_code}"
                        if event.status_code in (429, 503):
                            return Outcome.BUSY, ErrorCode.OVERLOADED, what
                        self._fail(ErrorCode.INTERNAL_ERROR, what)
                        return Outcome.OK, ErrorCode.INTERNAL_ERROR, what
                    elif isinstance(event, (TextMessage, BytesMessage)):
                        parts.append(event.data)
                        if not event.message_finished:
                            continue
                        whole: str | bytes = "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)  # type: ignore[arg-type]
                        parts = []
                        msg = decoder.feed(whole)
                        if isinstance(msg, wire.NeedVoice):
                            self._send(wire.Voice(features_of(voice)))
                            engine.mark_sent(backend, engine.voice_sha256(voice))
                        elif msg is not None:
                            status = msg.status  # type: ignore[union-attr]
                            engine.pool.report(backend, status.running, status.waiting, status.can_admit)
                            if (isinstance(msg, wire.Failed) and msg.code is ErrorCode.OVERLOADED
                                    and not self._streamed):
                                return Outcome.BUSY, msg.code, f"backend {backend.key}: {msg.message}"
                            self._emit(event_of(msg, self._rid))  # type: ignore[arg-type]
                            if self._ended:
                                self._writer.write(ws.send(CloseConnection(code=1000)))
                                return Outcome.OK, ErrorCode.OVERLOADED, ""
                    elif isinstance(event, Ping):
                        self._writer.write(ws.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        break
                else:
                    if data:
                        await self._writer.drain()
                        continue
                break
            what = "closed the job stream before it ended" if accepted else "closed the connection"
            return Outcome.RESET, ErrorCode.INTERNAL_ERROR, f"backend {backend.key} {what}"
        except asyncio.CancelledError:
            raise
        except wire.InternalProtocolError as exc:
            self._fail(ErrorCode.INTERNAL_ERROR, f"backend {backend.key} sent a malformed frame: {exc}")
            return Outcome.OK, ErrorCode.INTERNAL_ERROR, ""
        except (OSError, LocalProtocolError, RemoteProtocolError) as exc:
            return Outcome.RESET, ErrorCode.INTERNAL_ERROR, f"backend {backend.key} connection failed: {exc}"
        finally:
            if pump is not None:
                pump.cancel()
            if self._writer is not None:
                self._writer.close()

    async def _pump(self) -> None:
        """Control messages (duplex text ids, finish) to the backend, in the order they were called."""
        assert self._writer is not None
        while True:
            msg = await self._outbox.get()
            self._controls.append(msg)
            self._send(msg)
            await self._writer.drain()
