"""POST /api/v1/audio/speech: one-shot JSON (stream=false) or SSE (stream=true)."""
from __future__ import annotations

import base64

from protocol.errors import ApiError, sse_error_event
from protocol.schema import parse_speech_request
from protocol.sse import SSE_CONTENT_TYPE, speech_body, speech_chunk_event
from server.context import Ctx
from server.synthesis import Synthesis


async def synthesize(ctx: Ctx) -> None:
    state = ctx.state
    params = parse_speech_request(ctx.req.body, ctx.req.headers.get("content-type"), state.config.max_text_chars)
    voice = await state.voice(params.reference_audio_id)
    synth = Synthesis(state, ctx.request_id, params, voice, ctx.arrived_s)
    try:
        if params.stream:
            await _stream(ctx, synth)
        else:
            await _one_shot(ctx, synth)
    finally:
        synth.close()


async def _one_shot(ctx: Ctx, synth: Synthesis) -> None:
    parts: list[bytes] = []
    async for chunk in synth.chunks():  # an engine failure raises its ApiError: a plain HTTP error
        parts.append(chunk.data)
    audio = b"".join(parts)
    body = speech_body(ctx.request_id, ctx.request_id, base64.b64encode(audio).decode("ascii"), len(audio))
    await ctx.out.respond(200, [("content-type", "application/json")], body)


async def _stream(ctx: Ctx, synth: Synthesis) -> None:
    """The head goes out with the first event, so an engine failure before any audio is a plain HTTP error."""
    rid = ctx.request_id
    try:
        async for chunk in synth.chunks():
            if not ctx.out.started:
                await ctx.out.start_stream(200, [("content-type", SSE_CONTENT_TYPE),
                                                 ("cache-control", "no-cache"), ("x-accel-buffering", "no")])
            b64 = base64.b64encode(chunk.data).decode("ascii")
            await ctx.out.send_chunk(speech_chunk_event(rid, rid, b64, "stop" if chunk.last else None,
                                                        chunk.metrics))
    except ApiError as err:
        if not ctx.out.started:
            raise
        ctx.state.metrics.error(err.code)
        await ctx.out.send_chunk(sse_error_event(err, rid))
    await ctx.out.end_stream()
