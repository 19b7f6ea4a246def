"""Flow (token -> mel) on the tiny reference model: weights layout, batch invariance, streaming, shapes."""
from __future__ import annotations

import pytest
import torch

from kernels.networks.flow import NOISE_SHA256, CausalMaskedDiffWithXvec, fixed_noise, noise_sha256
from kernels.parity.flow import _rows, load_flow
from tests.conftest import REFERENCE_DIR, needs_reference

TINY = REFERENCE_DIR / "tiny"
CASES = REFERENCE_DIR / "cases"
pytestmark = needs_reference("tiny/flow.pt", "cases/flow.safetensors")


@pytest.fixture(scope="module")
def flow() -> CausalMaskedDiffWithXvec:
    return load_flow(TINY)


def _request(gen: torch.Generator, prompt: int, generated: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 6561, (prompt + generated,), generator=gen)
    feat = torch.randn(2 * prompt, 80, generator=gen)
    return tokens, feat


def _embedding() -> torch.Tensor:
    return torch.randn(1, 192, generator=torch.Generator().manual_seed(7))


def test_state_dict_matches_checkpoint_and_noise_is_not_persistent(flow: CausalMaskedDiffWithXvec) -> None:
    ref = torch.load(TINY / "flow.pt", weights_only=True, mmap=True)
    ours = flow.state_dict()
    assert list(ours) == list(ref) or set(ours) == set(ref)
    assert all(ours[k].shape == ref[k].shape for k in ref)
    assert "decoder.rand_noise" not in ours


def test_fixed_noise_matches_upstream_and_leaves_global_rng_alone() -> None:
    before = torch.get_rng_state()
    noise = fixed_noise(80, 15000)
    assert torch.equal(torch.get_rng_state(), before)
    assert noise_sha256(noise) == NOISE_SHA256


def test_offline_mel_matches_fixture(flow: CausalMaskedDiffWithXvec) -> None:
    from safetensors.torch import load_file

    c = load_file(str(CASES / "flow.safetensors"))
    tokens = torch.cat([c["prompt_token"][0], c["tokens"][0]]).long()
    mel, lens = flow.inference(**_rows([(tokens, c["prompt_feat"][0])], c["embedding"]), streaming=False,
                               finalize=True)
    assert lens.tolist() == [200]
    # |mel| <= 5.9 after 10 Euler steps of a float32 estimator: upstream fp32 vs fp64 differs by 6.4e-6 (rel 1e-6,
    # reference README); 1e-4 ~ 15x that, ~2e-5 of the values; worst seen on AVX2/AVX-512/scalar kernels 4e-6
    torch.testing.assert_close(mel, c["offline.mel"], atol=1e-4, rtol=0)


@pytest.mark.parametrize(("streaming", "finalize"), [(False, True), (True, False)])
def test_batch_invariance_with_different_lengths(flow: CausalMaskedDiffWithXvec, streaming: bool,
                                                 finalize: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    rows = [_request(gen, 30, 57), _request(gen, 12, 20), _request(gen, 41, 9)]
    emb = torch.randn(3, 192, generator=gen)
    batch = _rows(rows, emb[:1]) | {"embedding": emb}
    mel, lens = flow.inference(**batch, streaming=streaming, finalize=finalize)
    for i, row in enumerate(rows):
        alone, alone_len = flow.inference(**_rows([row], emb[i : i + 1]), streaming=streaming, finalize=finalize)
        assert int(lens[i]) == int(alone_len[0])
        # same code, other batch shapes (GEMM blocking): upstream 1 vs 2 threads 1.8e-6; worst seen 1.8e-6
        torch.testing.assert_close(mel[i : i + 1, :, : int(lens[i])], alone, atol=1e-5, rtol=0)
        assert torch.count_nonzero(mel[i, :, int(lens[i]) :]) == 0  # padding is zero


def test_lengths_and_shapes(flow: CausalMaskedDiffWithXvec) -> None:
    gen = torch.Generator().manual_seed(2)
    rows = [_request(gen, 10, 15), _request(gen, 6, 30)]
    batch = _rows(rows, _embedding())
    mel, lens = flow.inference(**batch, streaming=False, finalize=True)
    assert lens.tolist() == [30, 60] and mel.shape == (2, 80, 60)
    mel, lens = flow.inference(**batch, streaming=True, finalize=False)
    assert lens.tolist() == [24, 54] and mel.shape == (2, 80, 54)
    assert mel.dtype == torch.float32 and bool(torch.isfinite(mel).all())


def test_streaming_chunks_keep_earlier_frames(flow: CausalMaskedDiffWithXvec) -> None:
    """Prompt + first hop on the 25-token grid: a later call leaves the earlier call's frames unchanged."""
    gen = torch.Generator().manual_seed(3)
    prompt = 21
    tokens, feat = _request(gen, prompt, 120)
    emb = _embedding()
    offset = 0
    previous = None
    for hop in (29, 25, 50):  # prompt+29 = 50 tokens, then 75, 125: chunk boundaries line up
        n = prompt + offset + hop + 3
        mel, lens = flow.inference(**_rows([(tokens[:n], feat)], emb), streaming=True, finalize=False)
        assert int(lens[0]) == 2 * (offset + hop)
        if previous is not None:
            torch.testing.assert_close(mel[:, :, : previous.size(2)], previous, atol=1e-5, rtol=0)
        previous = mel
        offset += hop


def test_streaming_batch_mixes_rows_at_different_offsets(flow: CausalMaskedDiffWithXvec) -> None:
    """The engine batches non-final calls of different requests: the same request at two offsets in one batch."""
    gen = torch.Generator().manual_seed(4)
    tokens, feat = _request(gen, 25, 80)
    emb = _embedding()
    mel, lens = flow.inference(**_rows([(tokens[:53], feat), (tokens[:103], feat)], emb), streaming=True,
                               finalize=False)
    assert lens.tolist() == [50, 150]
    torch.testing.assert_close(mel[0, :, :50], mel[1, :, :50], atol=1e-5, rtol=0)


def test_too_few_tokens_is_an_error(flow: CausalMaskedDiffWithXvec) -> None:
    gen = torch.Generator().manual_seed(5)
    with pytest.raises(ValueError):
        flow.inference(**_rows([_request(gen, 0, 3)], _embedding()), streaming=True, finalize=False)


def test_rel_shift_and_position_table() -> None:
    from kernels.networks.flow_encoder import RelPosTable, _build_rel_pos, rel_shift

    t = 5
    bd = torch.arange(2 * 3 * t * (2 * t - 1), dtype=torch.float32).view(2, 3, t, 2 * t - 1)
    shifted = rel_shift(bd)
    for i in range(t):
        for j in range(t):
            assert torch.equal(shifted[:, :, i, j], bd[:, :, i, t - 1 - i + j])
    table = RelPosTable(16, initial=50)
    big = table.get(40, torch.device("cpu"), torch.float32)
    assert torch.equal(table.get(7, torch.device("cpu"), torch.float32), _build_rel_pos(7, 16))
    assert big.shape == (1, 79, 16) and torch.equal(big[0, 39], torch.tensor([0.0, 1.0] * 8))  # r = 0


def test_rel_pos_attention_row_groups_match(flow: CausalMaskedDiffWithXvec, monkeypatch: pytest.MonkeyPatch) -> None:
    """Splitting the rel-pos score computation into row groups (memory bound) changes nothing."""
    import kernels.networks.flow_encoder as enc

    gen = torch.Generator().manual_seed(6)
    tokens = torch.randint(0, 6561, (3, 40), generator=gen)
    lens = torch.tensor([40, 31, 12])
    with torch.inference_mode():
        whole, _ = flow.encode(tokens, lens, streaming=True, finalize=False)
        monkeypatch.setattr(enc, "MAX_BD_ELEMENTS", 1)
        grouped, _ = flow.encode(tokens, lens, streaming=True, finalize=False)
    torch.testing.assert_close(grouped, whole, atol=1e-6, rtol=0)
