"""When a request's next flow+vocoder chunk is ready, what it covers, and which chunks go first.

Streaming hop schedule per request (spec §8.2, kept per request unlike upstream's shared
attribute): first hop = first_hop + pad with pad = ceil(P/25)*25 - P so that P + hop lands on
the 25-token chunk grid of the flow, then hop *= growth up to max_hop (25+pad, 50, 100, 100...).
A non-final chunk needs hop + lookahead generated tokens beyond the offset. After the LLM ends,
upstream keeps emitting full hops while enough tokens remain, then one final chunk with the rest
(`drain_in_hops`; chunk boundaries change the audio, so this is kept for parity).

Flow ahead (`flow_ahead`): the flow is chunk-causal on the 25-token grid, so the frames of a whole grid
chunk are final once its 3 look-ahead tokens exist, long before the hop that emits them is complete. When
no chunk is ready (the flow would idle), `next_advance` offers that work for a request's first chunk: the
prompt's last chunk (whose look-ahead is the first 3 generated tokens, so no voice prefix can hold it;
with a 3 s prompt, half the first chunk's frames) and any whole grid chunk of the first hop. The first
chunk then computes only the rest, so the first audio comes sooner. Same frames, same audio. The
scheduler asks for it only while one stream is live: on a 2-core CPU the LLM and the flow each run
~25-30 % slower side by side than alone, and two 50-frame calls cost more than one of 100, so with several
streams (C8) advances cost 5-10 % throughput for a TTFC within noise; later hops gained nothing either
(bench/results/2026-12-07-cpu2-full-flow-ahead*.md).

A short first chunk (`lead_hop`, opt-in, off by default): the first chunk advances only `lead_hop` tokens
and the second one the rest of the first hop, so every later chunk ends on the grid where upstream's do;
then 50, 100, ... as before. The first audio then needs lead_hop + 3 tokens instead of 28 (upstream's
Triton runtime starts with 15). Its frames are those of a flow call over an incomplete grid chunk
(attention sees only that chunk's tokens so far, as in any call whose hop ends off the grid), so they
differ from upstream's 25-token schedule; the second chunk recomputes that grid chunk whole and keeps
the frames after the first chunk's, so from there the mel is upstream's again (the vocoder's window at
the one extra boundary aside). Costs the flow the first chunk's frames twice, and a call: with 8 streams
on 2 cores 0.93x throughput (TTFC 0.69x) for 2 s requests. So by default only a request that starts with
no other stream live gets it (`lead_max_live`), when the cores have time for the extra work: decided once,
as the request starts (`Request.lead_hop`), so its chunks never change under it. Flow ahead still pays
with it: the prompt's last chunk is computed while the 10 tokens after the first 3 are decoded (C1, lead
10: TTFC p50 0.68x of upstream's first chunk with advances, 0.75x without them).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

from scheduler.plan import ChunkItem
from scheduler.request import Request


@dataclass(frozen=True)
class ChunkPolicyConfig:
    first_hop: int = 25  # token_hop_len
    growth: int = 2  # stream_scale_factor
    max_hop: int = 100  # token_max_hop_len
    lookahead: int = 3  # flow pre_lookahead_len
    grid: int = 25  # flow encoder chunk size in tokens
    drain_in_hops: bool = True  # after LLM end: full hops first, then the final chunk (upstream)
    max_chunks_per_step: int = 16  # flow/vocoder chunks batched in one step
    # Upstream runs a streaming request's final chunk with full attention (streaming=False), which
    # re-runs the flow over the whole utterance. True keeps the chunk masks of the earlier chunks
    # (the same context every other chunk gets), so the final chunk is incremental too.
    final_streaming: bool = True
    samples_per_token: int = 960  # 24 kHz / 25 Hz, for the audio margin
    # When some ready chunk is urgent (a first chunk, or less than this much audio left to play), a
    # step runs the urgent ones only: a new request's first packet then is not batched behind other
    # requests' long chunks, which wait one batch (they have this much audio buffered). 0 = off.
    urgent_margin_s: float = 1.0
    sample_rate: int = 24000
    flow_ahead: bool = True  # see the module docstring; False: the first chunk's flow starts when it is ready
    lead_hop: int = 0  # a shorter first chunk, in tokens (see the module docstring); 0 = off
    lead_max_live: int = 1  # ... for a request starting with at most this many live streams, itself included (0: any)

    def __post_init__(self) -> None:
        if min(self.first_hop, self.growth, self.grid, self.max_chunks_per_step) < 1:
            raise ValueError("first_hop, growth, grid, max_chunks_per_step must be >= 1")
        if self.urgent_margin_s < 0:
            raise ValueError("urgent_margin_s must be >= 0 (0 = off)")
        if self.max_hop < self.first_hop or self.lookahead < 0:
            raise ValueError("need max_hop >= first_hop and lookahead >= 0")
        if self.lead_hop < 0 or self.lead_max_live < 0:
            raise ValueError("lead_hop and lead_max_live must be >= 0 (0 = off / any)")


class ChunkPolicy:
    def __init__(self, config: ChunkPolicyConfig) -> None:
        self.config = config

    def lead_for(self, live: int) -> int:
        """The lead hop of a request starting while `live` streams are live (itself included): 0 = none."""
        cfg = self.config
        return cfg.lead_hop if cfg.lead_max_live == 0 or live <= cfg.lead_max_live else 0

    def hop(self, chunk_index: int, flow_prompt_len: int, lead: int = 0) -> int:
        """Tokens the chunk_index-th non-final chunk advances (25+pad, 50, 100, 100, ...; with a lead hop
        L: L, 25+pad-L, 50, 100, ...)."""
        cfg = self.config
        pad = math.ceil(flow_prompt_len / cfg.grid) * cfg.grid - flow_prompt_len
        first = cfg.first_hop + pad
        if 0 < lead < first:
            if chunk_index <= 1:
                return lead if chunk_index == 0 else first - lead
            chunk_index -= 1
        if chunk_index == 0:
            return first
        return min(cfg.max_hop, cfg.first_hop * cfg.growth ** min(chunk_index, 32))

    def next_chunk(self, req: Request) -> ChunkItem | None:
        """The chunk `req` can run now, or None."""
        if req.is_finished:
            return None
        n = len(req.speech_ids)
        if not req.stream:
            return self._final(req, n) if req.llm_done else None
        hop, look = self.hop(req.chunks_done, req.flow_prompt_len, req.lead_hop), self.config.lookahead
        if n - req.token_offset >= hop + look and (not req.llm_done or self.config.drain_in_hops):
            return self._make(req, req.token_offset + hop + look, final=False)
        return self._final(req, n) if req.llm_done else None

    def _final(self, req: Request, n: int) -> ChunkItem | None:
        if n == 0:
            return None  # nothing generated: the scheduler finishes the request without audio
        return self._make(req, n, final=True)

    def _make(self, req: Request, end: int, final: bool) -> ChunkItem:
        return ChunkItem(
            request_id=req.request_id,
            token_ids=tuple(req.speech_ids[:end]),
            token_offset=req.token_offset,
            token_end=end,
            finalize=final,
            streaming=not final or (req.stream and self.config.final_streaming),
            is_first=req.chunks_done == 0,
            is_last=final,
        )

    def next_advance(self, req: Request, cache_end: int) -> ChunkItem | None:
        """Flow work `req` can do before its next chunk is ready (see the module docstring): the frames up to
        the last grid point whose look-ahead tokens are generated, when that lies beyond `cache_end` (where
        its flow cache ends, flow tokens, prompt included) and past the voice-only part of the prompt.
        Only for a streaming request still generating towards its first chunk, not ready yet."""
        cfg = self.config
        if not (cfg.flow_ahead and req.stream) or req.is_finished or req.llm_done or req.chunks_done:
            return None
        if self.next_chunk(req) is not None:
            return None
        prompt, look = req.flow_prompt_len, cfg.lookahead
        point = (prompt + len(req.speech_ids) - look) // cfg.grid * cfg.grid
        if point <= cache_end or point + look <= prompt:
            return None
        end = point - prompt + look
        return replace(self._make(req, end, final=False), is_first=False, incremental=True, advance=True)

    def far_ahead(self, req: Request, chunks: int = 2) -> bool:
        """Whether `req` has the tokens of its next `chunks` chunks (the first of them may be in flight)."""
        if not req.stream:
            return False  # one chunk after the LLM ends: its LLM never waits on audio
        k = req.chunks_done
        need = sum(self.hop(k + i, req.flow_prompt_len, req.lead_hop) for i in range(chunks)) + self.config.lookahead
        return len(req.speech_ids) - req.token_offset >= need

    def margin_s(self, req: Request, now_s: float) -> float:
        """Seconds of audio handed to the listener minus seconds since it started playing: how long until
        a stall. A job's later sentence piece shares its earlier pieces' playback, so its first chunk is
        urgent only when the job's audio runs low, not merely for being a first chunk; before the job's
        first audio it comes last (it cannot be heard before that audio anyway)."""
        play = req.playback
        if play.start_s is None:
            return math.inf if req.follows else -math.inf
        return play.samples / self.config.sample_rate - (now_s - play.start_s)

    def pick(self, ready: Iterable[tuple[Request, ChunkItem]], now_s: float) -> list[ChunkItem]:
        """At most max_chunks_per_step chunks, the ones needed soonest first; only the urgent ones when
        there are any (see `urgent_margin_s`)."""
        keyed = sorted(((self.margin_s(r, now_s), r.arrival_s, c) for r, c in ready), key=lambda t: t[:2])
        if self.config.urgent_margin_s > 0 and keyed and keyed[0][0] < self.config.urgent_margin_s:
            keyed = [k for k in keyed if k[0] < self.config.urgent_margin_s]
        return [chunk for _, _, chunk in keyed[: self.config.max_chunks_per_step]]
