"""Scaled dot-product attention for the flow, with an explicit bf16 path on the CPU.

torch's fused CPU kernel (flash attention) is slow for the flow estimator's bf16 shapes: 16 heads x rows of
50-100 queries over 150-800 keys of 64 dims. Three plain ops -- a bf16 batched matmul for the scores, an
fp32 softmax, a bf16 matmul with the values -- take 0.55-0.6x its time, one thread or two (Zen 4,
AVX512-BF16, 2026-12-07). The price: the first matmul rounds the scores to bf16 where the fused kernel keeps
them in fp32, so the output's relative error against fp32 is ~0.0045 instead of ~0.0022, well under the bf16
flow's own 1 % mel difference from fp32 (bench.fidelity). fp32, and every other device, keep torch's kernel
(there the explicit ops win nothing).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

_explicit_bf16 = True  # process-wide: the flow's layers run on whatever threads the engine gives them


@contextmanager
def fused_kernel_only() -> Iterator[None]:
    """torch's fused kernel everywhere while inside (bench.engine's baseline path, tests)."""
    global _explicit_bf16
    before, _explicit_bf16 = _explicit_bf16, False
    try:
        yield
    finally:
        _explicit_bf16 = before


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for `(.., T, d)` queries over `(.., S, d)` keys; `mask` additive,
    broadcastable to `(.., T, S)`."""
    if not _explicit_bf16 or q.device.type != "cpu" or q.dtype != torch.bfloat16:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(q.size(-1) ** -0.5)
    if mask is not None:
        scores.add_(mask)
    return torch.matmul(torch.softmax(scores, dim=-1).to(q.dtype), v)
