"""Kaldi-style log mel filterbank (the campplus speaker-model input), in plain torch.

Reproduces `torchaudio.compliance.kaldi.fbank(wav, num_mel_bins=80, dither=0, sample_frequency=16000)`
with every other option at its default (25 ms Povey window, 10 ms shift, snip_edges, DC removal,
pre-emphasis 0.97, 512-point power spectrum, kaldi mel scale 20 Hz .. Nyquist, log floored at
float eps), float32 throughout like torchaudio, so it matches far tighter than kaldi-native-fbank.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class FbankConfig:
    sample_rate: int = 16000
    num_mel_bins: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    preemphasis: float = 0.97
    low_freq: float = 20.0
    high_freq: float = 0.0  # <= 0 means Nyquist + high_freq
    window_power: float = 0.85  # Povey window = symmetric Hann ** 0.85

    @property
    def window_size(self) -> int:
        return int(self.sample_rate * self.frame_length_ms * 0.001)

    @property
    def window_shift(self) -> int:
        return int(self.sample_rate * self.frame_shift_ms * 0.001)

    @property
    def padded_window_size(self) -> int:
        return 1 << (self.window_size - 1).bit_length()


FBANK = FbankConfig()


def _kaldi_mel(freq: torch.Tensor | float) -> torch.Tensor | float:
    if isinstance(freq, torch.Tensor):
        return 1127.0 * (1.0 + freq / 700.0).log()
    return 1127.0 * math.log(1.0 + freq / 700.0)


@functools.lru_cache(maxsize=4)
def kaldi_mel_banks(cfg: FbankConfig = FBANK) -> torch.Tensor:
    """[num_mel_bins, padded/2 + 1] triangular filters on the kaldi mel scale (last column 0)."""
    num_fft_bins = cfg.padded_window_size // 2
    nyquist = 0.5 * cfg.sample_rate
    high_freq = cfg.high_freq + nyquist if cfg.high_freq <= 0.0 else cfg.high_freq
    mel_low, mel_high = _kaldi_mel(cfg.low_freq), _kaldi_mel(high_freq)
    delta = (mel_high - mel_low) / (cfg.num_mel_bins + 1)
    index = torch.arange(cfg.num_mel_bins).unsqueeze(1)
    left = mel_low + index * delta
    center = mel_low + (index + 1.0) * delta
    right = mel_low + (index + 2.0) * delta
    bin_width = cfg.sample_rate / cfg.padded_window_size
    mel = _kaldi_mel(bin_width * torch.arange(float(num_fft_bins))).unsqueeze(0)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.max(torch.zeros(1), torch.min(up, down))
    return torch.nn.functional.pad(banks, (0, 1))


@functools.lru_cache(maxsize=4)
def _povey_window(cfg: FbankConfig = FBANK) -> torch.Tensor:
    return torch.hann_window(cfg.window_size, periodic=False).pow(cfg.window_power)


def num_frames(num_samples: int, cfg: FbankConfig = FBANK) -> int:
    if num_samples < cfg.window_size:
        return 0
    return 1 + (num_samples - cfg.window_size) // cfg.window_shift


def kaldi_fbank(wav16k: np.ndarray | torch.Tensor, cfg: FbankConfig = FBANK) -> torch.Tensor:
    """[frames, num_mel_bins] log mel energies of one mono waveform in [-1, 1]."""
    wave = torch.as_tensor(np.asarray(wav16k, dtype=np.float32) if not torch.is_tensor(wav16k) else wav16k)
    wave = wave.to(torch.float32).reshape(-1).contiguous()
    frames_n = num_frames(wave.numel(), cfg)
    if frames_n == 0:
        return torch.empty(0, cfg.num_mel_bins)
    frames = wave.as_strided((frames_n, cfg.window_size), (cfg.window_shift, 1))
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)  # replicate-pad by one sample
    frames = (frames - cfg.preemphasis * previous) * _povey_window(cfg).unsqueeze(0)
    frames = torch.nn.functional.pad(frames, (0, cfg.padded_window_size - cfg.window_size))
    power = torch.fft.rfft(frames).abs().pow(2.0)
    energies = torch.mm(power, kaldi_mel_banks(cfg).T)
    return torch.max(energies, torch.tensor(torch.finfo(torch.float32).eps)).log()


def campplus_features(wav16k: np.ndarray | torch.Tensor, cfg: FbankConfig = FBANK) -> torch.Tensor:
    """[1, frames, 80]: fbank minus its per-utterance mean over time (what campplus.onnx takes)."""
    feat = kaldi_fbank(wav16k, cfg)
    return (feat - feat.mean(dim=0, keepdim=True)).unsqueeze(0)
