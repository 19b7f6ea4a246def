"""The internal job protocol between a frontend and a backend (`--role frontend|backend`). Pure: no I/O.

One WebSocket per job at `JOBS_PATH` (wsproto framing, the same layer as the public WebSocket), opened
with `Authorization: Bearer <--internal-token>`. Every message is a JSON text frame with a "type"; two
types are followed by exactly one binary frame (their payload), which the `Reader` pairs with its header.

frontend -> backend
  submit       the prepared job: request_id, mode, prompt_text_ids, prompt_speech_ids, pieces (token ids
               per sentence), duplex, speed, stream, seed, fixed_tokens, debug, and the voice's content
               hash `voice_sha256`. `voice_attached`: a binary frame follows with the voice's features
               (npz: speech_tokens int32, embedding float32, mel float32, text); else the frontend
               trusts the backend's bounded voice cache and the backend answers `need_voice` on a miss.
  voice        (binary frame follows) the voice's npz, answering `need_voice`
  push_tokens  {"ids": [...]}: a duplex text piece's token ids, sent as soon as the client sends the text
  finish_text  no more text (duplex)
  cancel       stop the job; the backend sends nothing more after it
backend -> frontend
  need_voice   the backend lacks `voice_sha256` in its cache: send `voice`
  chunk        {"metrics": ChunkMetrics fields, "samples": n, "status"} + a binary frame: n float32 LE PCM
               samples, mono 24 kHz
  finished     {"total_samples", "llm_tokens", "status"}
  failed       {"code": an ErrorCode value, "message", "status"}
`status` = {"running", "waiting", "can_admit"}: the backend's load, for least-loaded routing.
Exactly one of finished / failed ends a job; then both sides close the socket.

Design: text preparation (normalise, split, tokenise: frontend/prepare.py, torch-free) stays in the
frontend, so jobs travel as token ids and a backend never runs the text frontend; a duplex piece's ids
are forwarded as each piece arrives. Open: prompt-feature extraction at upload still needs torch
(kernels.features), so a frontend asks a backend for it over HTTP at `FEATURES_PATH` (request: npz with
"wav" float32 + "sample_rate" + "text"; answer: the voice npz) -- to be moved to onnxruntime + numpy in
the frontend later.

Malformed input (not JSON, unknown type, a missing or ill-typed field, a binary frame nobody announced,
a header whose binary frame never came) raises `InternalProtocolError` with a message saying what.
"""
from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from protocol.errors import ErrorCode
from protocol.speech_mode import Mode

JOBS_PATH = "/internal/v1/jobs"
HEALTH_PATH = "/internal/v1/health"
FEATURES_PATH = "/internal/v1/features"
VOICE_ARRAYS = ("speech_tokens", "embedding", "mel")


class InternalProtocolError(ValueError):
    """A frame that does not follow the internal protocol."""


@dataclass(frozen=True)
class VoiceFeatures:
    """The voice prompt's arrays as they travel (the backend needs no store, only these)."""

    speech_tokens: np.ndarray  # int32 [P]
    embedding: np.ndarray  # float32 [192]
    mel: np.ndarray  # float32 [2P, 80]
    text: str = ""

    def sha256(self) -> str:
        return voice_sha256(self.speech_tokens, self.embedding, self.mel)


def voice_sha256(speech_tokens: np.ndarray, embedding: np.ndarray, mel: np.ndarray) -> str:
    """Content hash of a voice's features (dtype, shape and bytes of each array; not the npz, whose zip
    headers carry a timestamp)."""
    h = hashlib.sha256()
    for name, arr, dtype in (("speech_tokens", speech_tokens, np.int32), ("embedding", embedding, np.float32),
                             ("mel", mel, np.float32)):
        a = np.ascontiguousarray(arr, dtype=dtype)
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def encode_voice(voice: VoiceFeatures) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, speech_tokens=np.asarray(voice.speech_tokens, np.int32),
             embedding=np.asarray(voice.embedding, np.float32), mel=np.asarray(voice.mel, np.float32),
             text=np.array(voice.text))
    return buf.getvalue()


def decode_voice(data: bytes) -> VoiceFeatures:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            missing = [k for k in VOICE_ARRAYS if k not in z.files]
            if missing:
                raise InternalProtocolError(f"voice npz lacks {', '.join(missing)}")
            voice = VoiceFeatures(speech_tokens=z["speech_tokens"].astype(np.int32),
                                  embedding=z["embedding"].astype(np.float32),
                                  mel=z["mel"].astype(np.float32),
                                  text=str(z["text"]) if "text" in z.files else "")
    except InternalProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - zip/npy errors of every kind mean the same: bad bytes
        raise InternalProtocolError(f"voice frame is not a valid npz: {exc}") from None
    if voice.speech_tokens.ndim != 1 or voice.embedding.ndim != 1 or voice.mel.ndim != 2:
        raise InternalProtocolError("voice arrays have the wrong rank")
    return voice


# ---- messages ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Status:
    running: int = 0
    waiting: int = 0
    can_admit: bool = True


@dataclass(frozen=True)
class Submit:
    request_id: str
    mode: Mode
    voice_sha256: str
    prompt_text_ids: tuple[int, ...] = ()
    prompt_speech_ids: tuple[int, ...] = ()
    pieces: tuple[tuple[int, ...], ...] = ()
    duplex: bool = False  # text arrives as push_tokens, then finish_text
    speed: float = 1.0
    stream: bool = True
    seed: int | None = None
    fixed_tokens: int | None = None
    debug: bool = False
    voice: VoiceFeatures | None = field(default=None, compare=False)  # attached (binary frame) or None


@dataclass(frozen=True)
class Voice:
    voice: VoiceFeatures


@dataclass(frozen=True)
class PushTokens:
    ids: tuple[int, ...]


@dataclass(frozen=True)
class FinishText:
    pass


@dataclass(frozen=True)
class Cancel:
    pass


@dataclass(frozen=True)
class NeedVoice:
    pass


@dataclass(frozen=True)
class Chunk:
    pcm: np.ndarray = field(compare=False)  # float32 mono 24 kHz
    generate_time_s: float
    llm_tokens: int
    flow_batch: int = 1
    vocoder_batch: int = 1
    detail: Mapping[str, float] = field(default_factory=dict)
    status: Status = Status()


@dataclass(frozen=True)
class Finished:
    total_samples: int
    llm_tokens: int
    status: Status = Status()


@dataclass(frozen=True)
class Failed:
    code: ErrorCode
    message: str
    status: Status = Status()


ToBackend = Submit | Voice | PushTokens | FinishText | Cancel
ToFrontend = NeedVoice | Chunk | Finished | Failed
Message = ToBackend | ToFrontend
Frame = str | bytes  # a text frame or a binary frame


# ---- encoding -------------------------------------------------------------------------------------

def _status(s: Status) -> dict[str, Any]:
    return {"running": s.running, "waiting": s.waiting, "can_admit": s.can_admit}


def encode(msg: Message) -> list[Frame]:
    """The frames of one message, in order (a header, then its binary frame if it has one)."""
    if isinstance(msg, Submit):
        head = {"type": "submit", "request_id": msg.request_id, "mode": msg.mode.value,
                "voice_sha256": msg.voice_sha256, "voice_attached": msg.voice is not None,
                "prompt_text_ids": list(msg.prompt_text_ids), "prompt_speech_ids": list(msg.prompt_speech_ids),
                "pieces": [list(p) for p in msg.pieces], "duplex": msg.duplex, "speed": msg.speed,
                "stream": msg.stream, "seed": msg.seed, "fixed_tokens": msg.fixed_tokens, "debug": msg.debug}
        return [json.dumps(head)] + ([encode_voice(msg.voice)] if msg.voice is not None else [])
    if isinstance(msg, Voice):
        return [json.dumps({"type": "voice"}), encode_voice(msg.voice)]
    if isinstance(msg, PushTokens):
        return [json.dumps({"type": "push_tokens", "ids": list(msg.ids)})]
    if isinstance(msg, Chunk):
        pcm = np.ascontiguousarray(msg.pcm, dtype="<f4").reshape(-1)
        head = {"type": "chunk", "samples": int(pcm.size), "generate_time_s": msg.generate_time_s,
                "llm_tokens": msg.llm_tokens, "flow_batch": msg.flow_batch, "vocoder_batch": msg.vocoder_batch,
                "detail": dict(msg.detail), "status": _status(msg.status)}
        return [json.dumps(head), pcm.tobytes()]
    if isinstance(msg, Finished):
        return [json.dumps({"type": "finished", "total_samples": msg.total_samples, "llm_tokens": msg.llm_tokens,
                            "status": _status(msg.status)})]
    if isinstance(msg, Failed):
        return [json.dumps({"type": "failed", "code": msg.code.value, "message": msg.message,
                            "status": _status(msg.status)})]
    simple = {FinishText: "finish_text", Cancel: "cancel", NeedVoice: "need_voice"}
    return [json.dumps({"type": simple[type(msg)]})]


# ---- decoding -------------------------------------------------------------------------------------

def _get(head: Mapping[str, Any], key: str, kinds: type | tuple[type, ...], default: Any = ...) -> Any:
    if key not in head:
        if default is ...:
            raise InternalProtocolError(f"{head.get('type')}: missing field {key!r}")
        return default
    value = head[key]
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise InternalProtocolError(f"{head.get('type')}: field {key!r} has the wrong type")
    if not isinstance(value, kinds):
        raise InternalProtocolError(f"{head.get('type')}: field {key!r} has the wrong type")
    return value


def _ids(head: Mapping[str, Any], key: str) -> tuple[int, ...]:
    value = _get(head, key, list, [])
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise InternalProtocolError(f"{head.get('type')}: {key!r} must be a list of integers")
    return tuple(value)


def _status_of(head: Mapping[str, Any]) -> Status:
    s = _get(head, "status", dict, {})
    return Status(running=_get(s, "running", int, 0), waiting=_get(s, "waiting", int, 0),
                  can_admit=_get(s, "can_admit", bool, True))


def _submit(head: Mapping[str, Any]) -> Submit:
    try:
        mode = Mode(_get(head, "mode", str))
    except ValueError:
        raise InternalProtocolError(f"submit: unknown mode {head.get('mode')!r}") from None
    pieces_raw = _get(head, "pieces", list, [])
    pieces = tuple(_ids({"type": "submit", "p": p}, "p") if isinstance(p, list) else _bad("submit: pieces")
                   for p in pieces_raw)
    speed = float(_get(head, "speed", (int, float), 1.0))
    if not 0.25 <= speed <= 4.0:
        raise InternalProtocolError(f"submit: speed out of range: {speed}")
    return Submit(request_id=_get(head, "request_id", str), mode=mode, voice_sha256=_get(head, "voice_sha256", str),
                  prompt_text_ids=_ids(head, "prompt_text_ids"), prompt_speech_ids=_ids(head, "prompt_speech_ids"),
                  pieces=pieces, duplex=_get(head, "duplex", bool, False), speed=speed,
                  stream=_get(head, "stream", bool, True), seed=_get(head, "seed", (int, type(None)), None),
                  fixed_tokens=_get(head, "fixed_tokens", (int, type(None)), None),
                  debug=_get(head, "debug", bool, False))


def _bad(what: str) -> Any:
    raise InternalProtocolError(f"{what} is malformed")


def _chunk_head(head: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
    samples = _get(head, "samples", int)
    if samples < 0:
        raise InternalProtocolError("chunk: negative sample count")
    detail = _get(head, "detail", dict, {})
    if not all(isinstance(v, (int, float)) for v in detail.values()):
        raise InternalProtocolError("chunk: detail values must be numbers")
    return samples, {"generate_time_s": float(_get(head, "generate_time_s", (int, float))),
                     "llm_tokens": _get(head, "llm_tokens", int), "flow_batch": _get(head, "flow_batch", int, 1),
                     "vocoder_batch": _get(head, "vocoder_batch", int, 1), "detail": detail,
                     "status": _status_of(head)}


class Reader:
    """Frames in (whole WebSocket messages, in order) -> messages out; pairs headers with binary frames.

    `to_backend=True` accepts what a backend receives, False what a frontend receives; anything else
    is an `InternalProtocolError`."""

    def __init__(self, to_backend: bool) -> None:
        self._to_backend = to_backend
        self._waiting: tuple[str, Mapping[str, Any], Any] | None = None  # header awaiting its binary frame

    @property
    def expecting_binary(self) -> bool:
        return self._waiting is not None

    def feed(self, frame: Frame) -> Message | None:
        """One frame; the message it completes, or None (a header whose binary frame is still to come)."""
        if isinstance(frame, bytes):
            return self._binary(frame)
        if self._waiting is not None:
            raise InternalProtocolError(f"{self._waiting[0]}: expected its binary frame, got a text frame")
        try:
            head = json.loads(frame)
        except (ValueError, RecursionError):  # RecursionError: nested too deep
            raise InternalProtocolError("text frame is not JSON") from None
        if not isinstance(head, dict) or not isinstance(head.get("type"), str):
            raise InternalProtocolError("text frame is not an object with a string 'type'")
        kind = head["type"]
        allowed = ("submit", "voice", "push_tokens", "finish_text", "cancel") if self._to_backend \
            else ("need_voice", "chunk", "finished", "failed")
        if kind not in allowed:
            raise InternalProtocolError(f"unknown message type {kind!r}")
        return self._text(kind, head)

    def _text(self, kind: str, head: Mapping[str, Any]) -> Message | None:
        if kind == "submit":
            submit = _submit(head)
            if _get(head, "voice_attached", bool, False):
                self._waiting = (kind, head, submit)
                return None
            return submit
        if kind in ("voice", "chunk"):
            self._waiting = (kind, head, _chunk_head(head) if kind == "chunk" else None)
            return None
        if kind == "push_tokens":
            return PushTokens(_ids(head, "ids"))
        if kind == "finished":
            return Finished(_get(head, "total_samples", int), _get(head, "llm_tokens", int), _status_of(head))
        if kind == "failed":
            try:
                code = ErrorCode(_get(head, "code", str))
            except ValueError:
                raise InternalProtocolError(f"failed: unknown error code {head.get('code')!r}") from None
            return Failed(code, _get(head, "message", str), _status_of(head))
        return {"finish_text": FinishText, "cancel": Cancel, "need_voice": NeedVoice}[kind]()

    def _binary(self, data: bytes) -> Message:
        if self._waiting is None:
            raise InternalProtocolError("binary frame without a header announcing it")
        kind, _head, parsed = self._waiting
        self._waiting = None
        if kind == "submit":
            return _replace_voice(parsed, decode_voice(data))
        if kind == "voice":
            return Voice(decode_voice(data))
        samples, fields = parsed
        if len(data) != 4 * samples:
            raise InternalProtocolError(f"chunk: header says {samples} samples, binary frame has {len(data)} bytes")
        return Chunk(pcm=np.frombuffer(data, dtype="<f4").astype(np.float32), **fields)


def _replace_voice(submit: Submit, voice: VoiceFeatures) -> Submit:
    if voice.sha256() != submit.voice_sha256:
        raise InternalProtocolError("submit: the attached voice does not match voice_sha256")
    return replace(submit, voice=voice)


def encode_features_request(wav: np.ndarray, sample_rate: int, text: str) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, wav=np.asarray(wav, np.float32), sample_rate=np.array(sample_rate, np.int64), text=np.array(text))
    return buf.getvalue()


def decode_features_request(data: bytes) -> tuple[np.ndarray, int, str]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return z["wav"].astype(np.float32), int(z["sample_rate"]), str(z["text"])
    except Exception as exc:  # noqa: BLE001
        raise InternalProtocolError(f"features request is not a valid npz (wav, sample_rate, text): {exc}") from None

