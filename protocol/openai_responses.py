"""What the OpenAI-compatible routes answer: speech SSE events, the model list, the voice list.

A stored voice's *name* is its uploaded file name without the extension ("alice.wav" -> "alice");
the voice list and `voice` in a speech request both use it.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import PurePosixPath
from typing import Any, Protocol

from protocol.errors import ApiError
from protocol.openai_schema import MODEL_IDS, error_object
from protocol.sse import sse_event

MODELS_CREATED = 1734048000  # 2024-12-13, CosyVoice2's release: a fixed `created` for every model id
OWNED_BY = "cosyserve"


# ---- speech, stream_format "sse" -------------------------------------------------------------

def speech_delta_event(audio_b64: str) -> bytes:
    return sse_event({"type": "speech.audio.delta", "audio": audio_b64})


def speech_done_event(input_tokens: int, output_tokens: int) -> bytes:
    """The last event: `usage` counts the text's LLM tokens in and the speech tokens out."""
    return sse_event({"type": "speech.audio.done", "usage": {
        "input_tokens": input_tokens, "output_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens}})


def speech_error_event(err: ApiError) -> bytes:
    """A failure after the stream began: `{"type": "error", "error": {...}}`, then the stream ends."""
    return sse_event({"type": "error", **error_object(err)})


# ---- models ------------------------------------------------------------------------------------

def model_object(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": MODELS_CREATED, "owned_by": OWNED_BY}


def models_list() -> dict[str, Any]:
    return {"object": "list", "data": [model_object(m) for m in MODEL_IDS]}


# ---- voices ------------------------------------------------------------------------------------

class StoredVoice(Protocol):
    """What naming needs of a store's record (server.store.VoiceRecord)."""

    @property
    def id(self) -> str: ...
    @property
    def filename(self) -> str: ...
    @property
    def created_at(self) -> int: ...


def voice_name(filename: str) -> str:
    """The uploaded file name without its extension (and without any folder a client sent)."""
    base = PurePosixPath(filename.replace("\\", "/")).name
    return PurePosixPath(base).stem or base


def find_voice_by_name(voices: Iterable[StoredVoice], name: str) -> str | None:
    """The id of the first voice (the store lists newest first) whose name or file name is `name`."""
    for voice in voices:
        if name in (voice_name(voice.filename), voice.filename):
            return voice.id
    return None


def voices_list(voices: Sequence[StoredVoice], has_more: bool) -> dict[str, Any]:
    """OpenAI's list shape of its custom-voice objects (`audio.voice`, made from an audio sample)."""
    return {"object": "list", "has_more": has_more, "data": [
        {"id": v.id, "name": voice_name(v.filename), "object": "audio.voice", "created_at": v.created_at,
         "type": "audio_sample"} for v in voices]}
