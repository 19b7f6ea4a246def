"""Incremental streaming flow: each mel frame is computed once per request instead of once per chunk.

Theory of operation. In a non-final streaming call (streaming=True, finalize=False) every part of the flow
is chunk-causal and frame-aligned (spec §6.3, 6.6, 6.7):
  * token embed, up_embed, after_norm, encoder_proj, LayerNorms, FFNs: per frame;
  * the pre-lookahead conv reads tokens t-2 .. t+3, all real tokens (the 3 look-ahead ones included);
  * the upsample conv reads upsampled frames f-4 .. f (causal);
  * encoder attention is chunk-causal over 25 tokens (50 frames after upsampling), estimator attention over
    50 frames, chunks counted from the first prompt token; every estimator conv is causal;
  * the CFM noise is indexed by absolute frame and the Euler trajectory of a frame only reads the past.
The scheduler's hop schedule (prompt pad, then 25/50/100 tokens) starts every call at a multiple of 25
tokens, so the frames of earlier calls are complete chunks and their activations never change. We keep,
per request: each conformer layer's K/V, the left context of the pre-lookahead and upsample convs; and, for
each Euler step, each transformer block's K/V (cond and uncond CFG rows) and each causal conv's last k-1
input frames. A call then runs only its new frames against those caches.

The layers compute: their forward takes a `StepCache` (kernels/networks/step_cache.py) and is the same code as the
full pass. This module only orchestrates: which cache belongs to which request and Euler step (and CFG
row), batching the new tokens of several requests (right padded; attention runs per request over its own
cache length, so a row equals running it alone), buffer growth, planning and memory accounting.

Exactness needs the call to start on the chunk grid and right where the cache ends; `IncrementalFlow.can_start`
says whether a call can use the cache. A call that ends off the grid is still exact (its queries see every
key they would see in a full pass) but its last chunk is incomplete: its frames change once the chunk has
more tokens. So the cache keeps only the frames up to the call's last grid point (each layer's keys up to
there, each conv's left context taken there); the next call recomputes the rest of that chunk. This is
what a short first chunk needs (scheduler/chunk_policy.py `lead_hop`).
The final call (finalize=True, streaming=False: full attention) is not incremental: callers recompute it.
In the engine, which chunks run incrementally within what memory is the scheduler's decision
(scheduler/flow_budget.py, whose arithmetic this module uses; `flow_budget_config` gives it the numbers).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.networks.chunk_attention import chunk_causal_attention as _chunk_causal_attention  # noqa: F401 (tests)
from kernels.networks.chunk_attention import chunk_hidden as _chunk_masked  # noqa: F401 (tests)
from kernels.networks.flow import CausalMaskedDiffWithXvec
from kernels.networks.flow_encoder import UPSAMPLE_STRIDE
from kernels.networks.step_cache import KVStore, Segment
from kernels.runtime.host_buffers import empty_outside_heap
from scheduler import flow_budget
from scheduler.flow_budget import DEFAULT_REQUEST_BYTES, FlowBudgetConfig

DEFAULT_BUDGET_BYTES = DEFAULT_REQUEST_BYTES  # per request; beyond it the request falls back to recomputing
GROWTH = 1.5  # TimeBuffer capacity after a grow: 1.5x what is needed (capped at doubling), so <= 1.5x used


class TimeBuffer:
    """A tensor grown along dim 2 (time) geometrically (x1.5 of the need); `append` returns the filled prefix.
    On the CPU a large one lives outside the malloc heap (kernels/runtime/host_buffers.py)."""

    def __init__(self) -> None:
        self.data: Tensor | None = None
        self.length = 0

    def append(self, new: Tensor, min_capacity: int = 0) -> Tensor:
        """`min_capacity`: room to allocate when this append grows the buffer, for what will follow."""
        need = self.length + new.size(2)
        if self.data is None or self.data.size(2) < need:
            old = 0 if self.data is None else self.data.size(2)
            cap = max(need, min(2 * old, int(GROWTH * need)), 64, min_capacity)
            grown = empty_outside_heap((*new.shape[:2], cap, *new.shape[3:]), new)
            if self.data is not None:
                grown[:, :, : self.length] = self.data[:, :, : self.length]
            self.data = grown
        self.data[:, :, self.length : need] = new
        self.length = need
        return self.data[:, :, :need]

    @property
    def nbytes(self) -> int:
        return 0 if self.data is None else self.data.numel() * self.data.element_size()


class KVBuffers:
    """One layer's keys and values of one request (`KVStore`), grown along time."""

    def __init__(self) -> None:
        self.k, self.v = TimeBuffer(), TimeBuffer()

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.k.append(k), self.v.append(v)

    def truncate(self, length: int) -> None:
        """Forget the frames from `length` on (the data stays until the next append overwrites it)."""
        self.k.length = min(self.k.length, length)
        self.v.length = min(self.v.length, length)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


@dataclass
class FlowStreamState:
    """One request's caches, keyed by (pass, layer). `tokens_done`: prompt+generated tokens whose frames are cached."""

    tokens_done: int = 0
    kv: dict[tuple, KVBuffers] = field(default_factory=dict)
    tails: dict[tuple, Tensor] = field(default_factory=dict)  # conv left context, (rows, C, k-1)

    @property
    def nbytes(self) -> int:
        kv = sum(b.nbytes for b in self.kv.values())
        return kv + sum(t.numel() * t.element_size() for t in self.tails.values())


@dataclass(frozen=True)
class StreamCall:
    """One request's non-final call: full token ids (prompt ++ generated incl. look-ahead)."""

    state: FlowStreamState
    tokens: Tensor  # (L,) long, prompt + generated [0, token_end)
    prompt_feat: Tensor  # (F, 80) prompt mel (F = 2P)
    embedding: Tensor  # (192,)


class _KeepFirst:
    """A request's K/V store in a call that keeps only its first `keep` new frames in the cache: attention
    sees all the new keys, the cache ends at the call's last grid point."""

    def __init__(self, store: KVBuffers, keep: int) -> None:
        self.store, self.keep = store, keep

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        keys, values = self.store.extend(k, v)
        self.store.truncate(keys.size(2) - k.size(2) + self.keep)
        return keys, values


class _BatchCache:
    """`StepCache` of one pass over a call's requests: each request's entries live in its own state under
    `scope` (the encoder, or one Euler step) and the layer; this batches them and hands them back.
    `ends` (per batch row) and `keeps` (per segment): how many new frames each request's cache keeps."""

    def __init__(self, states: list[FlowStreamState], scope: tuple, segments: list[Segment], ends: Tensor,
                 keeps: list[int]) -> None:
        self.states, self.scope, self.segments, self.ends, self.keeps = states, scope, segments, ends, keeps

    def tail(self, layer: nn.Module) -> Tensor | None:
        key = (self.scope, layer)
        found = [st.tails.get(key) for st in self.states]
        like = next((t for t in found if t is not None), None)
        if like is None:
            return None  # all requests are new: the layer's own zeros
        batch = like.new_zeros(self.ends.size(0), *like.shape[1:])
        for seg, t in zip(self.segments, found):
            if t is not None:
                batch[seg.rows] = t
        return batch

    def keep_tail(self, layer: nn.Module, tail: Tensor) -> None:
        for st, seg in zip(self.states, self.segments):
            st.tails[(self.scope, layer)] = tail[seg.rows].clone()  # not a view: the batch tensor can go

    def kv(self, layer: nn.Module) -> list[tuple[Segment, KVStore]]:
        key = (self.scope, layer)
        out: list[tuple[Segment, KVStore]] = []
        for st, seg, keep in zip(self.states, self.segments, self.keeps):
            store = st.kv.setdefault(key, KVBuffers())
            out.append((seg, store if keep == seg.new else _KeepFirst(store, keep)))
        return out

    def scaled(self, factor: int) -> _BatchCache:
        segments = [Segment(s.rows, factor * s.start, factor * s.new) for s in self.segments]
        return _BatchCache(self.states, self.scope, segments, self.ends * factor, [factor * k for k in self.keeps])


class IncrementalFlow:
    """Runs non-final streaming flow calls against per-request caches (see the module docstring)."""

    def __init__(self, flow: CausalMaskedDiffWithXvec, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        self.flow = flow
        self.budget_bytes = budget_bytes
        self.token_chunk = flow.cfg.encoder.static_chunk_size
        self.ratio = flow.cfg.token_mel_ratio

    # ------------------------------------------------------------------ planning

    def bytes_per_frame(self) -> int:
        """Cache bytes per mel frame (excluding buffer slack), from the model shapes."""
        cfg = self.flow.cfg
        d = cfg.encoder.output_size
        enc = 2 * d * (cfg.encoder.num_blocks / UPSAMPLE_STRIDE + cfg.encoder.num_up_blocks)
        est = cfg.estimator
        blocks = est.n_blocks * (2 + est.num_mid_blocks)
        est_floats = cfg.n_timesteps * 2 * blocks * 2 * est.num_heads * est.attention_head_dim
        size = next(self.flow.parameters()).element_size()
        return int((enc + est_floats) * size)

    def can_start(self, state: FlowStreamState | None, start: int, end: int) -> bool:
        """Whether a call wanting the frames of tokens [start, end) (prompt included) can run on this cache.

        It computes from the end of the cache (`tokens_done`, 0 for a new request: the first call encodes
        the prompt too), so the cache must not end after `start`; frames before `start` are dropped.
        """
        return flow_budget.can_continue(0 if state is None else state.tokens_done, start, end, self.token_chunk)

    def can_continue(self, state: FlowStreamState | None, start: int, end: int) -> bool:
        """`can_start`, and the cache up to `end` fits this object's per-request budget."""
        return self.can_start(state, start, end) and self.need_bytes(end) <= self.budget_bytes

    def need_bytes(self, end: int) -> int:
        """Cache bytes a request may hold once its frames up to token `end` are cached (with buffer slack)."""
        return flow_budget.need_bytes(end, self.bytes_per_frame(), self.ratio, GROWTH)

    def keeps_state(self, end: int) -> bool:
        """After a call ending at `end`, the cache stays valid only on the chunk grid."""
        return flow_budget.keeps_state(end, self.token_chunk)

    def budget_config(self, enabled: bool = True, per_request_bytes: int | None = None,
                      pool_bytes: int | None = None) -> FlowBudgetConfig:
        """The scheduler's flow-cache budget for this flow (per request: this object's budget by default)."""
        return FlowBudgetConfig(
            enabled=enabled,
            bytes_per_frame=self.bytes_per_frame(),
            per_request_bytes=self.budget_bytes if per_request_bytes is None else per_request_bytes,
            pool_bytes=pool_bytes,
            token_chunk=self.token_chunk,
            mel_ratio=self.ratio,
            growth=GROWTH,
            lookahead=self.flow.cfg.pre_lookahead_len,
        )

    # ------------------------------------------------------------------ the call

    @torch.inference_mode()
    def forward(self, calls: list[StreamCall], finalize: bool = False) -> list[tuple[Tensor, int]]:
        """New mel frames of each call as (mel `(80, n)` float32, absolute first frame), prompt included.

        finalize=True is the last call of a streaming request with chunk masks (streaming=True,
        finalize=True): no look-ahead tokens, the pre-lookahead conv sees zeros on the right. The
        state is then spent (its end is off the chunk grid in general). A non-final call that ends off
        the grid leaves its cache at its last grid point (see the module docstring)."""
        look = 0 if finalize else self.flow.cfg.pre_lookahead_len
        starts = [c.state.tokens_done for c in calls]
        news = [int(c.tokens.numel()) - look - s for c, s in zip(calls, starts)]
        if min(news) < 1:
            raise ValueError("a streaming call needs new tokens beyond the cached ones (plus look-ahead)")
        keeps = news if finalize else [self._grid_keep(s, n) for s, n in zip(starts, news)]
        mu = self._encode(calls, starts, news, keeps, finalize)
        frames = [self.ratio * s for s in starts]
        nf = [self.ratio * n for n in news]
        mel = self._solve(calls, mu, frames, nf, [self.ratio * k for k in keeps])
        for c, s, k in zip(calls, starts, keeps):
            c.state.tokens_done = s + k
        return [(mel[b, :, : nf[b]], frames[b]) for b in range(len(calls))]

    def _grid_keep(self, start: int, new: int) -> int:
        """How many of a call's new tokens its cache keeps: all, or those up to its last grid point."""
        end = start + new
        return new if end % self.token_chunk == 0 else end // self.token_chunk * self.token_chunk - start

    # ------------------------------------------------------------------ encoder

    def _encode(self, calls: list[StreamCall], starts: list[int], news: list[int], keeps: list[int],
                finalize: bool) -> Tensor:
        """mu `(B, 80, 2*max(news))` of each request's new tokens, right padded."""
        visible = [int(c.tokens.numel()) - s for c, s in zip(calls, starts)]
        dev = calls[0].tokens.device
        ids = torch.zeros(len(calls), max(visible), dtype=torch.long, device=dev)
        for b, (c, s, n) in enumerate(zip(calls, starts, visible)):
            ids[b, :n] = c.tokens[s:]
        segments = [Segment(slice(b, b + 1), s, n) for b, (s, n) in enumerate(zip(starts, news))]
        cache = _BatchCache([c.state for c in calls], ("enc",), segments, torch.tensor(keeps, device=dev), keeps)
        mu, _ = self.flow.encode(ids, torch.tensor(visible, device=dev), True, finalize, cache)
        return mu

    # ------------------------------------------------------------------ estimator

    def _solve(self, calls: list[StreamCall], mu: Tensor, frames: list[int], nf: list[int],
               kept: list[int]) -> Tensor:
        flow = self.flow
        noise = flow.decoder.rand_noise
        b, _, m = mu.shape
        dev, dtype = mu.device, mu.dtype
        if max(f + n for f, n in zip(frames, nf)) > noise.size(2):
            raise ValueError(f"flow input exceeds the {noise.size(2)}-frame noise buffer")
        mask = torch.stack([(torch.arange(m, device=dev) < n).to(dtype) for n in nf]).unsqueeze(1)
        spks = flow.speaker(torch.stack([c.embedding for c in calls]).to(dtype))
        cond = torch.cat([self._cond(c, f, n, m) for c, f, n in zip(calls, frames, nf)]).to(dtype)
        x0 = torch.stack([F.pad(noise[0, :, f : f + n], (0, m - n)) for f, n in zip(frames, nf)])
        # the estimator's rows are [cond rows..., uncond rows...]: request i owns rows i and i+B
        segments = [Segment(slice(i, None, b), f, n) for i, (f, n) in enumerate(zip(frames, nf))]
        ends = torch.tensor(kept + kept, device=dev)
        states = [c.state for c in calls]
        caches = [_BatchCache(states, ("est", step), segments, ends, kept) for step in range(flow.cfg.n_timesteps)]
        return flow.decoder.solve(mu, mask, spks, cond, True, x0, caches)

    @staticmethod
    def _cond(call: StreamCall, start: int, n: int, m: int) -> Tensor:
        """Prompt mel on the absolute frames [start, start+n) that fall inside the prompt; zeros elsewhere."""
        feat = call.prompt_feat
        cond = feat.new_zeros(1, feat.size(1), m)
        hi = min(feat.size(0), start + n)
        if hi > start:
            cond[0, :, : hi - start] = feat[start:hi].transpose(0, 1)
        return cond


def flow_budget_config(flow: CausalMaskedDiffWithXvec, enabled: bool, per_request_bytes: int,
                       pool_bytes: int | None) -> FlowBudgetConfig:
    """The numbers the scheduler's FlowCacheBudget needs: this flow's shapes and dtype, and the limits."""
    return IncrementalFlow(flow, per_request_bytes).budget_config(enabled, pool_bytes=pool_bytes)
