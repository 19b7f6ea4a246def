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
per request: each conformer layer's K/V, the two conformer outputs before the upsample conv; and, for each
Euler step, each transformer block's K/V (cond and uncond CFG rows) and each causal conv's last k-1 input
frames. A call then runs only its new frames against those caches.

The rel-pos term of the encoder needs (q_i + v) . p_{i-j} for new queries i against all keys j: a
(n, n+e-1) product against the projected position table (cached per layer), shifted like `rel_shift`.

Batching: new frames of several requests are right padded into one tensor for every per-frame op; only
attention runs per request (its own cache length), so a row equals running it alone.

Exactness needs the call to start on the chunk grid and right where the cache ends; `IncrementalFlow.plan`
says whether a call can use the cache. A call that ends off the grid is still exact (its queries see every
key they would see in a full pass) but its last chunk is incomplete, so the state is dropped afterwards.
The final call (finalize=True, streaming=False: full attention) is not incremental: callers recompute it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.flow import CausalMaskedDiffWithXvec, cosine_t_span
from kernels.flow_encoder import UPSAMPLE_STRIDE, ConformerLayer, RelPositionAttention
from kernels.flow_estimator import timestep_embedding

DEFAULT_BUDGET_BYTES = 8 << 30  # per request; beyond it the request falls back to recomputing
GROWTH = 1.5  # TimeBuffer capacity after a grow: 1.5x what is needed (capped at doubling), so <= 1.5x used


class TimeBuffer:
    """A tensor grown along dim 2 (time) geometrically (x1.5 of the need); `append` returns the filled prefix."""

    def __init__(self) -> None:
        self.data: Tensor | None = None
        self.length = 0

    def append(self, new: Tensor) -> Tensor:
        need = self.length + new.size(2)
        if self.data is None or self.data.size(2) < need:
            old = 0 if self.data is None else self.data.size(2)
            cap = max(need, min(2 * old, int(GROWTH * need)), 64)
            grown = new.new_empty(*new.shape[:2], cap, *new.shape[3:])
            if self.data is not None:
                grown[:, :, : self.length] = self.data[:, :, : self.length]
            self.data = grown
        self.data[:, :, self.length : need] = new
        self.length = need
        return self.data[:, :, :need]

    @property
    def nbytes(self) -> int:
        return 0 if self.data is None else self.data.numel() * self.data.element_size()


@dataclass
class FlowStreamState:
    """One request's caches. `tokens_done`: prompt+generated tokens whose frames are cached."""

    tokens_done: int = 0
    kv: dict[tuple, tuple[TimeBuffer, TimeBuffer]] = field(default_factory=dict)
    tails: dict[tuple, Tensor] = field(default_factory=dict)  # conv left context, (rows, C, k-1)

    @property
    def nbytes(self) -> int:
        kv = sum(k.nbytes + v.nbytes for k, v in self.kv.values())
        return kv + sum(t.numel() * t.element_size() for t in self.tails.values())


@dataclass(frozen=True)
class StreamCall:
    """One request's non-final call: full token ids (prompt ++ generated incl. look-ahead)."""

    state: FlowStreamState
    tokens: Tensor  # (L,) long, prompt + generated [0, token_end)
    prompt_feat: Tensor  # (F, 80) prompt mel (F = 2P)
    embedding: Tensor  # (192,)


class _Walk:
    """Per-call cursor over the caches of a batch: hands out cache keys in forward order."""

    def __init__(self, calls: list[StreamCall], starts: list[int], news: list[int], cfg_rows: int) -> None:
        self.states = [c.state for c in calls]
        self.starts, self.news, self.cfg_rows = starts, news, cfg_rows
        self.prefix: tuple = ()
        self.counter = 0

    def begin(self, *prefix: object) -> None:
        self.prefix, self.counter = tuple(prefix), 0

    def key(self) -> tuple:
        self.counter += 1
        return (*self.prefix, self.counter)

    def rows(self, b: int) -> list[int]:
        """Batch rows of request b (its CFG rows [cond, uncond] when cfg_rows == 2)."""
        return [b + i * len(self.states) for i in range(self.cfg_rows)]

    def conv(self, conv: nn.Conv1d, x: Tensor) -> Tensor:
        """Causal conv on new frames `(R, C, N)` (already masked) with each row's cached left context."""
        key, k = self.key(), conv.kernel_size[0]
        if k == 1:
            return conv(x)
        tail = x.new_zeros(x.size(0), x.size(1), k - 1)
        for b, st in enumerate(self.states):
            if key in st.tails:
                tail[self.rows(b)] = st.tails[key]
        full = torch.cat([tail, x], dim=2)
        for b, st in enumerate(self.states):
            n = self.news[b]
            st.tails[key] = full[self.rows(b), :, n : n + k - 1].clone()
        return F.conv1d(full, conv.weight, conv.bias)

    def kv(self, b: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        key = self.prefix + ("kv", self.counter)
        st = self.states[b]
        if key not in st.kv:
            st.kv[key] = (TimeBuffer(), TimeBuffer())
        kb, vb = st.kv[key]
        return kb.append(k), vb.append(v)


def _chunk_masked(start: int, n: int, chunk: int, device: torch.device) -> Tensor:
    """Bool `(n, start+n)`, True where new query i (absolute start+i) must NOT see key j (past its chunk)."""
    q = torch.arange(start, start + n, device=device)
    limit = (torch.div(q, chunk, rounding_mode="floor") + 1) * chunk
    return torch.arange(start + n, device=device).unsqueeze(0) >= limit.unsqueeze(1)


def _chunk_causal_attention(q: Tensor, keys: Tensor, values: Tensor, start: int, chunk: int) -> Tensor:
    """Attention of new queries (absolute frames start..start+n-1) over keys [0, start+n), each query seeing
    keys up to the end of its own chunk: one unmasked SDPA per chunk of queries over a key prefix (no mask
    tensor, and the masked blocks are never computed; 10-35 % faster than one masked call on CPU)."""
    n, end = q.size(2), keys.size(2)
    outs = []
    i = 0
    while i < n:
        stop = min(n, (((start + i) // chunk) + 1) * chunk - start)  # this chunk's last query + 1
        visible = min(end, start + stop)
        outs.append(F.scaled_dot_product_attention(q[:, :, i:stop], keys[:, :, :visible], values[:, :, :visible]))
        i = stop
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class IncrementalFlow:
    """Runs non-final streaming flow calls against per-request caches (see the module docstring)."""

    def __init__(self, flow: CausalMaskedDiffWithXvec, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        self.flow = flow
        self.budget_bytes = budget_bytes
        self.token_chunk = flow.cfg.encoder.static_chunk_size
        self.ratio = flow.cfg.token_mel_ratio
        self._pos: dict[int, Tensor] = {}  # id(attention) -> projected position table (1, H, 2R-1, d_k)

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

    def can_continue(self, state: FlowStreamState | None, start: int, end: int) -> bool:
        """Whether a call wanting the frames of tokens [start, end) (prompt included) can run incrementally.

        It computes from the end of the cache (`tokens_done`, 0 for a new request: the first call encodes
        the prompt too), so the cache must not end after `start`; frames before `start` are dropped.
        """
        done = 0 if state is None else state.tokens_done
        fits = self.need_bytes(end) <= self.budget_bytes
        return done <= start < end and done % self.token_chunk == 0 and fits

    def need_bytes(self, end: int) -> int:
        """Cache bytes a request may hold once its frames up to token `end` are cached (with buffer slack)."""
        return int((GROWTH * self.ratio * end + 64) * self.bytes_per_frame())

    def keeps_state(self, end: int) -> bool:
        """After a call ending at `end`, the cache stays valid only on the chunk grid."""
        return end % self.token_chunk == 0

    # ------------------------------------------------------------------ the call

    @torch.inference_mode()
    def forward(self, calls: list[StreamCall], finalize: bool = False) -> list[tuple[Tensor, int]]:
        """New mel frames of each call as (mel `(80, n)` float32, absolute first frame), prompt included.

        finalize=True is the last call of a streaming request with chunk masks (streaming=True,
        finalize=True): no look-ahead tokens, the pre-lookahead conv sees zeros on the right. The
        state is then spent (its end is off the chunk grid in general)."""
        look = 0 if finalize else self.flow.cfg.pre_lookahead_len
        starts = [c.state.tokens_done for c in calls]
        news = [int(c.tokens.numel()) - look - s for c, s in zip(calls, starts)]
        if min(news) < 1:
            raise ValueError("a streaming call needs new tokens beyond the cached ones (plus look-ahead)")
        mu = self._encode(calls, starts, news)
        frames = [self.ratio * s for s in starts]
        nf = [self.ratio * n for n in news]
        mel = self._solve(calls, mu, frames, nf)
        for c, s, n in zip(calls, starts, news):
            c.state.tokens_done = s + n
        return [(mel[b, :, : nf[b]], frames[b]) for b in range(len(calls))]

    # ------------------------------------------------------------------ encoder

    def _encode(self, calls: list[StreamCall], starts: list[int], news: list[int]) -> Tensor:
        flow, enc = self.flow, self.flow.encoder
        look = flow.cfg.pre_lookahead_len
        back = enc.pre_lookahead_layer.conv2.kernel_size[0] - 1  # conv1 outputs needed left of the new tokens
        n_max = max(news)
        dev = calls[0].tokens.device
        width = back + n_max + look
        ids = torch.zeros(len(calls), width, dtype=torch.long, device=dev)
        valid = torch.zeros(len(calls), width, dtype=torch.bool, device=dev)
        for b, (c, s, n) in enumerate(zip(calls, starts, news)):
            lo = max(0, s - back)
            hi = int(c.tokens.numel())  # s + n + look, or s + n in a final call (zeros to the right)
            ids[b, lo - (s - back) : lo - (s - back) + hi - lo] = c.tokens[lo:hi]
            valid[b, lo - (s - back) : lo - (s - back) + hi - lo] = True
        dtype = flow.input_embedding.weight.dtype
        x = enc.embed(flow.input_embedding(ids) * valid.unsqueeze(-1).to(dtype))
        x = x * valid.unsqueeze(-1).to(x.dtype)  # zeros beyond each row's context, as the full pass sees
        pre = enc.pre_lookahead_layer
        c1 = F.leaky_relu(pre.conv1(x.transpose(1, 2)), 0.01)  # outputs for tokens s-back .. s+n_max-1
        c1 = c1 * valid[:, : c1.size(2)].unsqueeze(1).to(c1.dtype)  # conv2's zero left pad before token 0
        x = pre.conv2(c1).transpose(1, 2) + x[:, back : back + n_max]

        walk = _Walk(calls, starts, news, cfg_rows=1)
        chunk = enc.cfg.static_chunk_size
        walk.begin("enc")
        for layer in enc.encoders:
            x = self._conformer(walk, layer, x, chunk)
        x = self._upsample(walk, x)
        x = enc.up_embed(x)
        up = _Walk(calls, [UPSAMPLE_STRIDE * s for s in starts], [UPSAMPLE_STRIDE * n for n in news], cfg_rows=1)
        up.begin("up")
        for layer in enc.up_encoders:
            x = self._conformer(up, layer, x, chunk * UPSAMPLE_STRIDE)
        return flow.encoder_proj(enc.after_norm(x)).transpose(1, 2)

    def _upsample(self, walk: _Walk, x: Tensor) -> Tensor:
        """Nearest x2 + causal conv(k=5) on new tokens, with each row's last 2 cached tokens as left context."""
        up = self.flow.encoder.up_layer
        keep = (up.conv.kernel_size[0] - 1) // up.stride
        tail = x.new_zeros(x.size(0), keep, x.size(2))
        for b, st in enumerate(walk.states):
            if ("upsample",) in st.tails:
                tail[b] = st.tails[("upsample",)]
        full = torch.cat([tail, x], dim=1)
        for b, st in enumerate(walk.states):
            st.tails[("upsample",)] = full[b, walk.news[b] : walk.news[b] + keep].clone()
        h = torch.repeat_interleave(full.transpose(1, 2), up.stride, dim=2)
        return up.conv(h).transpose(1, 2)

    def _positions(self, att: RelPositionAttention, size: int, dev: torch.device, dtype: torch.dtype) -> Tensor:
        """linear_pos of the rel-pos table for r = size-1 .. -(size-1), cached per layer and grown on demand."""
        table = self._pos.get(id(att))
        if table is None or table.size(2) < 2 * size - 1 or table.dtype != dtype or table.device != dev:
            grown = max(size, 0 if table is None else table.size(2))  # ~doubles: table.size(2) = 2R-1
            pe = self.flow.encoder.rel_pos.get(grown, dev, dtype)
            table = att.linear_pos(pe).view(1, -1, att.h, att.d_k).transpose(1, 2).contiguous()
            # shard workers may race here: each uses its own table; the cache only ever grows
            current = self._pos.get(id(att))
            if current is None or current.size(2) < table.size(2) or current.dtype != dtype or current.device != dev:
                self._pos[id(att)] = table
        center = (table.size(2) - 1) // 2
        return table[:, :, center - size + 1 : center + size]

    def _conformer(self, walk: _Walk, layer: ConformerLayer, x: Tensor, chunk: int) -> Tensor:
        att = layer.self_attn
        walk.key()
        b_all, n_max, _ = x.shape
        xn = layer.norm_mha(x)
        q = att.linear_q(xn).view(b_all, n_max, att.h, att.d_k)
        k = att._heads(att.linear_k(xn))
        v = att._heads(att.linear_v(xn))
        q_u = (q + att.pos_bias_u).transpose(1, 2)
        q_v = (q + att.pos_bias_v).transpose(1, 2)
        scale = 1.0 / math.sqrt(att.d_k)
        out = torch.zeros_like(q_u)
        for b in range(b_all):
            s, n = walk.starts[b], walk.news[b]
            e = s + n
            keys, values = walk.kv(b, k[b : b + 1, :, :n], v[b : b + 1, :, :n])
            # p rows for r = e-1 .. -(n-1); query i' (absolute s+i') vs key j uses r = s+i'-j
            p = self._positions(att, e, x.device, x.dtype)[:, :, : e + n - 1]
            bd = torch.matmul(q_v[b : b + 1, :, :n], p.transpose(-2, -1)).contiguous()  # (1, H, n, e+n-1)
            width = bd.size(-1)
            bd = bd.as_strided((1, att.h, n, e), (bd.stride(0), bd.stride(1), width - 1, 1),
                               bd.storage_offset() + n - 1)
            bias = (bd * scale).masked_fill(_chunk_masked(s, n, chunk, x.device), torch.finfo(bd.dtype).min)
            out[b : b + 1, :, :n] = F.scaled_dot_product_attention(q_u[b : b + 1, :, :n], keys, values,
                                                                    attn_mask=bias, scale=scale)
        x = x + att.linear_out(out.transpose(1, 2).reshape(b_all, n_max, att.h * att.d_k))
        return x + layer.feed_forward(layer.norm_ff(x))

    # ------------------------------------------------------------------ estimator

    def _solve(self, calls: list[StreamCall], mu: Tensor, frames: list[int], nf: list[int]) -> Tensor:
        flow = self.flow
        cfm = flow.decoder
        b, _, m = mu.shape
        dev, dtype = mu.device, mu.dtype
        if max(f + n for f, n in zip(frames, nf)) > cfm.rand_noise.size(2):
            raise ValueError(f"flow input exceeds the {cfm.rand_noise.size(2)}-frame noise buffer")
        mask = torch.stack([(torch.arange(m, device=dev) < n).to(dtype) for n in nf]).unsqueeze(1)
        spks = flow.speaker(torch.stack([c.embedding for c in calls]).to(dtype))
        cond = torch.cat([self._cond(c, f, n, m) for c, f, n in zip(calls, frames, nf)])
        # the ODE state, time and update stay fp32; only the estimator runs in the flow's dtype
        x = torch.stack([F.pad(cfm.rand_noise[0, :, f : f + n], (0, m - n)) for f, n in zip(frames, nf)]).float()
        static = torch.cat([mu, spks.unsqueeze(-1).expand(-1, -1, m), cond], dim=1) * mask
        static = torch.cat([static, torch.zeros_like(static)])
        mask2 = torch.cat([mask, mask])
        walk = _Walk(calls, frames, nf, cfg_rows=2)
        # Same float32 time arithmetic as CausalConditionalCFM._euler.
        t_span = cosine_t_span(flow.cfg.n_timesteps, dev, torch.float32)
        t, dt = t_span[0], t_span[1] - t_span[0]
        rate = flow.cfg.inference_cfg_rate
        for step in range(1, len(t_span)):
            walk.begin("est", step)
            v = self._step(walk, torch.cat([x, x]).to(dtype), t.expand(2 * b), static, mask2).float()
            x = x + dt * ((1.0 + rate) * v[:b] - rate * v[b:])
            t = t + dt
            if step < len(t_span) - 1:
                dt = t_span[step + 1] - t
        return x * mask.float()

    @staticmethod
    def _cond(call: StreamCall, start: int, n: int, m: int) -> Tensor:
        """Prompt mel on the absolute frames [start, start+n) that fall inside the prompt; zeros elsewhere."""
        feat = call.prompt_feat
        cond = feat.new_zeros(1, feat.size(1), m)
        hi = min(feat.size(0), start + n)
        if hi > start:
            cond[0, :, : hi - start] = feat[start:hi].transpose(0, 1)
        return cond

    def _step(self, walk: _Walk, x: Tensor, t: Tensor, static: Tensor, mask: Tensor) -> Tensor:
        """`CausalConditionalDecoder.step` on new frames; convs and attention read the step's caches."""
        est = self.flow.estimator
        temb = est.time_mlp(timestep_embedding(t, est.cfg.in_channels).to(x.dtype))
        h = torch.cat([x, static], dim=1)
        resnet, blocks, down = est.down_blocks[0]
        h = self._transform(walk, self._resnet(walk, resnet, h, mask, temb), blocks)
        skip = h
        h = walk.conv(down, h * mask)
        for resnet, blocks in est.mid_blocks:
            h = self._transform(walk, self._resnet(walk, resnet, h, mask, temb), blocks)
        resnet, blocks, up = est.up_blocks[0]
        h = self._transform(walk, self._resnet(walk, resnet, torch.cat([h, skip], dim=1), mask, temb), blocks)
        h = walk.conv(up, h * mask)
        h = self._block(walk, est.final_block, h, mask)
        return est.final_proj(h * mask) * mask

    def _resnet(self, walk: _Walk, blk: nn.Module, x: Tensor, mask: Tensor, temb: Tensor) -> Tensor:
        h = self._block(walk, blk.block1, x, mask) + blk.mlp(temb).unsqueeze(-1)
        h = self._block(walk, blk.block2, h, mask)
        return h + blk.res_conv(x * mask)

    @staticmethod
    def _block(walk: _Walk, blk: nn.Module, x: Tensor, mask: Tensor) -> Tensor:
        h = walk.conv(blk.block[0], x * mask)
        h = blk.block[2](h.transpose(1, 2)).transpose(1, 2)
        return F.mish(h) * mask

    def _transform(self, walk: _Walk, h: Tensor, blocks: nn.ModuleList) -> Tensor:
        h = h.transpose(1, 2)
        for blk in blocks:
            h = self._transformer_block(walk, blk, h)
        return h.transpose(1, 2)

    def _transformer_block(self, walk: _Walk, blk: nn.Module, x: Tensor) -> Tensor:
        walk.key()
        att = blk.attn1
        r, n_max, _ = x.shape
        hn = blk.norm1(x)

        def heads(y: Tensor) -> Tensor:
            return y.view(r, n_max, att.heads, -1).transpose(1, 2)

        q, k, v = heads(att.to_q(hn)), heads(att.to_k(hn)), heads(att.to_v(hn))
        out = torch.zeros_like(q)
        chunk = self.flow.estimator.cfg.static_chunk_size
        for b in range(len(walk.states)):
            rows, s, n = walk.rows(b), walk.starts[b], walk.news[b]
            keys, values = walk.kv(b, k[rows, :, :n], v[rows, :, :n])
            out[rows, :, :n] = _chunk_causal_attention(q[rows, :, :n], keys, values, s, chunk)
        x = x + att.to_out[0](out.transpose(1, 2).reshape(r, n_max, -1))
        return x + blk.ff(blk.norm3(x))
