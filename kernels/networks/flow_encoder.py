"""Flow token encoder (`UpsampleConformerEncoder`, spec §6.3), batched with right padding.

Pipeline on embedded tokens `(B, T, 512)`:
  embed (Linear + LN + sqrt(d)) -> pre-lookahead conv (3 tokens of right context) -> conformer layers
  (ESPnet rel-pos MHA) -> nearest x2 upsample + causal conv -> up_embed -> up conformer layers -> after_norm.

Batch invariance: everything is causal or masked except the pre-lookahead conv, which reads 3 frames to the
right. Each row's frames past its own context are zeroed right before that conv, so a padded row sees exactly
what it would see alone (zeros when finalizing, its own 3 look-ahead tokens otherwise).

`step()` is the one forward: on all tokens (`NO_CACHE`), or on a stream's new tokens against the caches of
earlier calls (kernels/networks/step_cache.py): the convs' left context and each conformer layer's keys/values.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.config import EncoderConfig
from kernels.networks.chunk_attention import chunk_hidden
from kernels.networks.packed_linear import PackedLinear
from kernels.networks.step_cache import (
    NO_CACHE,
    KVStore,
    Segment,
    StepCache,
    conv_step,
    last_frames,
    with_left,
)

UPSAMPLE_STRIDE = 2  # hard-coded upstream
MAX_BD_ELEMENTS = 1 << 26  # rel-pos scores computed per group of rows of at most this many elements (256 MB)


# ---------------------------------------------------------------- masks and position tables


def length_mask(lengths: Tensor, size: int) -> Tensor:
    """`(B, size)` bool, True on valid frames."""
    return torch.arange(size, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def attention_mask(lengths: Tensor, size: int, chunk: int) -> Tensor:
    """Bool mask `(B, 1, 1|size, size)`: key j valid for query i.

    chunk > 0: chunk-causal, query i sees keys j < (i // chunk + 1) * chunk (chunks counted from frame 0);
    chunk == 0: key padding only (broadcast over queries).
    """
    keys = length_mask(lengths, size)[:, None, None, :]
    if chunk <= 0:
        return keys
    pos = torch.arange(size, device=lengths.device)
    limit = (torch.div(pos, chunk, rounding_mode="floor") + 1) * chunk
    return keys & (pos.unsqueeze(0) < limit.unsqueeze(1))[None, None]


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool keep-mask -> additive bias (0 / most negative finite value).

    Finite rather than -inf: a fully masked (padding) row then stays finite instead of NaN, and NaN
    would leak into valid frames through zero attention weights. Float masks are also ~2x faster
    than bool ones in CPU SDPA (no per-call conversion).
    """
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


class RelPosTable:
    """ESPnet rel-pos sinusoids `(1, 2*size-1, d)` for r = size-1 ... -(size-1).

    Values depend only on r, so one table for the largest size seen is kept and sliced (per
    device/dtype, grown on demand like upstream's `extend_pe`). Not a buffer: not in the state dict.
    """

    def __init__(self, d_model: int, initial: int = 1500) -> None:
        self.d_model = d_model
        self.initial = initial
        self._tables: dict[tuple[str, torch.dtype], Tensor] = {}

    def get(self, size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (str(device), dtype)
        table = self._tables.get(key)
        if table is None or table.size(1) < 2 * size - 1:
            with torch.inference_mode(False):  # a normal tensor: usable inside and outside inference mode
                table = _build_rel_pos(max(size, self.initial), self.d_model).to(device=device, dtype=dtype)
            current = self._tables.get(key)  # shard workers may race: the cache only ever grows
            if current is None or current.size(1) < table.size(1):
                self._tables[key] = table
        center = (table.size(1) - 1) // 2
        return table[:, center - size + 1 : center + size]


def _build_rel_pos(n: int, d_model: int) -> Tensor:
    # Same float32 arithmetic as upstream (position * div_term, then sin/cos) so values match bitwise.
    position = torch.arange(0, n, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
    pos = torch.zeros(n, d_model)
    neg = torch.zeros(n, d_model)
    pos[:, 0::2] = torch.sin(position * div_term)
    pos[:, 1::2] = torch.cos(position * div_term)
    neg[:, 0::2] = torch.sin(-1 * position * div_term)
    neg[:, 1::2] = torch.cos(-1 * position * div_term)
    return torch.cat([torch.flip(pos, [0]), neg[1:]], dim=0).unsqueeze(0)


def rel_shift(bd: Tensor) -> Tensor:
    """`(..., T, E+T-1)` -> `(..., T, E)` with out[i, j] = bd[i, T-1-i+j] (a strided view, no copy).

    Columns of bd are r = E-1 .. -(T-1) for the last T of E frames as queries against all E as keys
    (E = T: the full pass); query i, key j then sits at r = E-T+i-j."""
    bd = bd.contiguous()
    t = bd.size(-2)
    width = bd.size(-1)
    size = (*bd.shape[:-2], t, width - t + 1)
    stride = (*bd.stride()[:-2], width - 1, 1)
    return bd.as_strided(size, stride, bd.storage_offset() + t - 1)


# ---------------------------------------------------------------- layers


class LinearEmbed(nn.Module):
    """`LinearNoSubsampling`: Linear -> LayerNorm(1e-5) -> x sqrt(d). Keys `out.0`, `out.1`."""

    def __init__(self, idim: int, odim: int) -> None:
        super().__init__()
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5))
        self.xscale = math.sqrt(odim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(x) * self.xscale


class RelPositionAttention(nn.Module):
    """ESPnet "new" rel-pos MHA: scores = ((q+u)k + rel_shift((q+v)p)) / sqrt(d_k)."""

    def __init__(self, n_head: int, n_feat: int) -> None:
        super().__init__()
        self.h = n_head
        self.d_k = n_feat // n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(n_head, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(n_head, self.d_k))
        self._projected: tuple[tuple, Tensor] | None = None  # memo of linear_pos(table), see positions()

    def pack_linears(self) -> int:
        """Pack q/k/v/out (kernels/networks/packed_linear.py); linear_pos stays: its projection is memoised
        against its weight (`positions`), which a packing would hand out as a new copy on every read."""
        for name in ("linear_q", "linear_k", "linear_v", "linear_out"):
            setattr(self, name, PackedLinear.of(getattr(self, name)))
        return 4

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(x.size(0), x.size(1), self.h, self.d_k).transpose(1, 2)

    def forward(self, x: Tensor, mask: Tensor, pos: RelPosTable) -> Tensor:
        return self.step(x, mask, pos)[0]

    def step(self, x: Tensor, mask: Tensor | None, pos: RelPosTable, kv: list[tuple[Segment, KVStore]] | None = None,
             chunk: int = 0) -> tuple[Tensor, list[tuple[Segment, KVStore]] | None]:
        """x `(B, T, d)`. Full pass (kv None): all frames, bool keep-`mask` `(B|1, 1, 1|T, T)`. Cached: each
        segment's new queries over its store's keys (extended by the new ones), chunk-causal."""
        b, t, _ = x.shape
        q = self.linear_q(x).view(b, t, self.h, self.d_k)
        k = self._heads(self.linear_k(x))
        v = self._heads(self.linear_v(x))
        q_u = (q + self.pos_bias_u).transpose(1, 2)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        if kv is None:
            assert mask is not None
            p = self.positions(pos, t, t, x.device, x.dtype)
            hidden = ~mask
            # The position term is a (H, T, 2T-1) tensor per row (~0.6 GB at T = 3000): bound the transient
            # memory by doing a few rows at a time.
            rows = max(1, MAX_BD_ELEMENTS // (self.h * t * (2 * t - 1)))
            out = torch.cat([
                self._attend(q_u[i : i + rows], q_v[i : i + rows], k[i : i + rows], v[i : i + rows], p,
                             hidden[i : i + rows] if hidden.size(0) > 1 else hidden)
                for i in range(0, b, rows)])
        else:
            out = torch.zeros_like(q_u)  # right padding stays zero (never read by valid frames)
            for seg, store in kv:
                rows, n = seg.rows, seg.new
                keys, values = store.extend(k[rows, :, :n], v[rows, :, :n])
                p = self.positions(pos, keys.size(2), n, x.device, x.dtype)
                out[rows, :, :n] = self._attend(q_u[rows, :, :n], q_v[rows, :, :n], keys, values, p,
                                                chunk_hidden(seg.start, n, chunk, x.device))
        return self.linear_out(out.transpose(1, 2).reshape(b, t, self.h * self.d_k)), kv

    def _attend(self, q_u: Tensor, q_v: Tensor, k: Tensor, v: Tensor, p: Tensor, hidden: Tensor) -> Tensor:
        """Queries: the last T of the E keys; p rows r = E-1 .. -(T-1); hidden: True where masked."""
        scale = 1.0 / math.sqrt(self.d_k)
        bd = rel_shift(torch.matmul(q_v, p.transpose(-2, -1)))  # (b, H, T, E)
        bias = (bd * scale).masked_fill(hidden, torch.finfo(bd.dtype).min)
        return F.scaled_dot_product_attention(q_u, k, v, attn_mask=bias, scale=scale)

    def positions(self, table: RelPosTable, keys: int, queries: int, device: torch.device,
                  dtype: torch.dtype) -> Tensor:
        """linear_pos of the rel-pos sinusoids for r = keys-1 .. -(queries-1): `(1, H, keys+queries-1, d_k)`.

        The projection of the whole table is kept (grown on demand, like the table) so a stream's call does
        not re-project thousands of positions per layer; it is redone when the weights change."""
        w = self.linear_pos.weight
        stamp = (device, dtype, w.data_ptr(), _version(w))
        memo = self._projected
        size = max(keys, queries)
        if memo is None or memo[0] != stamp or memo[1].size(2) < 2 * size - 1:
            grown = max(size, 0 if memo is None or memo[0] != stamp else (memo[1].size(2) + 1) // 2)
            pe = table.get(grown, device, dtype)
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, as RelPosTable's
                proj = self.linear_pos(pe).view(1, -1, self.h, self.d_k).transpose(1, 2).contiguous()
            memo = self._projected = (stamp, proj)  # one assignment: racing shard workers each use their own
        center = (memo[1].size(2) - 1) // 2
        return memo[1][:, :, center - keys + 1 : center + queries]


def _version(t: Tensor) -> int:
    """In-place updates (load_state_dict) bump it; -1 where not tracked (inference tensors)."""
    try:
        return t._version
    except RuntimeError:
        return -1


class ConformerFeedForward(nn.Module):
    def __init__(self, d: int, units: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d, units)
        self.w_2 = nn.Linear(units, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerLayer(nn.Module):
    """Pre-norm layer without macaron/conv module; LayerNorm eps 1e-12 as upstream."""

    def __init__(self, d: int, heads: int, units: int) -> None:
        super().__init__()
        self.self_attn = RelPositionAttention(heads, d)
        self.feed_forward = ConformerFeedForward(d, units)
        self.norm_ff = nn.LayerNorm(d, eps=1e-12)
        self.norm_mha = nn.LayerNorm(d, eps=1e-12)

    def forward(self, x: Tensor, mask: Tensor | None, pos: RelPosTable, cache: StepCache = NO_CACHE,
                chunk: int = 0) -> Tensor:
        x = x + self.self_attn.step(self.norm_mha(x), mask, pos, cache.kv(self.self_attn), chunk)[0]
        return x + self.feed_forward(self.norm_ff(x))


class PreLookaheadLayer(nn.Module):
    """conv(k=lookahead+1, reads right) -> LeakyReLU -> causal conv(k=3) -> + residual, on (B, T, C)."""

    def __init__(self, channels: int, lookahead: int) -> None:
        super().__init__()
        self.lookahead = lookahead
        self.conv1 = nn.Conv1d(channels, channels, lookahead + 1)
        self.conv2 = nn.Conv1d(channels, channels, 3)

    def forward(self, x: Tensor, right: Tensor) -> Tensor:
        return self.step(x, right)[0]

    def step(self, x: Tensor, right: Tensor, tail: Tensor | None = None,
             ends: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x `(B, T, C)` new frames; right `(B, T+lookahead, C)`: x's frames plus each row's right context,
        zeros beyond; tail: conv2's 2 input frames before x (None: zeros) -> (output, next call's tail)."""
        out = F.leaky_relu(self.conv1(right.transpose(1, 2)), 0.01)
        width = self.conv2.kernel_size[0] - 1
        full = with_left(out, tail, width)
        return self.conv2(full).transpose(1, 2) + x, last_frames(full, ends, width)


class Upsample1D(nn.Module):
    """Nearest x2 in time -> left-pad 4 -> conv(k=5): causal upsampling, on (B, C, T)."""

    def __init__(self, channels: int, stride: int = UPSAMPLE_STRIDE) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, channels, stride * 2 + 1)
        self.keep = 2  # the conv's left pad (2*stride upsampled frames) = 2 input frames

    def forward(self, x: Tensor) -> Tensor:
        return self.step(x)[0]

    def step(self, x: Tensor, tail: Tensor | None = None, ends: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x `(B, C, T)` new frames, tail the `keep` input frames before them (None: zeros) -> (output
        `(B, C, stride*T)`, next call's tail). Zeros before upsampling = the conv's left pad after it."""
        full = with_left(x, tail, self.keep)
        return self.conv(torch.repeat_interleave(full, self.stride, dim=2)), last_frames(full, ends, self.keep)


class UpsampleConformerEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig, input_size: int, lookahead: int) -> None:
        super().__init__()
        d = cfg.output_size
        self.cfg = cfg
        self.embed = LinearEmbed(input_size, d)
        self.pre_lookahead_layer = PreLookaheadLayer(d, lookahead)
        self.encoders = nn.ModuleList(
            ConformerLayer(d, cfg.attention_heads, cfg.linear_units) for _ in range(cfg.num_blocks)
        )
        self.up_layer = Upsample1D(d)
        self.up_embed = LinearEmbed(d, d)
        self.up_encoders = nn.ModuleList(
            ConformerLayer(d, cfg.attention_heads, cfg.linear_units) for _ in range(cfg.num_up_blocks)
        )
        self.after_norm = nn.LayerNorm(d, eps=1e-5)
        self.rel_pos = RelPosTable(d)

    def forward(self, tokens_emb: Tensor, visible_lens: Tensor, enc_lens: Tensor, streaming: bool,
                cache: StepCache = NO_CACHE) -> Tensor:
        """tokens_emb `(B, L, C)` embedded tokens; visible_lens: tokens per row incl. look-ahead context;
        enc_lens: tokens per row that produce output (visible - lookahead when not finalizing).
        Returns h `(B, 2*max(enc_lens), d)`; row b is valid on its first 2*enc_lens[b] frames.
        With a cache (streaming only): the rows are each request's new tokens, after the cached ones."""
        look = self.pre_lookahead_layer.lookahead
        x = self.embed(tokens_emb)
        t_enc = int(enc_lens.max())
        # Zero everything after each row's context (what batch-1 upstream sees: zeros or its own context).
        right = x * length_mask(visible_lens, x.size(1)).unsqueeze(-1).to(x.dtype)
        right = F.pad(right, (0, 0, 0, max(0, t_enc + look - right.size(1))))[:, : t_enc + look]
        x = conv_step(self.pre_lookahead_layer, cache, x[:, :t_enc], right)
        chunk = self.cfg.static_chunk_size if streaming else 0
        x = self._layers(self.encoders, x, enc_lens, chunk, cache)

        x = conv_step(self.up_layer, cache, x.transpose(1, 2)).transpose(1, 2)
        x = self.up_embed(x)
        up = UPSAMPLE_STRIDE
        x = self._layers(self.up_encoders, x, enc_lens * up, chunk * up, cache.scaled(up))
        return self.after_norm(x)

    def _layers(self, layers: nn.ModuleList, x: Tensor, lens: Tensor, chunk: int, cache: StepCache) -> Tensor:
        # a cached pass masks per request (its chunk over its cached keys): no batch mask
        mask = attention_mask(lens, x.size(1), chunk) if cache is NO_CACHE else None
        for layer in layers:
            x = layer(x, mask, self.rel_pos, cache, chunk)
        return x
