"""Prompt audio checks and alignment, and the per-mode LLM prompt ids (spec §3.3, §4). Torch-free.

The features themselves (whisper log-mel, kaldi fbank, the two ONNX models) are computed by the
kernels' `PromptExtractor`; this module holds what it shares with the server: the rate and length
limits, `PromptAudioError`, resampling, and the 2:1 alignment the flow relies on:
token_len = min(T0 // 2, P0), tokens[:token_len], mel[:2 * token_len].
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from frontend.tokenizer import ENDOFPROMPT
from scheduler.jobs import Mode, VoicePrompt

if TYPE_CHECKING:
    from frontend.text_normalize import TextFrontend
    from frontend.text_process import TextProcess

TOKENIZER_SR = 16000  # speech tokens and speaker embedding
FLOW_SR = 24000  # prompt mel
MIN_INPUT_SR = 16000  # upstream load_wav asserts the file rate is at least the 16 kHz target
MAX_PROMPT_SECONDS = 30.0  # upstream assert before speech-token extraction
MEL_FRAMES_PER_TOKEN = 2


class PromptAudioError(ValueError):
    """The reference audio cannot be used (too short, too long, wrong rate or shape)."""


def mono_float32(wav: np.ndarray) -> np.ndarray:
    arr = np.asarray(wav, dtype=np.float32)
    if arr.ndim == 2:  # soundfile layout [frames, channels]: average channels, as upstream
        arr = arr.mean(axis=1)
    if arr.ndim != 1:
        raise PromptAudioError(f"prompt audio must be mono [samples], got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise PromptAudioError("prompt audio contains NaN or infinite samples")
    return arr


def resample(wav: np.ndarray, from_sr: int, to_sr: int) -> np.ndarray:
    """soxr very-high-quality resampling; identity when the rates match."""
    if from_sr == to_sr:
        return wav
    import soxr

    return np.asarray(soxr.resample(wav, from_sr, to_sr, quality="VHQ"), dtype=np.float32)


def align_prompt(tokens: np.ndarray, mel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Trim so mel has exactly 2 frames per token (the flow subtracts 2P prompt frames)."""
    token_len = min(mel.shape[0] // MEL_FRAMES_PER_TOKEN, tokens.shape[0])
    return tokens[:token_len], mel[: MEL_FRAMES_PER_TOKEN * token_len]


# ---------------------------------------------------------------- LLM prompt layouts (spec §4.1)


@dataclass(frozen=True)
class LLMPromptIds:
    """What goes between `sos` and `task_id` (text ids) and after `task_id` (speech tokens)."""

    prompt_text_ids: list[int]
    prompt_speech_tokens: list[int]


def instruct_with_endofprompt(instruct: str) -> str:
    """Deviation from upstream HEAD (which appends nothing since 2025-12-08): a user's instruct
    without `<|endofprompt|>` gets it appended, as the model was trained to see it there."""
    return instruct if ENDOFPROMPT in instruct else instruct + ENDOFPROMPT


def voice_speech_ids(voice: VoicePrompt) -> list[int]:
    """The voice's speech tokens as the zero-shot LLM prompt takes them."""
    return [int(t) for t in np.asarray(voice.speech_tokens).reshape(-1)]


def transcript_ids(voice: VoicePrompt, text_frontend: TextFrontend | TextProcess) -> tuple[int, ...]:
    """The zero-shot LLM prompt text: the ids kept with the voice, else its transcript normalised as one
    piece and tokenised now (`encode_whole`)."""
    if voice.text_ids is not None:
        return voice.text_ids
    return tuple(text_frontend.encode_whole(voice.text))


def with_transcript_ids(voice: VoicePrompt, text_frontend: TextFrontend | TextProcess) -> VoicePrompt:
    """The voice with its transcript's ids kept (computed once here, never again per request)."""
    if voice.text_ids is not None:
        return voice
    return replace(voice, text_ids=transcript_ids(voice, text_frontend))


def llm_prompt_for(
    mode: Mode, voice: VoicePrompt, text_frontend: TextFrontend, instruct: str | None
) -> LLMPromptIds:
    """The LLM prompt of one request; the flow always gets the voice's tokens, mel and embedding."""
    if mode == Mode.ZERO_SHOT:
        return LLMPromptIds(list(transcript_ids(voice, text_frontend)), voice_speech_ids(voice))
    if mode == Mode.CROSS_LINGUAL:
        return LLMPromptIds([], [])
    if mode == Mode.INSTRUCT:
        if not instruct or not instruct.strip():
            raise ValueError("instruct mode needs a non-empty instruct text")
        # Not normalised, as upstream: the instruction is a prompt, not text to be spoken.
        return LLMPromptIds(text_frontend.encode(instruct_with_endofprompt(instruct)), [])
    raise ValueError(f"unknown mode {mode!r}")
