"""The flow's attention: explicit bf16 ops on the CPU, torch's fused kernel elsewhere (kernels/networks/cpu_sdpa.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.networks.cpu_sdpa import attention, fused_kernel_only


def _qkv(dtype: torch.dtype, keys: int = 120) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 8, n, 64, generator=g).to(dtype) for n in (50, keys, keys))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_bf16_on_the_cpu_stays_as_close_to_fp32_as_the_fused_kernel_does() -> None:
    q, k, v = _qkv(torch.bfloat16)
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    out = attention(q, k, v)
    fused = F.scaled_dot_product_attention(q, k, v)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert _rel(out, exact) < 0.01 and _rel(fused, exact) < 0.01
    assert not torch.equal(out, fused)  # the explicit path ran (its rounding differs)


def test_an_additive_mask_hides_keys_as_if_they_were_absent() -> None:
    q, k, v = _qkv(torch.bfloat16)
    mask = torch.zeros(1, 1, 1, k.size(2))
    mask[..., 80:] = torch.finfo(torch.float32).min
    assert torch.allclose(attention(q, k, v, mask).float(), attention(q, k[:, :, :80], v[:, :, :80]).float(),
                          atol=1e-6)


def test_fp32_and_the_fused_only_context_use_torchs_kernel_bit_for_bit() -> None:
    q, k, v = _qkv(torch.float32)
    assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    qb, kb, vb = _qkv(torch.bfloat16)
    with fused_kernel_only():
        assert torch.equal(attention(qb, kb, vb), F.scaled_dot_product_attention(qb, kb, vb))
    assert not torch.equal(attention(qb, kb, vb), F.scaled_dot_product_attention(qb, kb, vb))  # restored
