"""Engine objects <-> internal protocol messages (protocol.internal), for both sides of the split."""
from __future__ import annotations

from protocol import internal as wire
from scheduler.jobs import (
    AudioChunk,
    ChunkMetrics,
    EngineEvent,
    EngineStats,
    Failed,
    Finished,
    PreparedJob,
    SpeechJob,
    VoicePrompt,
)


def features_of(voice: VoicePrompt) -> wire.VoiceFeatures:
    return wire.VoiceFeatures(voice.speech_tokens, voice.embedding, voice.mel, voice.text)


def prompt_of(features: wire.VoiceFeatures) -> VoicePrompt:
    return VoicePrompt(speech_tokens=features.speech_tokens, embedding=features.embedding, mel=features.mel,
                       text=features.text)


def submit_of(prepared: PreparedJob, voice_sha256: str, attach: bool) -> wire.Submit:
    job = prepared.job
    return wire.Submit(
        request_id=job.request_id, mode=job.mode, voice_sha256=voice_sha256,
        prompt_text_ids=tuple(prepared.prompt_text_ids), prompt_speech_ids=tuple(prepared.prompt_speech_ids),
        pieces=tuple(tuple(p) for p in prepared.pieces), duplex=job.text is None, speed=job.speed,
        stream=job.stream, seed=job.seed, fixed_tokens=job.fixed_tokens, debug=job.debug,
        voice=features_of(job.voice) if attach else None)


def prepared_of(submit: wire.Submit, voice: VoicePrompt) -> PreparedJob:
    """The backend's job: text is token ids already; `text` is None for duplex (pieces follow as ids) and
    "" otherwise (the engine reads only whether it is None)."""
    job = SpeechJob(request_id=submit.request_id, mode=submit.mode, voice=voice,
                    text=None if submit.duplex else "", speed=submit.speed, stream=submit.stream,
                    seed=submit.seed, fixed_tokens=submit.fixed_tokens, debug=submit.debug)
    return PreparedJob(job, submit.prompt_text_ids, submit.prompt_speech_ids, submit.pieces)


def status_of(stats: EngineStats, can_admit: bool) -> wire.Status:
    return wire.Status(running=stats.running, waiting=stats.waiting, can_admit=can_admit)


def message_of(event: EngineEvent, status: wire.Status) -> wire.ToFrontend:
    if isinstance(event, AudioChunk):
        m = event.metrics
        return wire.Chunk(pcm=event.pcm, generate_time_s=m.generate_time_s, llm_tokens=m.llm_tokens,
                          flow_batch=m.flow_batch, vocoder_batch=m.vocoder_batch, detail=dict(m.detail),
                          status=status)
    if isinstance(event, Finished):
        return wire.Finished(event.total_samples, event.llm_tokens, status)
    return wire.Failed(event.code, event.message, status)


def event_of(msg: wire.Chunk | wire.Finished | wire.Failed, request_id: str) -> EngineEvent:
    if isinstance(msg, wire.Chunk):
        return AudioChunk(request_id, msg.pcm, ChunkMetrics(msg.generate_time_s, msg.llm_tokens, msg.flow_batch,
                                                            msg.vocoder_batch, dict(msg.detail)))
    if isinstance(msg, wire.Finished):
        return Finished(request_id, msg.total_samples, msg.llm_tokens)
    return Failed(request_id, msg.code, msg.message)
