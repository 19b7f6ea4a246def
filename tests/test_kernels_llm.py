"""Qwen2LM on the tiny reference model: keys, KV cache vs full forward, appends, batch
invariance of decode, packed prefill, and the generate loop's stop / length rules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from kernels.networks.kv_cache import KVCache
from kernels.networks.llm import TIED_LM_HEAD_KEY, Qwen2LM, generate, load_qwen2lm
from tests.conftest import REFERENCE_DIR, needs_reference

TINY = REFERENCE_DIR / "tiny"
pytestmark = needs_reference("tiny/llm.pt")
# Hidden states (final RMSNorm: rms ~1) of the same float32 code, computed along two paths (KV cache vs
# full forward, batch vs alone): only summation order differs, over 64-wide dot products and 2 layers, so
# differences are a few u * |h| * sqrt(64) ~ 1e-6; 1e-5 keeps ~5x over that and over the worst seen with
# AVX2 / AVX-512 / scalar kernels and 1 or 2 threads. (Log-probs vs the fixture: kernels.parity, 1e-4.)
ATOL = 1e-5


@pytest.fixture(scope="module")
def lm() -> Qwen2LM:
    return load_qwen2lm(TINY)


def _kv(lm: Qwen2LM, slots: int = 4, max_len: int = 96) -> KVCache:
    return KVCache.for_model(lm.cfg.qwen, slots, max_len)


def _prompt(lm: Qwen2LM, seed: int, n_text: int, n_speech: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, lm.cfg.qwen.vocab_size, (n_text,), generator=g)
    speech = torch.randint(0, lm.cfg.speech_token_size, (n_speech,), generator=g)
    return lm.build_lm_input(text, None, speech)


def test_state_dict_keys_and_shapes_match_llm_pt(lm: Qwen2LM) -> None:
    ref = torch.load(TINY / "llm.pt", map_location="cpu", weights_only=True)
    ref.pop(TIED_LM_HEAD_KEY)
    ours = lm.state_dict()
    assert list(ours) == list(ref)
    assert all(ours[k].shape == ref[k].shape for k in ref)


def test_build_lm_input_layout(lm: Qwen2LM) -> None:
    x = lm.build_lm_input([3, 4], [1], [7, 8, 9])
    assert x.shape == (1 + 3 + 1 + 3, lm.cfg.qwen.hidden_size)
    torch.testing.assert_close(x[0], lm.sos_embed())
    torch.testing.assert_close(x[1:4], lm.text_embed([1, 3, 4]))
    torch.testing.assert_close(x[4], lm.task_embed())
    torch.testing.assert_close(x[5:], lm.speech_embed([7, 8, 9]))


def test_kv_decode_equals_full_forward(lm: Qwen2LM) -> None:
    prompt = _prompt(lm, 0, 6, 5)
    cont = torch.tensor([5, 17, 6000, 42, 3])
    kv = _kv(lm)
    steps = [lm.prefill(prompt, 1, 0, kv)]
    for i, tok in enumerate(cont):
        pos = torch.tensor([prompt.shape[0] + i])
        steps.append(lm.decode(lm.speech_embed(tok[None]), torch.tensor([1]), pos, kv)[0])
    full = lm.prefill_hidden(torch.cat([prompt, lm.speech_embed(cont)]), 3, 0, _kv(lm))
    torch.testing.assert_close(torch.stack(steps), full[prompt.shape[0] - 1 :], atol=ATOL, rtol=0)


def test_prefill_appends_at_start_pos(lm: Qwen2LM) -> None:
    x = _prompt(lm, 1, 8, 7)
    kv = _kv(lm)
    lm.prefill(x[:6], 2, 0, kv)
    tail = lm.prefill_hidden(x[6:], 2, 6, kv)
    whole = lm.prefill_hidden(x, 0, 0, kv)
    torch.testing.assert_close(tail, whole[6:], atol=ATOL, rtol=0)


@pytest.fixture(params=[True, False], ids=["cpu_rowwise", "static_masked"])
def decode_mode(lm: Qwen2LM, request: pytest.FixtureRequest) -> Iterator[bool]:
    lm.cpu_rowwise_decode = request.param
    yield request.param
    lm.cpu_rowwise_decode = True


def test_decode_is_batch_invariant(lm: Qwen2LM, decode_mode: bool) -> None:
    prompts = [_prompt(lm, s, n, m) for s, n, m in ((2, 3, 0), (3, 9, 20), (4, 5, 2))]
    slots = [2, 0, 3]  # arbitrary slot ids, different lengths
    kv_b, kv_1 = _kv(lm), _kv(lm)
    for x, slot in zip(prompts, slots):
        lm.prefill(x, slot, 0, kv_b)
        lm.prefill(x, slot, 0, kv_1)
    positions = torch.tensor([x.shape[0] for x in prompts])
    tokens = torch.tensor([[10, 20, 30], [6000, 1, 2], [7, 7, 7]])
    for step in range(3):
        embeds = lm.speech_embed(tokens[step])
        batched = lm.decode(embeds, torch.tensor(slots), positions, kv_b)
        for b, slot in enumerate(slots):
            alone = lm.decode(
                embeds[b : b + 1],
                torch.tensor([slot]),
                positions[b : b + 1],
                kv_1,
                span=int(positions[b]) + 1,
            )
            torch.testing.assert_close(batched[b], alone[0], atol=ATOL, rtol=0)
        positions = positions + 1


def test_static_and_rowwise_decode_agree(lm: Qwen2LM) -> None:
    x = _prompt(lm, 10, 6, 3)
    outs = []
    for rowwise in (True, False):
        kv = _kv(lm)
        lm.prefill(x, 1, 0, kv)
        try:
            lm.cpu_rowwise_decode = rowwise
            outs.append(lm.decode(lm.speech_embed([4]), torch.tensor([1]), torch.tensor([x.shape[0]]), kv))
        finally:
            lm.cpu_rowwise_decode = True
    torch.testing.assert_close(outs[0], outs[1], atol=ATOL, rtol=0)


def test_prefill_batch_equals_separate_prefills(lm: Qwen2LM) -> None:
    a, b = _prompt(lm, 5, 4, 3), _prompt(lm, 6, 10, 1)
    kv = _kv(lm)
    lm.prefill(a[:2], 1, 0, kv)  # item 0 continues a running sequence
    packed = lm.prefill_batch([(a[2:], 1, 2), (b, 0, 0)], kv)
    kv2 = _kv(lm)
    torch.testing.assert_close(packed[0], lm.prefill(a, 0, 0, kv2), atol=ATOL, rtol=0)
    torch.testing.assert_close(packed[1], lm.prefill(b, 1, 0, kv2), atol=ATOL, rtol=0)


def test_prefill_rejects_overflow(lm: Qwen2LM) -> None:
    with pytest.raises(ValueError):
        lm.prefill(_prompt(lm, 0, 10, 0), 0, 90, _kv(lm, max_len=96))


def test_logprobs_shape_and_normalisation(lm: Qwen2LM) -> None:
    logp = lm.logprobs(torch.randn(2, lm.cfg.qwen.hidden_size))
    assert logp.shape == (2, lm.cfg.num_speech_outputs)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(2))


@contextlib.contextmanager
def _with_bias(lm: Qwen2LM, token: int, value: float) -> Iterator[None]:
    old = lm.llm_decoder.bias[token].item()
    lm.llm_decoder.bias[token] = value
    try:
        yield
    finally:
        lm.llm_decoder.bias[token] = old


def test_generate_respects_min_len_and_stops_on_eos(lm: Qwen2LM) -> None:
    x = _prompt(lm, 7, 5, 4)
    with _with_bias(lm, lm.cfg.eos_token, 100.0):  # eos almost certain once allowed
        out = list(
            generate(lm, _kv(lm), 0, x, min_len=3, max_len=50, generator=torch.Generator().manual_seed(0))
        )
    assert len(out) == 3 and all(t < lm.cfg.speech_token_size for t in out)


@pytest.mark.parametrize("stop", [6562, 6563])
def test_other_stop_ids_end_even_before_min_len(lm: Qwen2LM, stop: int) -> None:
    x = _prompt(lm, 8, 5, 4)
    with _with_bias(lm, stop, 100.0):  # only eos is masked while i < min_len (upstream)
        assert list(generate(lm, _kv(lm), 0, x, min_len=10, max_len=50)) == []


def test_generate_max_len_and_seed_determinism(lm: Qwen2LM) -> None:
    x = _prompt(lm, 9, 5, 4)
    with _with_bias(lm, lm.cfg.eos_token, -100.0):
        runs = [list(generate(lm, _kv(lm), 1, x, 0, 12, torch.Generator().manual_seed(3))) for _ in range(2)]
        capped = list(generate(lm, _kv(lm), 1, x, 0, 12, torch.Generator().manual_seed(3), max_tokens=5))
    assert len(runs[0]) == 12 and runs[0] == runs[1]
    assert capped == runs[0][:5]
