"""Linears on oneDNN-packed weights: the same numbers as `F.linear`, the same state_dict without a second copy
of the weight, a fallback."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernels.networks.flow_estimator import Attention, GELUProj, PackableConv1d
from kernels.networks.int8_linear import Int8WeightLinear
from kernels.networks.packed_linear import (
    IM2COL_MAX_ROWS,
    PackedLinear,
    conv_runs_packed,
    pack_conv1d,
    pack_linears,
    packed_count,
    packing_works,
)
from kernels.runtime.flow_cache import FlowStreamState, IncrementalFlow, StreamCall
from kernels.weights.model import load_model

pytestmark = pytest.mark.skipif(not packing_works(torch.float32), reason="no oneDNN packed linears in this build")

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _inputs(dtype: torch.dtype, seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(64, 48).to(dtype).requires_grad_(False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=gen) / 8)
    return lin, torch.randn(3, 5, 64, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_the_linear_it_packs(dtype: torch.dtype, bias: bool) -> None:
    if not packing_works(dtype):
        pytest.skip(f"no packed {dtype} here")
    lin, x = _inputs(dtype)
    if not bias:
        lin.bias = None
    packed = PackedLinear.of(lin)
    with torch.inference_mode():
        got, want = packed(x), lin(x)
        strided = x[:, ::2]  # a view with gaps, as the estimator's q/k/v split hands on
        got_strided, want_strided = packed(strided), lin(strided)
    assert got.shape == want.shape == (3, 5, 48) and got.dtype is dtype
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(got_strided, want_strided, rtol=TOL[dtype], atol=TOL[dtype])


def test_gelu_runs_inside_and_is_the_erf_one() -> None:
    lin, x = _inputs(torch.float32, seed=1)
    with torch.inference_mode():
        got = PackedLinear.of(lin, activation="gelu")(x * 8)  # values where erf and tanh GELU differ
        want = F.gelu(lin(x * 8))
        tanh = F.gelu(lin(x * 8), approximate="tanh")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - tanh).abs().max() > 1e-4


def test_holds_only_the_packing_and_unpacks_the_same_weight() -> None:
    lin, _ = _inputs(torch.float32, seed=8)
    packed = PackedLinear.of(lin)
    assert [name for name, _ in packed.named_parameters()] == ["bias"]
    assert torch.equal(packed.weight, lin.weight)
    state = packed.state_dict()
    assert set(state) == {"weight", "bias"} and torch.equal(state["weight"], lin.weight)
    assert (packed.in_features, packed.out_features) == (64, 48)


def test_other_inputs_fall_back_to_the_float_weight_exactly() -> None:
    lin, x = _inputs(torch.float32, seed=2)
    packed = PackedLinear.of(lin, activation="gelu")
    with torch.enable_grad():  # training-style call: torch's linear, differentiable
        torch.testing.assert_close(packed(x), F.gelu(lin(x)), rtol=0, atol=0)
    with torch.inference_mode():
        as_double = packed.double()(x.double())  # `.to()` moves the float weight, not the packing
    assert as_double.dtype is torch.float64


def test_rejects_an_unknown_activation() -> None:
    with pytest.raises(ValueError, match="activation"):
        PackedLinear.of(nn.Linear(4, 4), activation="relu6")


def test_pack_linears_fuses_the_estimators_qkv_and_gelu_and_keeps_the_keys() -> None:
    net = nn.ModuleDict({"attn": Attention(32, heads=2, head_dim=8), "ff": GELUProj(32, 64), "out": nn.Linear(64, 32)})
    net.requires_grad_(False)
    keys = set(net.state_dict())
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        want_attn, want_ff = net["attn"](x, None), net["ff"](x)
    assert pack_linears(net) == 6  # q/k/v as one, to_out, the GELU projection, the plain linear
    assert set(net.state_dict()) == keys
    assert isinstance(net["ff"].proj, PackedLinear) and net["ff"].proj.activation == "gelu"
    assert packed_count(net) == 3  # to_out, the GELU projection, the plain linear (q/k/v: one packed tensor)
    with torch.inference_mode():
        torch.testing.assert_close(net["attn"](x, None), want_attn, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(net["ff"](x), want_ff, rtol=1e-5, atol=1e-5)


def test_an_int8_linear_keeps_the_packing_for_many_rows() -> None:
    lin, _ = _inputs(torch.float32, seed=4)
    q = Int8WeightLinear(PackedLinear.of(lin))
    assert isinstance(q.full, PackedLinear)
    x = torch.randn(12, 64, generator=torch.Generator().manual_seed(5))  # > 8 rows: the float path
    with torch.inference_mode():
        torch.testing.assert_close(q(x), lin(x), rtol=1e-5, atol=1e-5)


def _stream_mel(flow: nn.Module, tiny_voice: tuple) -> torch.Tensor:
    tokens, mel, emb = tiny_voice
    inc, state = IncrementalFlow(flow), FlowStreamState()
    ids = torch.cat([tokens, torch.arange(40) % 50])
    with torch.inference_mode():
        first = inc.forward([StreamCall(state, ids[: tokens.numel() + 28], mel, emb)])[0][0]
        second = inc.forward([StreamCall(state, ids, mel, emb)], finalize=True)[0][0]
    return torch.cat([first, second], dim=1)


def test_load_model_packs_the_flow_with_the_same_output(tiny_model_dir) -> None:
    plain = load_model(tiny_model_dir)
    packed = load_model(tiny_model_dir, packed_linears=True)
    assert packed_count(plain.llm) == packed_count(plain.flow) == 0
    assert packed_count(packed.flow) > 0
    assert packed_count(packed.llm) == 0  # the tiny LLM is narrower than MIN_PACKED_LLM_WIDTH
    gen = torch.Generator().manual_seed(6)
    tokens = torch.randint(0, 50, (30,), generator=gen)
    voice = (tokens, torch.randn(60, 80, generator=gen), torch.randn(192, generator=gen))
    want, got = _stream_mel(plain.flow, voice), _stream_mel(packed.flow, voice)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_an_int8_linear_beside_packed_bf16_hands_over_sooner() -> None:
    """Packed bf16 beats the int8 kernel from 5 rows on; packed fp32 does not up to 8 (int8_linear docstring)."""
    if not packing_works(torch.bfloat16):
        pytest.skip("no packed bf16 here")
    lin, _ = _inputs(torch.float32, seed=7)
    assert Int8WeightLinear(PackedLinear.of(lin)).max_rows == 8
    assert Int8WeightLinear(lin.to(torch.bfloat16)).max_rows == 8
    assert Int8WeightLinear(PackedLinear.of(lin.to(torch.bfloat16))).max_rows == 4


def test_the_encoders_position_projection_stays_memoised(tiny_model_dir) -> None:
    """linear_pos is not packed: `positions` memoises its projection against the weight's identity."""
    flow = load_model(tiny_model_dir, packed_linears=True).flow
    attn = flow.encoder.encoders[0].self_attn
    assert isinstance(attn.linear_q, PackedLinear) and isinstance(attn.linear_pos, nn.Linear)


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("batch,frames", [(2, 20), (8, 40)])  # 40 and 320 output rows: im2col, then the conv
def test_a_packable_conv_matches_the_conv(kernel: int, batch: int, frames: int) -> None:
    gen = torch.Generator().manual_seed(9)
    conv = PackableConv1d(16, 24, kernel).requires_grad_(False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) / 4)
    x = torch.randn(batch, 16, frames + kernel - 1, generator=gen)
    with torch.inference_mode():
        want = conv(x)
        assert conv.pack_linears() == 1
        im2col = kernel == 1 or batch * frames <= IM2COL_MAX_ROWS
        assert conv_runs_packed(x, conv._packed, kernel) is im2col
        got = conv(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_only_a_plain_conv_packs() -> None:
    with pytest.raises(ValueError, match="stride-1"):
        pack_conv1d(nn.Conv1d(4, 4, 3, padding=1))
