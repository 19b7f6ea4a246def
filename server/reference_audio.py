"""Reference-audio routes: upload (decode + features off the loop), list, get, delete.

A store out of space (disk full, quota, file size limit) answers 507 InsufficientStorage; the store has
already removed what the failed upload wrote, and everything else keeps working.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar, TypeVarTuple

import numpy as np

from frontend.prompt import PromptAudioError
from protocol.audio_in import decode_upload
from protocol.errors import InsufficientStorage, InvalidParameter
from protocol.multipart import parse_multipart
from protocol.schema import parse_list_query
from scheduler.jobs import VoicePrompt
from server.context import Ctx
from server.paths import REFERENCE
from server.state import ServerState
from server.storage_errors import is_out_of_space
from server.store import VoiceRecord
from server.voice_ids import check_voice_id, not_found
from server.voices import with_text_ids

log = logging.getLogger(__name__)
T = TypeVar("T")
Args = TypeVarTuple("Args")


async def upload(ctx: Ctx) -> None:
    state = ctx.state
    fields, files = parse_multipart(ctx.req.body, ctx.req.headers.get("content-type", ""),
                                    state.config.max_body_bytes)
    filename, data = _file_part(files)
    text = fields.get("text")
    if text is None or not str(text).strip():
        raise InvalidParameter("'text' is required and must not be empty")
    text = str(text)
    if len(text) > state.config.max_text_chars:
        raise InvalidParameter(f"'text' is too long: at most {state.config.max_text_chars} characters")
    pcm_rate = _pcm_rate(fields.get("sample_rate"))
    wav, sr = await state.run_blocking(decode_upload, data, filename, pcm_rate)
    prompt = await _extract(state, wav, sr, text)
    record: VoiceRecord = await _store_call(state, "the voice was not stored", state.store.add,
                                            filename, data, text, prompt)
    state.voices.put(record.id, prompt)
    state.warm_voice(prompt)  # background: the voice's first stream then skips most of its prompt's flow
    await ctx.json(record.to_json())


async def list_voices(ctx: Ctx) -> None:
    limit, order = parse_list_query(ctx.req.query)
    records = await ctx.state.run_blocking(ctx.state.store.list, limit, order)
    await ctx.json([r.to_json() for r in records])


async def get_voice(ctx: Ctx) -> None:
    voice_id = _voice_id(ctx)
    record = await ctx.state.run_blocking(ctx.state.store.get, voice_id)
    if record is None:
        raise not_found(voice_id)
    await ctx.json(record.to_json())


async def delete_voice(ctx: Ctx) -> None:
    voice_id = _voice_id(ctx)
    if not await _store_call(ctx.state, "the voice was not deleted", ctx.state.store.delete, voice_id):
        raise not_found(voice_id)
    ctx.state.voices.drop(voice_id)  # running syntheses keep their own VoicePrompt reference
    await ctx.json({"code": "OK", "message": f"reference audio: {voice_id} deleted.", "data": {}})


async def _store_call(state: ServerState, outcome: str, fn: Callable[[*Args], T], *args: *Args) -> T:
    """A store mutation on the pool; running out of space is the client's 507, not a 500."""
    try:
        return await state.run_blocking(fn, *args)
    except Exception as exc:
        if not is_out_of_space(exc):
            raise
        log.warning("reference audio store out of space (%s): %s", outcome, exc)
        raise InsufficientStorage(f"insufficient storage: {outcome}; free some space (or delete voices) "
                                  "and try again") from None


def _features(state: ServerState, wav: np.ndarray, sr: int, text: str) -> VoicePrompt:
    """The prompt features and the transcript's token ids, stored together (one worker-pool hop)."""
    return with_text_ids(state.engine, state.extract_prompt(wav, sr, text))


async def _extract(state: ServerState, wav: np.ndarray, sr: int, text: str) -> VoicePrompt:
    try:
        return await state.run_blocking(_features, state, wav, sr, text)
    except PromptAudioError as exc:  # audio the model cannot use is the client's to fix: 400, never 500
        raise InvalidParameter(f"reference audio cannot be used: {exc}") from None


def _voice_id(ctx: Ctx) -> str:
    return check_voice_id(ctx.req.path.rstrip("/")[len(REFERENCE) + 1:])


def _file_part(files: Any) -> tuple[str, bytes]:
    part = files.get("file") if isinstance(files, dict) else None
    if part is None:
        raise InvalidParameter("'file' is required (multipart/form-data field 'file')")
    filename = getattr(part, "filename", None) or "upload"
    data = getattr(part, "data", None)
    if data is None:
        data = getattr(part, "content", b"")
    if not data:
        raise InvalidParameter("'file' is empty")
    return str(filename), bytes(data)


def _pcm_rate(raw: Any) -> int | None:
    if raw is None or raw == "":
        return None
    try:
        rate = int(str(raw))
    except ValueError:
        raise InvalidParameter(f"'sample_rate' must be an integer; got {raw!r}") from None
    if not 8000 <= rate <= 48000:
        raise InvalidParameter(f"'sample_rate' must be between 8000 and 48000; got {rate}")
    return rate
