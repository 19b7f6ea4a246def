"""`--role frontend`: an EngineProtocol whose engine is a backend process, over the internal API.

`prepare` / `encode_text` run the torch-free text frontend here (frontend/prepare.py; it needs the model
directory for the tokenizer files only), so jobs travel as token ids. `submit` (called on the event
loop, as server.bridge does) starts one asyncio task that opens the job's WebSocket to the backend,
sends the job -- the voice's features the first time this backend sees them, its content hash after --
then forwards `push_tokens` / `finish_text` as they are called and turns the backend's frames into
`AudioChunk`s, then exactly one `Finished` or `Failed`, given to the sink on the loop. A backend that
cannot be reached fails the job as OVERLOADED (503, retryable); one that closes mid-stream or sends a
malformed frame fails it as INTERNAL_ERROR at once. `cancel` sends `cancel` and closes; no event follows.
`stats` / `can_admit` are the load the backend reported on its last frame.

This slice talks to ONE backend (the first --backend); routing, health checks, ejection and retry are
the next slices' work.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import logging
import threading
import urllib.parse
from collections import OrderedDict
from collections.abc import Sequence

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
    EngineEvent,
    EngineStats,
    EventSink,
    Failed,
    Finished,
    PreparedJob,
    SpeechJob,
    VoicePrompt,
)
from server.internal_jobs import event_of, features_of, prompt_of, submit_of

log = logging.getLogger("server.remote")
SAMPLE_RATE = 24000  # CosyVoice2's output rate; the backend's PCM arrives at this rate
_UNUSABLE = "reference audio cannot be used: "


class RemoteEngine:
    sample_rate = SAMPLE_RATE

    def __init__(self, backend_url: str, internal_token: str, text: TextPreparer, voices_kept: int = 256) -> None:
        url = urllib.parse.urlsplit(backend_url)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"backend URL must be http://host:port: {backend_url!r}")
        self.url = backend_url.rstrip("/")
        self.host, self.port = url.hostname, url.port or 80
        self.token = internal_token
        self.text = text
        self.status = wire.Status()
        self._voices_kept = voices_kept
        self._hashes: OrderedDict[int, tuple[VoicePrompt, str]] = OrderedDict()  # id(voice) -> (voice, sha)
        self._sent: OrderedDict[str, None] = OrderedDict()  # hashes this backend was sent (it may evict them)
        self._lock = threading.Lock()
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
        return EngineStats(running=self.status.running, waiting=self.status.waiting, kv_used_tokens=0,
                           kv_total_tokens=0, last_decode_batch=0, last_flow_batch=0, last_vocoder_batch=0, steps=0)

    def can_admit(self) -> bool:
        return self.status.can_admit

    def shutdown(self, deadline_s: float) -> None:
        for job in list(self.jobs):
            job.cancel()
        self.text.close()

    def describe(self) -> str:
        return f"remote engine at {self.url}"

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

    def was_sent(self, sha: str) -> bool:
        with self._lock:
            return sha in self._sent

    def mark_sent(self, sha: str) -> None:
        with self._lock:
            self._sent[sha] = None
            self._sent.move_to_end(sha)
            while len(self._sent) > self._voices_kept:
                self._sent.popitem(last=False)

    # ---- prompt features at upload (a backend computes them: they need torch) ----
    def extract_prompt(self, wav: np.ndarray, sample_rate: int, text: str) -> VoicePrompt:
        """Blocking (a worker thread): POST the decoded audio to the backend's features endpoint."""
        body = wire.encode_features_request(wav, sample_rate, text)
        conn = http.client.HTTPConnection(self.host, self.port, timeout=300)
        try:
            conn.request("POST", wire.FEATURES_PATH, body, {"authorization": f"Bearer {self.token}",
                                                             "content-type": "application/octet-stream"})
            resp = conn.getresponse()
            data = resp.read()
        except OSError as exc:  # no backend to compute them: retryable, as a full server is
            raise Overloaded(f"no backend available for prompt features: {exc}", status=503) from None
        finally:
            conn.close()
        if resp.status == 400:
            message = str(json.loads(data).get("message", "rejected by the backend"))
            raise PromptAudioError(message.removeprefix(_UNUSABLE))
        if resp.status != 200:
            raise RuntimeError(f"backend {self.url} answered the features request with HTTP {resp.status}")
        return prompt_of(wire.decode_voice(data))


class RemoteJob:
    """JobControl of one job on the backend; every method may be called from any thread."""

    def __init__(self, engine: RemoteEngine, prepared: PreparedJob, sink: EventSink,
                 loop: asyncio.AbstractEventLoop) -> None:
        self._engine = engine
        self._sink = sink
        self._loop = loop
        self._rid = prepared.request_id
        self._outbox: asyncio.Queue[wire.ToBackend] = asyncio.Queue()
        self._ended = False  # the final event was given, or the job was cancelled: nothing more
        self._ws: WSConnection | None = None
        self._writer: asyncio.StreamWriter | None = None
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
        self._sink(event)

    def _fail(self, code: ErrorCode, message: str) -> None:
        if not self._ended:
            log.warning("request %s: %s", self._rid, message)
        self._emit(Failed(self._rid, code, message))

    # ---- the socket ----
    def _send(self, msg: wire.ToBackend) -> None:
        assert self._ws is not None and self._writer is not None
        for frame in wire.encode(msg):
            event = TextMessage(data=frame) if isinstance(frame, str) else BytesMessage(data=frame)
            self._writer.write(self._ws.send(event))

    async def _run(self, prepared: PreparedJob) -> None:
        engine = self._engine
        pump: asyncio.Task[None] | None = None
        if prepared.refusal is not None:  # nothing to send: refused as the engine itself would refuse it
            self._emit(Failed(self._rid, ErrorCode.INVALID_PARAMETER, prepared.refusal))
            return
        try:
            try:
                reader, self._writer = await asyncio.open_connection(engine.host, engine.port)
            except OSError as exc:
                self._fail(ErrorCode.OVERLOADED, f"backend unreachable: {exc}")
                return
            self._ws = ws = WSConnection(ConnectionType.CLIENT)
            self._writer.write(ws.send(Request(host=f"{engine.host}:{engine.port}", target=wire.JOBS_PATH,
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
                        attach = not engine.was_sent(sha)
                        self._send(submit_of(prepared, sha, attach))
                        if attach:
                            engine.mark_sent(sha)
                        pump = self._loop.create_task(self._pump())
                    elif isinstance(event, RejectConnection):
                        code = ErrorCode.OVERLOADED if event.status_code in (429, 503) else ErrorCode.INTERNAL_ERROR
                        self._fail(code, f"backend refused the job: HTTP {event.status_code}")
                        return
                    elif isinstance(event, (TextMessage, BytesMessage)):
                        parts.append(event.data)
                        if not event.message_finished:
                            continue
                        whole: str | bytes = "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)  # type: ignore[arg-type]
                        parts = []
                        msg = decoder.feed(whole)
                        if isinstance(msg, wire.NeedVoice):
                            self._send(wire.Voice(features_of(voice)))
                            engine.mark_sent(engine.voice_sha256(voice))
                        elif msg is not None:
                            engine.status = msg.status  # type: ignore[union-attr]
                            self._emit(event_of(msg, self._rid))  # type: ignore[arg-type]
                            if self._ended:
                                self._writer.write(ws.send(CloseConnection(code=1000)))
                                return
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
            self._fail(ErrorCode.INTERNAL_ERROR, f"backend {engine.url} {what}")
        except asyncio.CancelledError:
            raise
        except wire.InternalProtocolError as exc:
            self._fail(ErrorCode.INTERNAL_ERROR, f"backend sent a malformed frame: {exc}")
        except (OSError, LocalProtocolError, RemoteProtocolError) as exc:
            self._fail(ErrorCode.INTERNAL_ERROR, f"backend connection failed: {exc}")
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
            self._send(msg)
            await self._writer.drain()
