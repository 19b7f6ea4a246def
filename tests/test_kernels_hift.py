"""HiFT vocoder: weight-norm folding, batching, streaming bookkeeping, mel stretching."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from kernels.config import HiftConfig
from kernels.networks.hift import HiFTGenerator, fold_weight_norm, load_hift
from kernels.runtime.vocoder_stream import SOURCE_CACHE_SAMPLES, VocoderState, stretch_mel, vocode_chunks
from tests.conftest import REFERENCE_DIR, needs_reference

TINY = REFERENCE_DIR / "tiny"
SMALL = HiftConfig(base_channels=16, f0_cond_channels=16)  # same topology as released, narrow
SPF = SMALL.samples_per_frame  # 480


@pytest.fixture(scope="module")
def hift() -> HiFTGenerator:
    torch.manual_seed(0)
    model = HiFTGenerator(SMALL).eval()
    with torch.no_grad():  # non-trivial Snake alphas / source weights, like a trained model
        for name, p in model.named_parameters():
            if name.endswith("alpha"):
                p.copy_(torch.exp(0.2 * torch.randn_like(p)))
        model.conv_post.weight.mul_(0.15)
    return model


def _mel(frames: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(80, frames, generator=g) - 4.0


# ---------------------------------------------------------------- fold_weight_norm


@pytest.mark.parametrize("make", [
    lambda: nn.Conv1d(6, 5, 3),
    lambda: nn.ConvTranspose1d(6, 4, 5, 2),  # weight [in, out, k]: g over dim 0 = in
])
def test_fold_parametrization_naming(make: object) -> None:
    torch.manual_seed(1)
    module = parametrizations.weight_norm(make())  # type: ignore[operator]
    with torch.no_grad():
        module.parametrizations.weight.original0.mul_(1.7)
    sd = {f"generator.ups.0.{k}": v for k, v in module.state_dict().items()}
    folded = fold_weight_norm(sd)
    assert set(folded) == {"ups.0.weight", "ups.0.bias"}
    torch.testing.assert_close(folded["ups.0.weight"], module.weight.detach(), rtol=0, atol=0)


def test_fold_legacy_naming() -> None:
    torch.manual_seed(2)
    conv = nn.Conv1d(4, 3, 5)
    g = torch.rand(3, 1, 1) + 0.5
    v = torch.randn(3, 4, 5)
    sd = {"conv_post.weight_g": g, "conv_post.weight_v": v, "conv_post.bias": conv.bias.detach()}
    folded = fold_weight_norm(sd)
    expected = g * v / v.flatten(1).norm(dim=1)[:, None, None]
    torch.testing.assert_close(folded["conv_post.weight"], expected)
    assert set(folded) == {"conv_post.weight", "conv_post.bias"}


def test_fold_rejects_unpaired() -> None:
    sd = {"conv_pre.parametrizations.weight.original0": torch.ones(2, 1, 1)}
    with pytest.raises(ValueError, match="conv_pre.parametrizations.weight.original0"):
        fold_weight_norm(sd)
    sd = {"generator.resblocks.0.convs1.0.weight_v": torch.ones(2, 2, 3)}
    with pytest.raises(ValueError, match="resblocks.0.convs1.0.weight_v"):
        fold_weight_norm(sd)


@needs_reference("tiny/hift.pt")
def test_tiny_checkpoint_loads_strict() -> None:
    from kernels.config import read_model_config

    model = load_hift(str(TINY / "hift.pt"), read_model_config(TINY).hift)
    assert not any("parametrizations" in k for k in model.state_dict())
    assert "m_source.l_linear.weight" in model.state_dict()


# ---------------------------------------------------------------- generator behaviour


def test_shapes_and_cache_source(hift: HiFTGenerator) -> None:
    mel = torch.stack([_mel(12, 3), _mel(12, 4)])
    cache = torch.full((2, 1, 100), 0.25)
    with torch.no_grad():
        wav, s = hift.inference(mel, cache_source=cache, generator=torch.Generator().manual_seed(5))
    assert wav.shape == (2, 12 * SPF) and s.shape == (2, 1, 12 * SPF)
    assert torch.equal(s[:, :, :100], cache)
    assert wav.abs().max() <= SMALL.audio_limit


def test_source_noise_from_generator_only(hift: HiFTGenerator) -> None:
    f0 = torch.tensor([[0.0, 120.0, 130.0, 5.0]])
    with torch.no_grad():
        torch.manual_seed(0)
        a = hift.source(f0, generator=torch.Generator().manual_seed(9))
        torch.manual_seed(1)  # global RNG must not matter when a generator is given
        b = hift.source(f0, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


def test_batched_decode_matches_single(hift: HiFTGenerator) -> None:
    mels = torch.stack([_mel(10, 6), _mel(10, 7)])
    s = torch.rand(2, 1, 10 * SPF) * 0.2 - 0.1
    with torch.no_grad():
        batched = hift.decode(mels, s)
        single = torch.cat([hift.decode(mels[i:i + 1], s[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- streaming


def _stream(hift: HiFTGenerator, chunks: list[int], seed: int) -> list[torch.Tensor]:
    state = VocoderState(generator=torch.Generator().manual_seed(seed))
    outs = []
    for k, frames in enumerate(chunks):
        outs += vocode_chunks(hift, [(state, _mel(frames, 100 * seed + k), k == len(chunks) - 1)])
    assert state.mel_cache is None and state.speech_tail is None  # final chunk clears the cache
    return outs


def test_stream_length_bookkeeping(hift: HiFTGenerator) -> None:
    chunks = [50, 100, 42]
    outs = _stream(hift, chunks, seed=1)
    assert [o.numel() for o in outs] == [50 * SPF - SOURCE_CACHE_SAMPLES, 100 * SPF, 42 * SPF + SOURCE_CACHE_SAMPLES]
    assert sum(o.numel() for o in outs) == SPF * sum(chunks)


def test_non_streaming_is_one_final_item(hift: HiFTGenerator) -> None:
    (out,) = vocode_chunks(hift, [(VocoderState(generator=torch.Generator().manual_seed(2)), _mel(30, 8), True)])
    assert out.shape == (30 * SPF,)


def test_batching_equal_lengths_equals_one_by_one(hift: HiFTGenerator) -> None:
    # Three requests: two with equal (cache + new) lengths share a HiFT call, one differs.
    plans = {1: [20, 16], 2: [20, 16], 3: [20, 24]}
    alone = {r: _stream(hift, chunks, seed=r) for r, chunks in plans.items()}
    states = {r: VocoderState(generator=torch.Generator().manual_seed(r)) for r in plans}
    together: dict[int, list[torch.Tensor]] = {r: [] for r in plans}
    for k in range(2):
        items = [(states[r], _mel(plans[r][k], 100 * r + k), k == 1) for r in plans]
        for r, out in zip(plans, vocode_chunks(hift, items)):
            together[r].append(out)
    for r in plans:
        for a, b in zip(alone[r], together[r]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_duplicate_state_rejected(hift: HiFTGenerator) -> None:
    st = VocoderState()
    with pytest.raises(ValueError):
        vocode_chunks(hift, [(st, _mel(10, 1), False), (st, _mel(10, 2), False)])


# ---------------------------------------------------------------- speed


@pytest.mark.parametrize("frames,speed,expected", [(100, 1.0, 100), (100, 1.5, 66), (101, 0.5, 202), (7, 2.0, 3)])
def test_stretch_mel_lengths(frames: int, speed: float, expected: int) -> None:
    out = stretch_mel(_mel(frames, 0), speed)
    assert out.shape == (80, expected)


def test_stretch_mel_identity_and_constant() -> None:
    mel = _mel(40, 1)
    torch.testing.assert_close(stretch_mel(mel, 1.0), mel)
    flat = torch.full((80, 40), -3.0)
    torch.testing.assert_close(stretch_mel(flat, 1.3), torch.full((80, int(40 / 1.3)), -3.0))


@needs_reference("tiny/hift.pt", "cases/hift.safetensors", "cases/flow.safetensors")
def test_parity_against_upstream_fixtures() -> None:
    from kernels.parity.hift import run

    results = run(TINY, REFERENCE_DIR / "cases")
    failed = [r for r in results if not r.passed]
    assert len(results) >= 19 and not failed, failed


MANIFEST = REFERENCE_DIR / "manifest-0.5b.json"


@needs_reference("manifest-0.5b.json")
def test_full_size_keys_match_release_manifest() -> None:
    import json

    keys = json.loads(MANIFEST.read_text())["files"]["hift.pt"]["keys"]
    with torch.device("meta"):
        released = fold_weight_norm({k: torch.empty(v["shape"]) for k, v in keys.items()})
        ours = HiFTGenerator(HiftConfig()).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in released.items()}
