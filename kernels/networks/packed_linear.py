"""Linears with their weights packed once for oneDNN on the CPU (the flow's, and the full-size LLM's).

`F.linear` on a CPU tensor reorders its weight into oneDNN's blocked layout on every call (bf16), or runs
through torch's BLAS (fp32: MKL, which on AMD CPUs takes a slow generic path). Packing once at load time
and calling oneDNN's linear directly gives the same numbers and, measured on an AMD Zen 4 core with the
flow's shapes (40-400 rows, 256-1536 wide): bf16 1.05-1.45x, fp32 2.1-2.2x. A GELU can run inside the same
call (`activation="gelu"`, the exact erf GELU, applied before the bf16 rounding); the estimator's q/k/v
projections become one matmul and its convs run as packed matmuls where that is faster
(kernels/networks/flow_estimator.py: the `pack_linears` methods, which `pack_linears` here defers to).

A `PackedLinear` keeps only the packing and the bias: `weight` unpacks a copy (state_dict keys are
unchanged; an input the kernel cannot take, e.g. with autograd on, falls back to `F.linear` on that copy).
The kernel is `torch.ops.mkldnn._linear_pointwise`, the one torch's inductor uses for frozen CPU linears;
`packing_works` probes it once, and nothing is packed where it is missing or disagrees with `F.linear`.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = ("none", "gelu")
# A packed call costs ~12 us however small (F.linear: ~2.5 us at 64x64), so an LLM narrower than this, whose
# decode steps are a few rows through small matrices, stays unpacked: packed, the tiny model's LLM steps ran
# at 0.54x (C1 LLM-stage tok/s in a bench.engine run before this rule); at 896 wide a decode step is 1.4x
# (bf16) to 2x (fp32) faster packed. The flow always packs: its matmuls see 2 CFG rows per frame.
MIN_PACKED_LLM_WIDTH = 512


def pack_weight(weight: Tensor) -> Tensor:
    """A `[out, in]` weight packed for `packed_linear` (an opaque oneDNN tensor: keep it as a plain attribute,
    not a buffer; `module.to()` does not move it)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def packed_linear(x: Tensor, packed: Tensor, bias: Tensor | None, activation: str = "none") -> Tensor:
    """`F.linear(x, weight, bias)` (then `activation`) with the weight from `pack_weight`; x CPU, its dtype."""
    # "none" as the GELU algorithm is the erf one (F.gelu's default)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, activation, [], "none" if activation == "gelu" else "")


def runs_packed(x: Tensor, packed: Tensor) -> bool:
    """Whether an input can take the packed path: on the CPU, without autograd, in the packed weight's dtype
    (`module.to()` does not move a packing; other inputs fall back to `F.linear`)."""
    return x.device.type == "cpu" and x.dtype == packed.dtype and not torch.is_grad_enabled()


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
    """An `nn.Linear` as its weight packed for oneDNN and its bias; `activation` runs fused."""

    def __init__(self, weight: Tensor, bias: Tensor | None, activation: str = "none") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        self.activation = activation
        self.out_features, self.in_features = weight.shape
        self.packed = pack_weight(weight)

    @classmethod
    def of(cls, linear: nn.Linear, activation: str = "none") -> PackedLinear:
        return cls(linear.weight, linear.bias, activation)

    @property
    def weight(self) -> Tensor:
        """The float weight, unpacked: a copy (the module holds only the packing)."""
        return self.packed.to_dense()

    def forward(self, x: Tensor) -> Tensor:
        if runs_packed(x, self.packed):
            return packed_linear(x, self.packed, self.bias, self.activation)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = F.linear(x, self.weight.to(x.dtype), bias)
        return F.gelu(y) if self.activation == "gelu" else y

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[no-untyped-def]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.weight  # the key an nn.Linear has


def packed_count(module: nn.Module) -> int:
    """`PackedLinear`s under `module`."""
    return sum(1 for m in module.modules() if isinstance(m, PackedLinear))


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


IM2COL_MAX_ROWS = 256  # output frames (batch x time) up to which a k>1 conv runs as im2col + packed matmul


def packed_conv1d(x: Tensor, packed: Tensor, bias: Tensor | None, kernel: int) -> Tensor:
    """A stride-1, unpadded, undilated conv1d `(B, C, T+k-1) -> (B, O, T)` as one packed matmul over each
    output frame's k input frames (im2col); `packed` from `pack_conv1d`."""
    b, c, t = x.shape[0], x.shape[1], x.shape[2] - kernel + 1
    frames = x.transpose(1, 2)
    cols = frames.unfold(1, kernel, 1).reshape(b * t, c * kernel) if kernel > 1 else frames.reshape(b * t, c)
    return packed_linear(cols, packed, bias).view(b, t, -1).transpose(1, 2)


def pack_conv1d(conv: nn.Conv1d) -> Tensor:
    """A Conv1d's weight `(O, C, k)` packed as the matmul `packed_conv1d` runs (columns ordered channel-major,
    as `unfold` lays them out)."""
    plain = conv.stride == (1,) and conv.dilation == (1,) and conv.groups == 1 and conv.padding in ((0,), "valid")
    if not plain:
        raise ValueError("only stride-1, unpadded, undilated, ungrouped convs run as a packed matmul")
    return pack_weight(conv.weight.reshape(conv.out_channels, -1))


def conv_runs_packed(x: Tensor, packed: Tensor | None, kernel: int) -> bool:
    """Whether this conv input takes `packed_conv1d`: a 1x1 conv always does, a wider one for few output frames
    (measured on an AMD Zen 4 core, bf16: 2x256 ch x 20 frames, k=3: 66 vs 127 us; 16 x 50 frames: 967 vs 813 us;
    1x1, 16 x 50: 294 vs 370 us)."""
    if packed is None or not runs_packed(x, packed):
        return False
    return kernel == 1 or x.shape[0] * (x.shape[2] - kernel + 1) <= IM2COL_MAX_ROWS
