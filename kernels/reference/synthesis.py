"""Single-request synthesis: the plain, sequential reference path the batched engine is checked against.

text + voice prompt -> LLM tokens (prefill + decode loop) -> flow -> HiFT, either in one
non-streaming call or chunk by chunk with the per-request hop schedule of upstream
`CosyVoice2Model.tts(stream=True)`: first hop 25 + pad (prompt + hop on the 25-token grid),
then 50, 100, 100, ...; every non-final chunk re-runs the flow on the whole prefix plus 3
look-ahead tokens (streaming masks) and the last chunk runs with full attention.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from frontend.prompt import llm_prompt_for
from frontend.text_normalize import TextFrontend
from kernels.networks.kv_cache import KVCache
from kernels.networks.llm import generate
from kernels.networks.sampling import length_limits
from kernels.runtime.flow_cache import FlowStreamState, IncrementalFlow, StreamCall
from kernels.runtime.vocoder_stream import VocoderState, stretch_mel, vocode_chunks
from kernels.weights.model import CosyVoice2Model
from scheduler.jobs import Mode, VoicePrompt


@dataclass(frozen=True)
class HopSchedule:
    """Upstream's per-request hop schedule, written out again on purpose: this path is the independent
    reference the scheduler's ChunkPolicy is tested against, so it must not share that code."""

    first: int = 25
    growth: int = 2
    max_hop: int = 100
    lookahead: int = 3
    grid: int = 25
    lead: int = 0  # > 0: the first hop in two, `lead` tokens then the rest (the engine's opt-in lead_hop)

    def hops(self, prompt_tokens: int) -> Iterator[int]:
        pad = math.ceil(prompt_tokens / self.grid) * self.grid - prompt_tokens
        if self.first + pad > self.lead > 0:
            yield self.lead
            yield self.first + pad - self.lead
        else:
            yield self.first + pad
        hop = self.first
        while True:
            hop = min(self.max_hop, hop * self.growth)
            yield hop


def _generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator()
    gen.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF)
    return gen


class Synthesizer:
    """One request at a time, no scheduler: the reference for batching and streaming tests."""

    def __init__(self, model: CosyVoice2Model, text: TextFrontend, slot_len: int = 4096,
                 incremental: IncrementalFlow | None = None, final_streaming: bool = False, lead_hop: int = 0) -> None:
        self.model = model
        self.text = text
        self.incremental = incremental  # same flow cache rules as the engine's runner, when given
        self.final_streaming = final_streaming  # last chunk with chunk masks (else upstream: full attention)
        self.kv = KVCache.for_model(model.config.llm.qwen, 1, slot_len, model.device, next(model.llm.parameters()).dtype)
        self.schedule = HopSchedule(lookahead=model.config.flow.pre_lookahead_len, grid=model.config.chunk_size,
                                    lead=lead_hop)

    @torch.inference_mode()
    def speech_tokens(self, mode: Mode, voice: VoicePrompt, text_ids: list[int], instruct: str | None = None,
                      seed: int | None = None, fixed_tokens: int | None = None) -> list[int]:
        """The LLM half: speech token ids for one text piece (stop id excluded)."""
        lm = self.model.llm
        prompt = llm_prompt_for(mode, voice, self.text, instruct)
        lm_input = lm.build_lm_input(text_ids, prompt.prompt_text_ids, prompt.prompt_speech_tokens)
        min_len, max_len = length_limits(len(text_ids))
        if fixed_tokens is not None:
            min_len = max_len = fixed_tokens
        return list(generate(lm, self.kv, 0, lm_input, min_len, max_len, _generator(seed)))

    @torch.inference_mode()
    def token2wav(self, voice: VoicePrompt, tokens: list[int], stream: bool, speed: float = 1.0,
                  seed: int | None = None) -> Iterator[np.ndarray]:
        """The flow + vocoder half, chunked like upstream when `stream`."""
        state = VocoderState(generator=_generator(None if seed is None else seed + 1))
        if not stream:
            yield self._chunk(voice, tokens, 0, len(tokens), True, False, state, speed)
            return
        offset = 0
        hops = self.schedule.hops(len(voice.speech_tokens))
        la = self.schedule.lookahead
        self._flow_state: FlowStreamState | None = None
        for hop in hops:
            if len(tokens) - offset < hop + la:
                break
            yield self._chunk(voice, tokens, offset, offset + hop + la, False, True, state, speed)
            offset += hop
        yield self._chunk(voice, tokens, offset, len(tokens), True, self.final_streaming, state, speed)

    def _chunk(self, voice: VoicePrompt, tokens: list[int], offset: int, end: int, finalize: bool,
               streaming: bool, state: VocoderState, speed: float) -> np.ndarray:
        flow = self.model.flow
        dev = self.model.device
        dtype = next(flow.parameters()).dtype
        prompt = torch.as_tensor(np.asarray(voice.speech_tokens), dtype=torch.long, device=dev)
        seq = torch.cat([prompt, torch.tensor(tokens[:end], dtype=torch.long, device=dev)])
        feat = torch.as_tensor(np.asarray(voice.mel), dtype=dtype, device=dev)
        emb = torch.as_tensor(np.asarray(voice.embedding), dtype=dtype, device=dev)
        ratio = self.model.config.flow.token_mel_ratio
        new = self._incremental_mel(seq, feat, emb, offset, end, finalize, streaming)
        if new is None:
            mel, lens = flow.inference(
                seq[None], torch.tensor([seq.shape[0]], device=dev), feat[None],
                torch.tensor([feat.shape[0]], device=dev), emb[None], streaming, finalize,
            )
            new = mel[0, :, offset * ratio : int(lens[0])].float()
        if speed != 1.0:
            new = stretch_mel(new, speed)
        (wav,) = vocode_chunks(self.model.hift, [(state, new, finalize)])
        return wav.float().cpu().numpy()

    def _incremental_mel(self, seq: torch.Tensor, feat: torch.Tensor, emb: torch.Tensor, offset: int, end: int,
                         finalize: bool, streaming: bool) -> torch.Tensor | None:
        """New mel frames from the flow cache for a streaming chunk (chunk masks), or None to recompute."""
        previous, self._flow_state = getattr(self, "_flow_state", None), None
        if self.incremental is None or not streaming:
            return None
        prompt_len = int(seq.shape[0]) - end
        start, stop = prompt_len + offset, prompt_len + end - (0 if finalize else self.schedule.lookahead)
        if not self.incremental.can_continue(previous, start, stop):
            return None
        flow_state = previous or FlowStreamState()
        ((mel, first),) = self.incremental.forward([StreamCall(flow_state, seq, feat, emb)], finalize)
        if not finalize and self.incremental.keeps_state(flow_state.tokens_done):
            self._flow_state = flow_state
        ratio = self.model.config.flow.token_mel_ratio
        return mel[:, feat.shape[0] + offset * ratio - first :].float()

    def synthesize(self, mode: Mode, voice: VoicePrompt, text: str, instruct: str | None = None,
                   stream: bool = False, speed: float = 1.0, seed: int | None = None) -> Iterator[np.ndarray]:
        """Whole text: normalised, split into pieces, each piece synthesised in turn."""
        for index, piece in enumerate(self.text.normalize(text, split=True)):
            ids = self.text.encode(piece)
            if not ids:
                continue
            piece_seed = None if seed is None else seed + 1000 * index
            tokens = self.speech_tokens(mode, voice, ids, instruct, piece_seed)
            if tokens:
                yield from self.token2wav(voice, tokens, stream, speed, piece_seed)
