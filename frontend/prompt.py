"""Prompt audio -> `VoicePrompt`, and the per-mode LLM prompt ids (spec §3.3, §4).

`PromptExtractor.extract` does upstream's three passes over the reference audio:
16 kHz whisper log-mel -> speech tokenizer -> tokens (P0); 16 kHz kaldi fbank - mean -> campplus ->
192-d embedding; 24 kHz Matcha mel -> [T0, 80]. Then the 2:1 alignment the flow relies on:
token_len = min(T0 // 2, P0), tokens[:token_len], mel[:2 * token_len].
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
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


def _mono_float32(wav: np.ndarray) -> np.ndarray:
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


class PromptExtractor:
    """Reference-voice features from one model directory's ONNX models. Thread-safe."""

    def __init__(self, model_dir: Path, intra_op_threads: int = 1) -> None:
        from frontend.onnx_models import CAMPPLUS_FILE, SPEECH_TOKENIZER_FILE, SpeakerEncoder, SpeechTokenizer

        model_dir = Path(model_dir)
        self.speech_tokenizer = SpeechTokenizer(model_dir / SPEECH_TOKENIZER_FILE, intra_op_threads)
        self.speaker_encoder = SpeakerEncoder(model_dir / CAMPPLUS_FILE, intra_op_threads)

    def extract(self, wav: np.ndarray, sample_rate: int, text: str) -> VoicePrompt:
        """Features of a mono float waveform in [-1, 1] at any rate >= 16 kHz."""
        if sample_rate < MIN_INPUT_SR:
            raise PromptAudioError(f"prompt audio sample rate {sample_rate} Hz is below {MIN_INPUT_SR} Hz")
        audio = _mono_float32(wav)
        seconds = audio.shape[0] / sample_rate
        if seconds > MAX_PROMPT_SECONDS:
            raise PromptAudioError(
                f"prompt audio is {seconds:.1f} s, at most {MAX_PROMPT_SECONDS:.0f} s allowed"
            )
        wav16k = resample(audio, sample_rate, TOKENIZER_SR)
        wav24k = resample(audio, sample_rate, FLOW_SR)
        return self.features_from_16k_24k(wav16k, wav24k, text)

    def features_from_16k_24k(self, wav16k: np.ndarray, wav24k: np.ndarray, text: str) -> VoicePrompt:
        """Features from waveforms already at 16 kHz and 24 kHz (the parity fixtures give both)."""
        wav16k, wav24k = _mono_float32(wav16k), _mono_float32(wav24k)
        if wav24k.shape[0] < FLOW_SR // 10 or wav16k.shape[0] < TOKENIZER_SR // 10:
            raise PromptAudioError("prompt audio is shorter than 0.1 s")
        tokens, mel = align_prompt(self.speech_tokens(wav16k), self.prompt_mel(wav24k))
        if tokens.shape[0] == 0:
            raise PromptAudioError("prompt audio produced no speech tokens")
        return VoicePrompt(
            speech_tokens=np.ascontiguousarray(tokens, dtype=np.int32),
            embedding=self.embedding(wav16k),
            mel=np.ascontiguousarray(mel, dtype=np.float32),
            text=text,
        )

    def speech_tokens(self, wav16k: np.ndarray) -> np.ndarray:
        """int32 [P0] unaligned 25 Hz tokens."""
        from frontend.mel import whisper_log_mel

        return self.speech_tokenizer(whisper_log_mel(wav16k).numpy())[0]

    def embedding(self, wav16k: np.ndarray) -> np.ndarray:
        """float32 [192] campplus x-vector."""
        from frontend.fbank import campplus_features

        return self.speaker_encoder(campplus_features(wav16k).numpy())[0]

    def prompt_mel(self, wav24k: np.ndarray) -> np.ndarray:
        """float32 [T0, 80] unaligned 24 kHz log-mel."""
        from frontend.mel import flow_prompt_mel

        return flow_prompt_mel(wav24k)[0].numpy()


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
