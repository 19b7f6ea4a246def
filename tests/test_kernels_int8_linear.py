"""Weight-only int8 linears (`--llm-int8`): close to the float linear for few rows, the float one beyond."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kernels.networks.int8_linear import Int8WeightLinear, quantize_decoder_linears, quantize_rows


def test_quantize_rows_is_symmetric_per_channel() -> None:
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    w[2] *= 100  # one loud channel must not coarsen the others
    q, scale = quantize_rows(w)
    assert q.dtype is torch.int8 and scale.shape == (6,)
    assert q.abs().max() == 127
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_few_rows_use_int8_and_stay_close(dtype: torch.dtype, bias: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    lin = nn.Linear(64, 48, bias=bias).to(dtype)
    q = Int8WeightLinear(lin)
    x = torch.randn(2, 3, 64, generator=gen).to(dtype)  # 6 rows <= 8: the int8 kernel
    got, want = q(x), lin(x)
    assert got.shape == want.shape == (2, 3, 48) and got.dtype is dtype
    assert not torch.equal(got, want)  # it did run the quantized weights
    rel = ((got.float() - want.float()).abs().mean() / want.float().abs().mean()).item()
    assert rel < 0.03, rel  # measured ~0.4 % fp32, ~0.8 % bf16


def test_an_fp32_input_reaches_the_kernel_in_bf16() -> None:
    """torch vectorises the int8 kernel for bf16 activations only (fp32 ones were 6.7x slower than the fp32
    weights in a batch-8 decode step), so an fp32 LLM's rows are cast to bf16 for it and back."""
    gen = torch.Generator().manual_seed(3)
    lin = nn.Linear(64, 48, bias=False)
    q = Int8WeightLinear(lin)
    assert q.qscale.dtype is torch.bfloat16
    x = torch.randn(4, 64, generator=gen)
    dequant = q.qweight.float() * q.qscale.float()[:, None]
    want = (x.bfloat16().float() @ dequant.T).bfloat16().float()  # bf16 in, bf16 out, as the kernel
    got = q(x)
    assert got.dtype is torch.float32
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


def test_many_rows_use_the_float_weights_exactly() -> None:
    lin = nn.Linear(64, 48)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(Int8WeightLinear(lin)(x), lin(x), rtol=0, atol=0)


def test_quantize_decoder_linears_replaces_every_linear() -> None:
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 8, bias=False)))
    assert quantize_decoder_linears(net) == 2
    assert isinstance(net[0], Int8WeightLinear) and isinstance(net[2][0], Int8WeightLinear)
    assert net(torch.randn(1, 16)).shape == (1, 8)
