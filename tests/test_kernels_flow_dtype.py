"""bf16 flow (opt-in): estimator and encoder in bf16, ODE state, time and noise in fp32."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kernels.networks.flow import fixed_noise
from kernels.runtime.engine import weight_dtype
from kernels.runtime.flow_cache import FlowStreamState, IncrementalFlow, StreamCall
from kernels.weights.model import load_model


def test_weight_dtype_names() -> None:
    assert weight_dtype("auto", cuda=True) is torch.bfloat16
    assert weight_dtype("auto", cuda=False) is torch.float32
    assert weight_dtype("bf16", cuda=False) is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        weight_dtype("int8", cuda=False)


@pytest.fixture(scope="module")
def flows(tiny_model_dir: Path):
    fp32 = load_model(tiny_model_dir).flow
    bf16 = load_model(tiny_model_dir, flow_dtype=torch.bfloat16).flow
    return fp32, bf16


def _inputs(seed: int, prompt: int = 60, generated: int = 90):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 6561, (1, prompt + generated), generator=g)
    feat = torch.randn(1, 2 * prompt, 80, generator=g)
    emb = torch.randn(1, 192, generator=g)
    return tokens, feat, emb, prompt


def test_bf16_flow_keeps_exact_fp32_noise(flows) -> None:
    _, bf16 = flows
    assert next(bf16.estimator.parameters()).dtype is torch.bfloat16
    noise = bf16.decoder.rand_noise
    assert noise.dtype is torch.float32
    assert torch.equal(noise, fixed_noise(noise.size(1), noise.size(2)))


def _close(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    diff = (a.float() - b.float()).abs()
    return float(diff.mean() / b.float().abs().mean()), float(diff.max())


@pytest.mark.parametrize("streaming", [False, True])
def test_bf16_recompute_flow_is_close_to_fp32(flows, streaming: bool) -> None:
    fp32, bf16 = flows
    tokens, feat, emb, prompt = _inputs(1)
    lens, feat_lens = torch.tensor([tokens.size(1)]), torch.tensor([2 * prompt])
    want, _ = fp32.inference(tokens, lens, feat, feat_lens, emb, streaming, not streaming)
    got, _ = bf16.inference(tokens, lens, feat.bfloat16(), feat_lens, emb.bfloat16(), streaming, not streaming)
    assert got.dtype is torch.float32 and got.shape == want.shape
    rel, worst = _close(got, want)
    assert 0 < rel < 0.02 and worst < 0.15, (rel, worst)  # measured: 0.6 %, 0.04


def test_bf16_incremental_flow_is_close_to_fp32(flows) -> None:
    fp32, bf16 = flows
    tokens, feat, emb, _ = _inputs(2)
    outs = []
    for flow, dtype in ((fp32, torch.float32), (bf16, torch.bfloat16)):
        inc, state = IncrementalFlow(flow), FlowStreamState()
        mels = [inc.forward([StreamCall(state, tokens[0, : end + 3], feat[0].to(dtype), emb[0].to(dtype))])[0][0]
                for end in (75, 125)]
        outs.append(torch.cat(mels, dim=1))
    assert outs[1].dtype is torch.float32
    rel, worst = _close(outs[1], outs[0])
    assert 0 < rel < 0.02 and worst < 0.15, (rel, worst)  # measured: 0.6 %, 0.04
