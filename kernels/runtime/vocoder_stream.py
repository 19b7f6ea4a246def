"""Streaming HiFT: per-request cache state and batched chunk vocoding (spec §8.2, HiFT half).

HiFT is non-causal, so upstream re-synthesizes the last 8 mel frames of the previous chunk
together with the new ones, reusing that chunk's tail source so the sine phase continues:

    mel_in = cat(cache.mel (8 frames), new mel)           source[:3840] = cache.source
    wav    = HiFT(mel_in)
    wav[:3840] = wav[:3840]·w[:3840] + cache.speech·w[3840:]   (w = Hamming(7680), float64)
    non-final: cache <- (mel_in[-8:], source[-3840:], wav[-3840:]); emit wav[:-3840]
    final:     emit wav

Each chunk therefore emits exactly 480 × (its new mel frames) net samples, and an utterance
emits 480 × (total mel frames).

Batching: items whose mel_in lengths are equal run as one HiFT call. Items of different
lengths run in separate calls: right-padding would leak into the non-causal tail (the part
the next chunk cross-fades against), so exactness wins over a bigger batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.networks.hift import HiFTGenerator, draw_normal

MEL_CACHE_FRAMES = 8
SOURCE_CACHE_SAMPLES = 3840  # 8 frames × 480 samples
# np.hamming in float64 like upstream; the two halves sum to ~1.08 mid-overlap (App. A.10).
_SPEECH_WINDOW = torch.from_numpy(np.hamming(2 * SOURCE_CACHE_SAMPLES))


@dataclass
class VocoderState:
    """One streaming request's HiFT cache; all None until its first chunk is vocoded."""

    mel_cache: Tensor | None = None  # [80, 8]
    source_cache: Tensor | None = None  # [1, 3840]
    speech_tail: Tensor | None = None  # [3840], already cross-faded
    generator: torch.Generator | None = None  # source noise; None -> torch global RNG


def stretch_mel(mel: Tensor, speed: float) -> Tensor:
    """Time-stretch mel [80, T] to int(T / speed) frames by linear interpolation (pitch kept)."""
    if speed <= 0:
        raise ValueError(f"speed must be > 0, got {speed}")
    frames = int(mel.shape[-1] / speed)
    return F.interpolate(mel.unsqueeze(0), size=frames, mode="linear").squeeze(0)


def cross_fade(wav: Tensor, prev_tail: Tensor) -> Tensor:
    """Upstream fade_in_out: blend the first 3840 samples of wav [L] with the previous tail."""
    n = SOURCE_CACHE_SAMPLES
    out = wav.clone()
    # float64 window promotes the blend to float64, then it is stored back as float32.
    window = _SPEECH_WINDOW.to(wav.device)
    out[:n] = wav[:n] * window[:n] + prev_tail[-n:] * window[n:]
    return out


def _mel_input(state: VocoderState, mel: Tensor) -> Tensor:
    return mel if state.mel_cache is None else torch.cat([state.mel_cache, mel], dim=-1)


def _group_by_length(mels: list[Tensor]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for idx, mel in enumerate(mels):
        groups.setdefault(int(mel.shape[-1]), []).append(idx)
    return groups


def _draw_sources(hift: HiFTGenerator, f0: Tensor, states: list[VocoderState]) -> Tensor:
    """NSF source for a batch, each row's noise from that request's own generator."""
    length = f0.shape[1] * hift.upsample_scale
    noise = torch.stack([draw_normal((hift.num_harmonics, length), st.generator, f0) for st in states])
    noise = noise.transpose(1, 2)
    return hift.source(f0, noise=noise)


def _vocode_group(hift: HiFTGenerator, states: list[VocoderState], mels: list[Tensor],
                  sources: list[Tensor] | None) -> tuple[Tensor, Tensor]:
    """One HiFT call over equal-length mels -> (raw wav [G, L], source [G, 1, L] with caches)."""
    batch = torch.stack(mels)
    if sources is not None:
        s = torch.stack([src.reshape(1, -1).float() for src in sources])  # injected (parity / tests)
    else:
        s = _draw_sources(hift, hift.f0(batch), states)
    for row, st in enumerate(states):
        if st.source_cache is not None:
            s[row, :, : st.source_cache.shape[-1]] = st.source_cache
    return hift.decode(batch, s), s


def _finish_item(state: VocoderState, mel_in: Tensor, wav: Tensor, source: Tensor, is_final: bool) -> Tensor:
    if state.speech_tail is not None:
        wav = cross_fade(wav, state.speech_tail)
    if is_final:
        state.mel_cache = state.source_cache = state.speech_tail = None
        return wav
    state.mel_cache = mel_in[:, -MEL_CACHE_FRAMES:].clone()
    state.source_cache = source[:, -SOURCE_CACHE_SAMPLES:].clone()
    state.speech_tail = wav[-SOURCE_CACHE_SAMPLES:].clone()
    return wav[:-SOURCE_CACHE_SAMPLES]


@torch.inference_mode()
def vocode_chunks(hift: HiFTGenerator, items: list[tuple[VocoderState, Tensor, bool]],
                  sources: list[Tensor] | None = None) -> list[Tensor]:
    """Vocode one chunk per item (state, new mel [80, T_i], is_final); returns wav [n_i] each.

    `sources` (optional, parity/tests only) injects the full NSF source [1, L_i] per item
    instead of drawing noise; the cached source still overwrites its first 3840 samples.
    A state must appear at most once per call (its cache is updated in place).
    """
    if len({id(st) for st, _, _ in items}) != len(items):
        raise ValueError("a VocoderState appears twice in one vocode_chunks call")
    if sources is not None and len(sources) != len(items):
        raise ValueError(f"{len(sources)} sources for {len(items)} items")
    mel_ins = [_mel_input(st, mel.float()) for st, mel, _ in items]
    outputs: list[Tensor | None] = [None] * len(items)
    for idxs in _group_by_length(mel_ins).values():
        group_states = [items[i][0] for i in idxs]
        group_sources = None if sources is None else [sources[i] for i in idxs]
        wavs, srcs = _vocode_group(hift, group_states, [mel_ins[i] for i in idxs], group_sources)
        for row, i in enumerate(idxs):
            state, _, is_final = items[i]
            outputs[i] = _finish_item(state, mel_ins[i], wavs[row], srcs[row], is_final)
    return [out for out in outputs if out is not None]
