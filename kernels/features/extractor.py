"""Prompt audio -> `VoicePrompt` (spec §3.3): the features of a reference voice, computed once at upload.

`PromptExtractor.extract` does upstream's three passes over the reference audio:
16 kHz whisper log-mel -> speech tokenizer -> tokens (P0); 16 kHz kaldi fbank - mean -> campplus ->
192-d embedding; 24 kHz Matcha mel -> [T0, 80]; then `align_prompt`. The log-mel and fbank front ends
are torch (imported on first use); the ONNX models run on onnxruntime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from frontend.model_files import CAMPPLUS_FILE, SPEECH_TOKENIZER_FILE
from frontend.prompt import (
    FLOW_SR,
    MAX_PROMPT_SECONDS,
    MIN_INPUT_SR,
    TOKENIZER_SR,
    PromptAudioError,
    align_prompt,
    mono_float32,
    resample,
)
from scheduler.jobs import VoicePrompt


class PromptExtractor:
    """Reference-voice features from one model directory's ONNX models. Thread-safe."""

    def __init__(self, model_dir: Path, intra_op_threads: int = 1) -> None:
        from kernels.features.onnx_models import SpeakerEncoder, SpeechTokenizer

        model_dir = Path(model_dir)
        self.speech_tokenizer = SpeechTokenizer(model_dir / SPEECH_TOKENIZER_FILE, intra_op_threads)
        self.speaker_encoder = SpeakerEncoder(model_dir / CAMPPLUS_FILE, intra_op_threads)

    def extract(self, wav: np.ndarray, sample_rate: int, text: str) -> VoicePrompt:
        """Features of a mono float waveform in [-1, 1] at any rate >= 16 kHz."""
        if sample_rate < MIN_INPUT_SR:
            raise PromptAudioError(f"prompt audio sample rate {sample_rate} Hz is below {MIN_INPUT_SR} Hz")
        audio = mono_float32(wav)
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
        wav16k, wav24k = mono_float32(wav16k), mono_float32(wav24k)
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
        from kernels.features.mel import whisper_log_mel

        return self.speech_tokenizer(whisper_log_mel(wav16k).numpy())[0]

    def embedding(self, wav16k: np.ndarray) -> np.ndarray:
        """float32 [192] campplus x-vector."""
        from kernels.features.fbank import campplus_features

        return self.speaker_encoder(campplus_features(wav16k).numpy())[0]

    def prompt_mel(self, wav24k: np.ndarray) -> np.ndarray:
        """float32 [T0, 80] unaligned 24 kHz log-mel."""
        from kernels.features.mel import flow_prompt_mel

        return flow_prompt_mel(wav24k)[0].numpy()
