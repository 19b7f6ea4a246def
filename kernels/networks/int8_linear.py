"""Weight-only int8 linears for the LLM's decoder layers on a CPU (opt-in: `--llm-int8 1`).

A decode step of a few rows is bound by reading the weights: the full-size LLM's decoder layers are 358 M
parameters, 716 MB in bf16 for every token. Symmetric per-output-channel int8 halves that, and torch's
CPU kernel for it (`aten._weight_int8pack_mm`) runs the 96 big matmuls of a one-row step in 10 ms instead
of 29 ms (AMD Zen 4, 2 threads). With more rows the matmul stops being bound by memory and that kernel
loses (8 rows: 27 vs 32 ms; 16 rows: 43 vs 39 ms), so batches of more than `INT8_MAX_ROWS` rows and every
prefill keep using the float weights, which stay loaded (+1 byte per weight). Where those are packed for
oneDNN (kernels/networks/packed_linear.py, the server's default) a bf16 float path is faster and the line
moves to `INT8_MAX_ROWS_PACKED_BF16`: a whole decode step, int8 vs packed bf16, 4 rows 18.6 vs 24.4 ms, 5 rows
27.3 vs 25.1, 8 rows 31.2 vs 28.0 (same machine, 2 threads). Packed fp32 stays slower (8 rows: 47 vs 32 ms).

The kernel always gets bf16 activations, an fp32 LLM's too (cast in, result cast back): torch vectorises it
for bf16 only. One 896x4864 matmul, 2 threads: 1 row 59 us (bf16 activations) vs 1478 us (fp32) vs 361 us
for the fp32 linear; 8 rows 227 vs 12715 vs 1266 us. With AVX2-only kernels (ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2) bf16 activations still take 102 / 489 us, so an AVX2 CPU, whose LLM stays fp32,
gains too; fp32 activations there made a batch-8 decode step 6.7x slower than fp32 weights.
"""
from __future__ import annotations

import torch
from torch import nn

from kernels.networks.packed_linear import PackedLinear

INT8_MAX_ROWS = 8  # rows at or under which the int8 kernel is faster (measured above)
INT8_MAX_ROWS_PACKED_BF16 = 4  # the same beside packed bf16 weights


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (int8 [N, K], scale [N]): symmetric, one scale per output channel (row)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale


class Int8WeightLinear(nn.Module):
    """A linear plus an int8 copy of its weight, used for inputs of few rows; more rows take the linear itself
    (`full`: an nn.Linear, or a `PackedLinear`)."""

    def __init__(self, linear: nn.Linear | PackedLinear, max_rows: int | None = None) -> None:
        super().__init__()
        self.full = linear
        q, scale = quantize_rows(linear.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("qscale", scale.to(torch.bfloat16))  # the kernel's activation dtype
        if max_rows is None:
            packed_bf16 = isinstance(linear, PackedLinear) and linear.packed.dtype == torch.bfloat16
            max_rows = INT8_MAX_ROWS_PACKED_BF16 if packed_bf16 else INT8_MAX_ROWS
        self.max_rows = max_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > self.max_rows or x.device.type != "cpu":
            return self.full(x)
        flat = x.reshape(rows, x.shape[-1]).to(torch.bfloat16)  # see the module docstring
        y = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.qscale).to(x.dtype)
        if self.full.bias is not None:
            y = y + self.full.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


def quantize_decoder_linears(module: nn.Module, max_rows: int | None = None) -> int:
    """Replace every nn.Linear (or PackedLinear) under `module` by an Int8WeightLinear; returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, (nn.Linear, PackedLinear)):
            setattr(module, name, Int8WeightLinear(child, max_rows))
            count += 1
        else:
            count += quantize_decoder_linears(child, max_rows)
    return count
