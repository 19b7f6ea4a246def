"""Mel filterbanks and the two log-mel front ends of the prompt (spec §3.3, §2.5).

* `slaney_mel_filters`: librosa's default mel filterbank (Slaney mel scale + Slaney area norm),
  written from its formula; float64 maths, float32 result, as librosa.
* `whisper_log_mel`: openai-whisper `log_mel_spectrogram` (n_fft 400, hop 160, 128 mels), the input
  of the S3 speech tokenizer.
* `flow_prompt_mel`: Matcha `mel_spectrogram` with CosyVoice2's 24 kHz settings (fmax 8000,
  center=False after a manual reflect pad), the flow's prompt feature.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

# Slaney mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above (27 mels per factor 6.4).
_F_SP = 200.0 / 3.0
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = math.log(6.4) / 27.0


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    mel = hz / _F_SP
    log_part = _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(hz >= _MIN_LOG_HZ, log_part, mel)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    hz = _F_SP * mel
    log_part = _MIN_LOG_HZ * np.exp(_LOGSTEP * (mel - _MIN_LOG_MEL))
    return np.where(mel >= _MIN_LOG_MEL, log_part, hz)


@functools.lru_cache(maxsize=8)
def slaney_mel_filters(
    sr: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """[n_mels, n_fft//2 + 1] float32 triangular filters, area-normalised (librosa defaults)."""
    fmax = sr / 2.0 if fmax is None else fmax
    fft_hz = np.fft.rfftfreq(n_fft, d=1.0 / sr)
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    widths = np.diff(edges_hz)
    ramps = edges_hz[:, None] - fft_hz[None, :]
    weights = np.zeros((n_mels, fft_hz.size), dtype=np.float32)  # float32 store, like librosa
    for i in range(n_mels):
        rising = -ramps[i] / widths[i]
        falling = ramps[i + 2] / widths[i + 1]
        weights[i] = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges_hz[2 : n_mels + 2] - edges_hz[:n_mels]))[:, None]
    weights.setflags(write=False)  # cached: shared by every caller
    return weights


@functools.lru_cache(maxsize=8)
def _hann(n: int) -> torch.Tensor:
    return torch.hann_window(n)  # periodic, as torch.stft users (whisper, matcha) build it


def _as_batch(wav: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(wav, dtype=np.float32) if not torch.is_tensor(wav) else wav)
    x = x.to(torch.float32)
    return x.unsqueeze(0) if x.dim() == 1 else x


# ---------------------------------------------------------------- whisper (speech tokenizer input)

WHISPER_SR = 16000
WHISPER_N_FFT = 400
WHISPER_HOP = 160


def whisper_log_mel(wav16k: np.ndarray | torch.Tensor, n_mels: int = 128) -> torch.Tensor:
    """[1, n_mels, L] with L = samples // 160: |STFT|^2 -> mel -> log10 -> max-8 floor -> (x+4)/4."""
    audio = _as_batch(wav16k)
    if audio.shape[0] != 1:
        raise ValueError("whisper_log_mel takes one waveform (its dynamic-range floor is per utterance)")
    stft = torch.stft(audio, WHISPER_N_FFT, WHISPER_HOP, window=_hann(WHISPER_N_FFT), return_complex=True)
    power = stft[..., :-1].abs() ** 2
    filters = torch.from_numpy(slaney_mel_filters(WHISPER_SR, WHISPER_N_FFT, n_mels).copy())
    log_spec = torch.clamp(filters @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


# ---------------------------------------------------------------- 24 kHz flow prompt mel


@dataclass(frozen=True)
class FlowMelConfig:
    """cosyvoice2.yaml `feat_extractor` (Matcha mel_spectrogram) values."""

    sample_rate: int = 24000
    n_fft: int = 1920
    hop: int = 480  # 20 ms: 2 mel frames per 25 Hz speech token
    win: int = 1920
    n_mels: int = 80
    fmin: float = 0.0
    fmax: float = 8000.0


FLOW_MEL = FlowMelConfig()


def flow_prompt_mel(wav24k: np.ndarray | torch.Tensor, cfg: FlowMelConfig = FLOW_MEL) -> torch.Tensor:
    """[B, T0, 80] natural-log mel, T0 = samples // 480 (reflect pad (n_fft-hop)/2, center=False)."""
    audio = _as_batch(wav24k)
    pad = (cfg.n_fft - cfg.hop) // 2
    if audio.shape[-1] <= pad:
        raise ValueError(f"audio too short for the prompt mel: {audio.shape[-1]} samples")
    audio = torch.nn.functional.pad(audio.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    spec = torch.stft(
        audio,
        cfg.n_fft,
        hop_length=cfg.hop,
        win_length=cfg.win,
        window=_hann(cfg.win),
        center=False,
        normalized=False,
        onesided=True,
        return_complex=True,
    )
    spec = torch.view_as_real(spec)
    magnitude = torch.sqrt(spec.pow(2).sum(-1) + 1e-9)
    basis = torch.from_numpy(
        slaney_mel_filters(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax).copy()
    )
    mel = torch.log(torch.clamp(basis @ magnitude, min=1e-5))
    return mel.transpose(1, 2).contiguous()
