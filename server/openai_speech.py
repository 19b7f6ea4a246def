"""POST /v1/audio/speech (OpenAI-compatible): the whole file, chunked audio bytes, or SSE events.

The same Synthesis as the PAI route (engine job, encoders on the thread pool, metrics, admission);
only the request schema and the framing differ. Errors are raised as ApiError; server.openai_routes
turns them into OpenAI's error shape.
"""
from __future__ import annotations

import base64

from protocol.encoders_av import AV_FORMATS, can_encode
from protocol.errors import ApiError, NotFound
from protocol.openai_responses import (
    find_voice_by_name,
    speech_delta_event,
    speech_done_event,
    speech_error_event,
)
from protocol.openai_schema import (
    RESPONSE_FORMATS,
    SAMPLE_RATE,
    OpenAISpeechRequest,
    parse_openai_speech,
    unknown_voice,
)
from protocol.sse import SSE_CONTENT_TYPE
from scheduler.jobs import VoicePrompt
from server.context import Ctx
from server.state import ServerState
from server.synthesis import Synthesis

# The formats this server's libraries can encode (PyAV's ffmpeg may lack an encoder): others get a 400.
ENCODABLE = frozenset(f for f in RESPONSE_FORMATS if f not in AV_FORMATS or can_encode(f))
MAX_VOICES_SCANNED = 100_000  # a name lookup reads the voice list, newest first, at most this many
_STREAM_HEADERS = [("cache-control", "no-cache"), ("x-accel-buffering", "no")]  # no proxy buffering


async def synthesize(ctx: Ctx) -> None:
    state = ctx.state
    req = parse_openai_speech(ctx.req.body, ctx.req.headers.get("content-type"), ENCODABLE,
                              state.config.max_text_chars)
    voice_id, voice = await find_voice(state, req.voice)
    synth = Synthesis(state, ctx.request_id, req.speech_params(voice_id), voice, ctx.arrived_s)
    try:
        if req.stream_format == "sse":
            await _sse(ctx, synth)
        elif req.stream_format == "audio":
            await _audio_stream(ctx, synth, _audio_headers(req, synth))
        else:
            await _whole_file(ctx, synth, _audio_headers(req, synth))
    finally:
        synth.close()


async def find_voice(state: ServerState, voice: str) -> tuple[str, VoicePrompt]:
    """A stored voice by id, else by name (the newest upload of that name): (its id, its prompt).
    Unknown: a 400 naming it (OpenAI's clients treat `voice` as a parameter, not a resource)."""
    try:
        return voice, await state.voice(voice)
    except NotFound:
        pass
    records = await state.run_blocking(state.store.list, MAX_VOICES_SCANNED, "desc")
    voice_id = find_voice_by_name(records, voice)
    if voice_id is not None:
        try:
            return voice_id, await state.voice(voice_id)
        except NotFound:  # deleted since the listing
            pass
    raise unknown_voice(voice)


def _audio_headers(req: OpenAISpeechRequest, synth: Synthesis) -> list[tuple[str, str]]:
    headers = [("content-type", synth.content_type)]  # X-Request-Id: protocol.http adds it to every response
    if req.response_format == "pcm":  # raw samples say nothing about their rate
        headers.append(("x-sample-rate", str(SAMPLE_RATE)))
    return headers


async def _whole_file(ctx: Ctx, synth: Synthesis, headers: list[tuple[str, str]]) -> None:
    parts = [chunk.data async for chunk in synth.chunks()]  # an engine failure raises: a plain error
    await ctx.out.respond(200, headers, b"".join(parts))


async def _audio_stream(ctx: Ctx, synth: Synthesis, headers: list[tuple[str, str]]) -> None:
    """Chunked bytes as they are encoded. The head goes out with the first bytes, so a failure before
    any audio is a plain error response; a failure after it closes the connection before the
    terminating chunk, which clients report as a truncated body."""
    async for chunk in synth.chunks():
        if chunk.data:
            if not ctx.out.started:
                await ctx.out.start_stream(200, headers + _STREAM_HEADERS)
            await ctx.out.send_chunk(chunk.data)
    if not ctx.out.started:
        await ctx.out.start_stream(200, headers + _STREAM_HEADERS)
    await ctx.out.end_stream()


async def _sse(ctx: Ctx, synth: Synthesis) -> None:
    """`speech.audio.delta` per encoded piece, then `speech.audio.done` with the token usage; a failure
    after the head went out is an `error` event that ends the stream."""
    headers = [("content-type", SSE_CONTENT_TYPE), *_STREAM_HEADERS]
    try:
        async for chunk in synth.chunks():
            if not ctx.out.started:
                await ctx.out.start_stream(200, headers)
            if chunk.data:
                await ctx.out.send_chunk(speech_delta_event(base64.b64encode(chunk.data).decode("ascii")))
        await ctx.out.send_chunk(speech_done_event(synth.input_tokens, synth.output_tokens))
    except ApiError as err:
        if not ctx.out.started:
            raise
        ctx.state.metrics.error(err.code)
        await ctx.out.send_chunk(speech_error_event(err))
    await ctx.out.end_stream()
