"""CFM velocity estimator (`CausalConditionalDecoder`, spec §6.6): a one-level causal 1-D U-Net.

Input channels [x, mu, spk broadcast over time, cond] -> down (resnet + transformers + causal conv) ->
mid blocks -> up (concat skip) -> final block -> 1x1 proj. Convs are causal (left pad k-1) and read
`x * mask`; attention is key-masked (chunk-causal when streaming), so right padding never reaches valid
frames. Module names mirror upstream so `state_dict()` keys equal `flow.pt`'s.

`prepare()` builds what is constant across the Euler steps of one solve (conditioning channels, masks);
`step()` is the one forward: on all frames (`NO_CACHE`), or on a stream's new frames against the caches of
earlier calls (kernels/networks/step_cache.py; then attention is chunk-causal per request over its cached keys).
`forward()` is the fixture-compatible one-shot call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.config import EstimatorConfig
from kernels.networks.chunk_attention import chunk_causal_attention
from kernels.networks.flow_encoder import additive_mask, attention_mask
from kernels.networks.packed_linear import (
    PackedLinear,
    conv_runs_packed,
    pack_conv1d,
    pack_weight,
    packed_conv1d,
    packed_linear,
    runs_packed,
)
from kernels.networks.step_cache import (
    NO_CACHE,
    KVStore,
    Segment,
    StepCache,
    conv_step,
    last_frames,
    with_left,
)

TIME_SCALE = 1000.0  # SinusoidalPosEmb scale


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Matcha `SinusoidalPosEmb`: [sin(1000 t f), cos(1000 t f)], f_i = exp(-i ln(1e4) / (dim/2 - 1))."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
    arg = TIME_SCALE * t.reshape(-1).unsqueeze(1) * freq.unsqueeze(0)
    return torch.cat((arg.sin(), arg.cos()), dim=-1)


class PackableConv1d(nn.Conv1d):
    """A Conv1d that can also run as a packed matmul (kernels/networks/packed_linear.py `packed_conv1d`) where
    that is faster; its weight stays for the rest."""

    _packed: Tensor | None = None

    def pack_linears(self) -> int:
        self._packed = pack_conv1d(self)
        return 1

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return self.convolve(x)

    def convolve(self, x: Tensor) -> Tensor:
        k = self.kernel_size[0]
        if conv_runs_packed(x, self._packed, k):
            return packed_conv1d(x, self._packed, self.bias, k)
        return super().forward(x)


class CausalConv1d(PackableConv1d):
    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return self.step(x)[0]

    def step(self, x: Tensor, tail: Tensor | None = None, ends: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x `(R, C, N)` new frames, tail the k-1 input frames before them (None: zeros, the start) ->
        (output, the k-1 frames before row b's frame ends[b]: the next call's tail)."""
        width = self.kernel_size[0] - 1
        full = with_left(x, tail, width)
        return self.convolve(full), last_frames(full, ends, width)


class CausalBlock1D(nn.Module):
    """causal conv(k=3) -> LayerNorm over channels -> Mish, masked in and out.

    Upstream's Sequential holds parameter-free Transpose/Mish at indices 1, 3, 4; the Identity at 1
    keeps the LayerNorm at `block.2` so the state-dict keys match.
    """

    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.block = nn.Sequential(CausalConv1d(dim, dim_out, 3), nn.Identity(), nn.LayerNorm(dim_out))

    def forward(self, x: Tensor, mask: Tensor, cache: StepCache = NO_CACHE) -> Tensor:
        h = conv_step(self.block[0], cache, x * mask)
        h = self.block[2](h.transpose(1, 2)).transpose(1, 2)
        return F.mish(h) * mask


class CausalResnetBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_dim, dim_out))
        self.block1 = CausalBlock1D(dim, dim_out)
        self.block2 = CausalBlock1D(dim_out, dim_out)
        self.res_conv = PackableConv1d(dim, dim_out, 1)

    def forward(self, x: Tensor, mask: Tensor, temb: Tensor, cache: StepCache = NO_CACHE) -> Tensor:
        h = self.block1(x, mask, cache) + self.mlp(temb).unsqueeze(-1)
        h = self.block2(h, mask, cache)
        return h + self.res_conv(x * mask)


class Attention(nn.Module):
    """diffusers `Attention` as used by Matcha: no q/k/v bias, SDPA, to_out.0 with bias."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        self._qkv: Tensor | None = None  # q/k/v weights as one packed matmul (`pack_linears`)

    def pack_linears(self) -> int:
        """One packed matmul for q/k/v (kernels/networks/packed_linear.py), the output projection packed."""
        self._qkv = pack_weight(torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight]))
        self.to_out[0] = PackedLinear.of(self.to_out[0])
        return 4

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self._qkv is not None and runs_packed(x, self._qkv):
            return packed_linear(x, self._qkv, None).split(self.to_q.out_features, dim=-1)
        return self.to_q(x), self.to_k(x), self.to_v(x)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        return self.step(x, mask)[0]

    def step(self, x: Tensor, mask: Tensor | None, kv: list[tuple[Segment, KVStore]] | None = None,
             chunk: int = 0) -> tuple[Tensor, list[tuple[Segment, KVStore]] | None]:
        """x `(R, T, dim)`. Full pass (kv None): one call over all frames with the additive `mask`.
        Cached: each segment's new queries over its store's keys (extended by the new ones), chunk-causal."""
        b, t, _ = x.shape

        def heads(y: Tensor) -> Tensor:
            return y.view(b, t, self.heads, -1).transpose(1, 2)

        q, k, v = (heads(y) for y in self._project(x))
        if kv is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            out = torch.zeros_like(q)  # right padding stays zero (masked downstream)
            for seg, store in kv:
                rows, n = seg.rows, seg.new
                keys, values = store.extend(k[rows, :, :n], v[rows, :, :n])
                out[rows, :, :n] = chunk_causal_attention(q[rows, :, :n], keys, values, seg.start, chunk)
        return self.to_out[0](out.transpose(1, 2).reshape(b, t, -1)), kv


class GELUProj(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def pack_linears(self) -> int:
        self.proj = PackedLinear.of(self.proj, activation="gelu")  # the GELU inside the matmul call
        return 1

    def forward(self, x: Tensor) -> Tensor:
        y = self.proj(x)
        return y if isinstance(self.proj, PackedLinear) and self.proj.activation == "gelu" else F.gelu(y)  # exact (erf)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        # index 1 is upstream's Dropout (no parameters)
        self.net = nn.Sequential(GELUProj(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Matcha `BasicTransformerBlock` (self-attention only): x += Attn(LN1 x); x += FF(LN3 x)."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, mask: Tensor | None, cache: StepCache = NO_CACHE, chunk: int = 0) -> Tensor:
        x = x + self.attn1.step(self.norm1(x), mask, cache.kv(self.attn1), chunk)[0]
        return x + self.ff(self.norm3(x))


class TimestepMLP(nn.Module):
    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


@dataclass(frozen=True)
class EstimatorInputs:
    """Per-solve constants: conditioning channels [mu, spk, cond], frame mask, attention mask."""

    static: Tensor  # (R, 240, M)
    mask: Tensor  # (R, 1, M) float
    attn_mask: Tensor | None  # additive (R, 1, 1|M, M); None when nothing is masked


def _transformers(cfg: EstimatorConfig, dim: int) -> nn.ModuleList:
    return nn.ModuleList(TransformerBlock(dim, cfg.num_heads, cfg.attention_head_dim) for _ in range(cfg.n_blocks))


class CausalConditionalDecoder(nn.Module):
    def __init__(self, cfg: EstimatorConfig) -> None:
        super().__init__()
        if len(cfg.channels) != 1:
            raise ValueError(f"only one U-Net level is supported (CosyVoice2 uses channels=[256]), got {cfg.channels}")
        self.cfg = cfg
        ch = cfg.channels[0]
        time_dim = ch * 4
        self.time_mlp = TimestepMLP(cfg.in_channels, time_dim)
        self.down_blocks = nn.ModuleList([nn.ModuleList([
            CausalResnetBlock1D(cfg.in_channels, ch, time_dim), _transformers(cfg, ch), CausalConv1d(ch, ch, 3)])])
        self.mid_blocks = nn.ModuleList(
            nn.ModuleList([CausalResnetBlock1D(ch, ch, time_dim), _transformers(cfg, ch)])
            for _ in range(cfg.num_mid_blocks))
        self.up_blocks = nn.ModuleList([nn.ModuleList([
            CausalResnetBlock1D(2 * ch, ch, time_dim), _transformers(cfg, ch), CausalConv1d(ch, ch, 3)])])
        self.final_block = CausalBlock1D(ch, ch)
        self.final_proj = PackableConv1d(ch, cfg.out_channels, 1)

    def prepare(self, mask: Tensor, mu: Tensor, spks: Tensor, cond: Tensor, streaming: bool,
                cached: bool = False) -> EstimatorInputs:
        """Build the step-invariant inputs for rows with frame mask `(R, 1, M)`; `cached`: for steps on
        new frames against a cache, whose attention needs no mask tensor."""
        m = mu.size(2)
        static = torch.cat([mu, spks.unsqueeze(-1).expand(-1, -1, m), cond], dim=1)
        lens = mask[:, 0].sum(-1).round().long()
        chunk = self.cfg.static_chunk_size if streaming else 0
        attn = None
        if not cached and (chunk > 0 or bool((lens < m).any())):
            if bool((lens == lens[0]).all()):
                lens = lens[:1]  # one mask broadcast over all rows (B = 1 streaming: M^2, not 2*M^2)
            attn = additive_mask(attention_mask(lens, m, chunk), mu.dtype)
        return EstimatorInputs(static, mask, attn)

    def step(self, x: Tensor, t: Tensor, inp: EstimatorInputs, cache: StepCache = NO_CACHE) -> Tensor:
        """Velocity for x `(R, 80, M)` at times t `(R,)`; with a cache, M new frames of streaming requests
        (chunk-causal attention) and the cache extended by them."""
        mask, attn = inp.mask, inp.attn_mask
        chunk = self.cfg.static_chunk_size
        temb = self.time_mlp(timestep_embedding(t, self.cfg.in_channels).to(x.dtype))
        h = torch.cat([x, inp.static], dim=1)

        resnet, blocks, down = self.down_blocks[0]
        h = self._transform(resnet(h, mask, temb, cache), blocks, attn, cache, chunk)
        skip = h
        h = conv_step(down, cache, h * mask)
        for resnet, blocks in self.mid_blocks:
            h = self._transform(resnet(h, mask, temb, cache), blocks, attn, cache, chunk)
        resnet, blocks, up = self.up_blocks[0]
        h = self._transform(resnet(torch.cat([h, skip], dim=1), mask, temb, cache), blocks, attn, cache, chunk)
        h = conv_step(up, cache, h * mask)
        h = self.final_block(h, mask, cache)
        return self.final_proj(h * mask) * mask

    @staticmethod
    def _transform(h: Tensor, blocks: nn.ModuleList, attn: Tensor | None, cache: StepCache, chunk: int) -> Tensor:
        h = h.transpose(1, 2)
        for block in blocks:
            h = block(h, attn, cache, chunk)
        return h.transpose(1, 2)

    def forward(self, x: Tensor, mask: Tensor, mu: Tensor, t: Tensor, spks: Tensor, cond: Tensor,
                streaming: bool = False) -> Tensor:
        return self.step(x, t, self.prepare(mask, mu, spks, cond, streaming))
