"""Preallocated KV-cache pool: one fixed-size slot per running request.

Layout `[layers, slots, kv_heads, max_len, head_dim]` (head-major): a slot's keys for one
layer, `k[layer, slot, :, :n]`, are already the `[Hkv, n, D]` shape attention wants, so the
decode gather `k[layer][slots, :, :span]` yields a contiguous `[B, Hkv, span, D]` without a
transpose. Slot ids are chosen by the scheduler; the cache never tracks lengths itself
(positions are passed by the caller), which keeps decode free of host-side state.
"""

from __future__ import annotations

import torch

from kernels.config import QwenConfig


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if min(num_layers, num_slots, max_len, num_kv_heads, head_dim) <= 0:
            raise ValueError("KVCache dimensions must be positive")
        shape = (num_layers, num_slots, num_kv_heads, max_len, head_dim)
        # zeros, not empty: masked-out entries are multiplied by 0 in attention and must be finite.
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.max_len = max_len
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim

    @classmethod
    def for_model(
        cls,
        qwen_cfg: QwenConfig,
        num_slots: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        """Sized from a `kernels.config.QwenConfig`."""
        return cls(
            qwen_cfg.num_layers, num_slots, max_len, qwen_cfg.num_kv_heads, qwen_cfg.head_dim, device, dtype
        )

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.k.element_size()

    def write_prefill(self, layer: int, slot: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [Hkv, T, D] written at positions [start, start+T) of `slot`."""
        end = start + k.shape[1]
        if start < 0 or end > self.max_len:
            raise ValueError(f"KV write [{start}, {end}) outside slot capacity {self.max_len}")
        self.k[layer, slot, :, start:end] = k
        self.v[layer, slot, :, start:end] = v

    def write_decode(
        self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """k, v: [B, Hkv, D] written at (slots[b], positions[b]); index_put keeps it graph-capturable."""
        self.k[layer][slots, :, positions] = k
        self.v[layer][slots, :, positions] = v

    def gather(self, layer: int, slots: torch.Tensor, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, Hkv, span, D] copies of the first `span` positions of each slot."""
        k = self.k[layer, :, :, :span].index_select(0, slots)
        v = self.v[layer, :, :, :span].index_select(0, slots)
        return k, v

    def slot_view(self, layer: int, slot: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[Hkv, end, D] views (no copy) of one slot's first `end` positions."""
        return self.k[layer, slot, :, :end], self.v[layer, slot, :, :end]

    def clear_slot(self, slot: int) -> None:
        """Optional hygiene; correctness never depends on it (attention masks by position)."""
        self.k[:, slot].zero_()
        self.v[:, slot].zero_()
