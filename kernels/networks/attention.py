"""Attention backends for the Qwen2 decoder: torch SDPA always, flash-attn optionally.

GQA without copying K/V: the G query heads sharing one KV head are folded into the query
length (`[Hkv, G*T, D]`), so SDPA sees as many heads as the cache has and no
`repeat_interleave` of the cache is ever made. The mask is repeated over the G folded rows.
Head order matches HF `repeat_kv`: query head h uses KV head h // G.

flash-attn is used only when importable AND the tensors are on CUDA (never required).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except (ImportError, OSError, RuntimeError):  # absent, or a broken CUDA build
        return False
    return True


FLASH_DTYPES = (torch.float16, torch.bfloat16)  # flash-attn has no fp32 kernels


def use_flash(device: torch.device, backend: str, dtype: torch.dtype | None = None) -> bool:
    """flash-attn for `auto` when it can run: CUDA, importable, and a half-precision model (an fp32 LLM,
    `--llm-dtype fp32`, takes SDPA); `flash` insists and raises when it cannot."""
    if backend == "sdpa":
        return False
    ok = device.type == "cuda" and flash_attn_available() and (dtype is None or dtype in FLASH_DTYPES)
    if backend == "flash" and not ok:
        raise RuntimeError("attention backend 'flash' requested but it cannot run: it needs CUDA, an importable "
                           "flash_attn and an fp16/bf16 model")
    return ok


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> torch.Tensor:
    """q [T, Hq, D] at absolute positions start_pos..start_pos+T-1; k, v [Hkv, S, D] with
    S = start_pos + T (the slot's whole prefix). Causal. Returns [T, Hq, D]."""
    t, hq, d = q.shape
    hkv, s, _ = k.shape
    g = hq // hkv
    qf = q.permute(1, 0, 2).reshape(hkv, g * t, d)
    key_pos = torch.arange(s, device=q.device)
    query_pos = torch.arange(start_pos, start_pos + t, device=q.device)
    mask = (key_pos[None, :] <= query_pos[:, None]).repeat(g, 1)  # [G*T, S]
    out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask)
    return out.reshape(hq, t, d).permute(1, 0, 2)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, D] (one new token per row); k, v [B, Hkv, S, D]; valid [B, S] bool
    (key j visible to row b). Returns [B, Hq, D]."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    qf = q.reshape(b, hkv, hq // hkv, d)
    out = F.scaled_dot_product_attention(qf, k, v, attn_mask=valid[:, None, None, :])
    return out.reshape(b, hq, d)


def rowwise_decode_attention(
    q: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor, slots: list[int], positions: list[int]
) -> torch.Tensor:
    """CPU decode: one SDPA per row straight on the slot's cache view (no gather copy, no mask,
    reads only [0, pos]). q [B, Hq, D]; k_layer/v_layer one layer's [slots, Hkv, max_len, D]."""
    b, hq, d = q.shape
    hkv = k_layer.shape[1]
    qf = q.reshape(b, hkv, hq // hkv, d)
    outs = [
        F.scaled_dot_product_attention(qf[i], k_layer[slot, :, : pos + 1], v_layer[slot, :, : pos + 1])
        for i, (slot, pos) in enumerate(zip(slots, positions))
    ]
    return torch.stack(outs).reshape(b, hq, d)


def flash_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """flash-attn decode straight on the pool (no gather): writes k_new/v_new [B, Hkv, D] at
    `positions` of `slots` and attends over [0, pos]. k_cache/v_cache: one layer's
    [slots, Hkv, max_len, D] (passed as the [slots, max_len, Hkv, D] strided view flash wants)."""
    from flash_attn import flash_attn_with_kvcache

    out = flash_attn_with_kvcache(
        q[:, None],
        k_cache.transpose(1, 2),
        v_cache.transpose(1, 2),
        k=k_new[:, None],
        v=v_new[:, None],
        cache_seqlens=positions.to(torch.int32),
        cache_batch_idx=slots.to(torch.int32),
        causal=True,
    )
    return out[:, 0]
