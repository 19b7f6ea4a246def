"""Linears with their weights pre-packed for oneDNN on the CPU (the flow's, by default where it works).

`F.linear` on a CPU tensor reorders its weight into oneDNN's blocked layout on every call (bf16), or runs
through torch's BLAS (fp32: MKL, which on AMD CPUs takes a slow generic path). Packing once at load time
and calling oneDNN's linear directly gives the same numbers and, measured on an AMD Zen 4 core with the
flow's shapes (40-400 rows, 256-1536 wide): bf16 1.05-1.45x, fp32 2.1-2.2x. A GELU can run inside the same
call (`activation="gelu"`, the exact erf GELU, applied before the bf16 rounding), and the estimator's
q/k/v projections become one matmul (kernels/networks/flow_estimator.py `Attention.fuse_qkv`).

The float weight and bias stay (state_dict keys unchanged, any other input falls back to `F.linear`), so a
packed copy costs the weight's size again. The kernel is `torch.ops.mkldnn._linear_pointwise`, the one
torch's inductor uses for frozen CPU linears; `packing_works` probes it once, and nothing is packed where
it is missing or disagrees with `F.linear`.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = ("none", "gelu")


def pack_weight(weight: Tensor) -> Tensor:
    """A `[out, in]` weight packed for `packed_linear` (an opaque oneDNN tensor: keep it as a plain attribute,
    not a buffer; `module.to()` does not move it)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def packed_linear(x: Tensor, packed: Tensor, bias: Tensor | None, activation: str = "none") -> Tensor:
    """`F.linear(x, weight, bias)` (then `activation`) with the weight from `pack_weight`; x CPU, its dtype."""
    # "none" as the GELU algorithm is the erf one (F.gelu's default)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, activation, [], "none" if activation == "gelu" else "")


def runs_packed(x: Tensor, weight: Tensor, packed: Tensor) -> bool:
    """Whether an input can take the packed path (else `F.linear` on the float weight): on the CPU, without
    autograd, in the dtype the weight had when packed and still has (`module.to()` does not move a packing)."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == packed.dtype and weight.device.type == "cpu"
            and not torch.is_grad_enabled())


@functools.cache
def packing_works(dtype: torch.dtype) -> bool:
    """Whether this CPU and torch build run packed linears of `dtype`, agreeing with `F.linear`."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 32, generator=gen).to(dtype)
    x = torch.randn(5, 32, generator=gen).to(dtype)
    b = torch.randn(48, generator=gen).to(dtype)
    try:
        with torch.inference_mode():
            got = packed_linear(x, pack_weight(w), b, "gelu").float()
    except (RuntimeError, AttributeError):
        return False
    want = F.gelu(F.linear(x.float(), w.float(), b.float()))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    return bool(torch.allclose(got, want, rtol=tol, atol=tol))


class PackedLinear(nn.Module):
    """An `nn.Linear`'s weight and bias, plus the weight packed for oneDNN; `activation` runs fused."""

    def __init__(self, weight: Tensor, bias: Tensor | None, activation: str = "none") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        self.activation = activation
        self.packed = pack_weight(weight)

    @classmethod
    def of(cls, linear: nn.Linear, activation: str = "none") -> PackedLinear:
        return cls(linear.weight, linear.bias, activation)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        if runs_packed(x, self.weight, self.packed):
            return packed_linear(x, self.packed, self.bias, self.activation)
        y = F.linear(x, self.weight, self.bias)
        return F.gelu(y) if self.activation == "gelu" else y


def packed_count(module: nn.Module) -> int:
    """Modules under `module` whose linear runs on a packed weight (`PackedLinear`, or one holding its packing)."""
    return sum(1 for m in module.modules() if isinstance(getattr(m, "packed", None), Tensor))


def pack_linears(module: nn.Module) -> int:
    """Replace every `nn.Linear` under `module` by a `PackedLinear` (modules may first fuse their own, e.g.
    an activation or q/k/v, through a `pack_linears()` method of theirs); returns how many linears it packed."""
    own = getattr(module, "pack_linears", None)
    if callable(own):
        return own()
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear.of(child))
            count += 1
        else:
            count += pack_linears(child)
    return count
