"""A voice's streaming-flow prompt frames, computed once and copied into later streams: same numbers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels.runtime.flow_cache import FlowStreamState, IncrementalFlow, StreamCall
from kernels.runtime.voice_prefix import VoicePrefixCache, copy_state, voice_key
from kernels.weights.model import load_model

LOOK, PROMPT = 3, 60  # 60 prompt tokens: the prefix is 50 (two whole chunks whose look-ahead stays in the prompt)


@pytest.fixture(scope="module")
def flow(tiny_model_dir):
    return load_model(tiny_model_dir).flow


def _voice(seed: int, prompt: int = PROMPT, generated: int = 160):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 6561, (prompt + generated,), generator=g), torch.randn(2 * prompt, 80, generator=g),
            torch.randn(192, generator=g))


def _stream(inc: IncrementalFlow, voice, cache: VoicePrefixCache | None, key: bytes = b"v") -> torch.Tensor:
    """Two chunks of one stream (the scheduler's hops: 25 + pad, 50); the generated frames they return."""
    tokens, feat, emb = voice
    prompt = feat.size(0) // 2
    state, frames = FlowStreamState(), []
    first_hop = 25 + (-prompt % 25)
    with torch.inference_mode():
        for end in (prompt + first_hop, prompt + first_hop + 50):
            call = StreamCall(state, tokens[: end + LOOK], feat, emb)
            if cache is not None:
                cache.prepare([(key, call)])
            ((mel, first),) = inc.forward([call])
            frames.append(mel[:, max(0, 2 * prompt - first):])
    return torch.cat(frames, dim=1)


def test_a_stream_from_the_voice_prefix_equals_one_that_computes_it(flow) -> None:
    inc, voice = IncrementalFlow(flow), _voice(1)
    cache = VoicePrefixCache(inc)
    assert cache.prefix_tokens(PROMPT) == 50 and cache.prefix_tokens(27) == 0 and cache.prefix_tokens(28) == 25
    want = _stream(inc, voice, None)
    miss = _stream(inc, voice, cache)
    assert (cache.stats.hits, cache.stats.misses) == (0, 1) and cache.nbytes > 0
    torch.testing.assert_close(miss, want, atol=1e-5, rtol=0)  # other matmul shapes: ~1e-6
    hit = _stream(inc, voice, cache)
    assert (cache.stats.hits, cache.stats.misses) == (1, 1)
    assert torch.equal(hit, miss)  # the same numbers from the copy as from the computed prefix


def test_another_voice_does_not_match(flow) -> None:
    inc = IncrementalFlow(flow)
    cache = VoicePrefixCache(inc)
    a, b = _voice(1), _voice(2)
    _stream(inc, a, cache, voice_key(*a))
    got = _stream(inc, b, cache, voice_key(*b))
    assert cache.stats.misses == 2 and cache.stats.hits == 0
    torch.testing.assert_close(got, _stream(inc, b, None), atol=1e-5, rtol=0)


def test_the_store_is_bounded_and_zero_turns_it_off(flow) -> None:
    inc = IncrementalFlow(flow)
    one = VoicePrefixCache(inc)
    _stream(inc, _voice(1), one, b"a")
    size = one.nbytes
    lru = VoicePrefixCache(inc, budget_bytes=size)  # room for one voice
    for key, seed in ((b"a", 1), (b"b", 2)):
        _stream(inc, _voice(seed), lru, key)
    assert lru.nbytes == size and not lru.holds(b"a") and lru.holds(b"b")
    small = VoicePrefixCache(inc, budget_bytes=size - 1)  # too big to keep: computed, not stored
    torch.testing.assert_close(_stream(inc, _voice(1), small), _stream(inc, _voice(1), None), atol=1e-5, rtol=0)
    assert small.nbytes == 0 and small.stats.misses == 1
    off = VoicePrefixCache(inc, budget_bytes=0)
    state = FlowStreamState()
    tokens, feat, emb = _voice(1)
    off.prepare([(b"a", StreamCall(state, tokens[:103], feat, emb))])
    assert state.tokens_done == 0 and off.stats.misses == 0


def test_a_copy_owns_its_buffers(flow) -> None:
    inc = IncrementalFlow(flow)
    tokens, feat, emb = _voice(3)
    state = FlowStreamState()
    with torch.inference_mode():
        inc.forward([StreamCall(state, tokens[:53], feat, emb)])
        copied = copy_state(state)
        assert copied.tokens_done == 50 and copied.nbytes <= state.nbytes and set(copied.kv) == set(state.kv)
        key = next(iter(state.kv))
        original = copied.kv[key].k.data.clone()
        state.kv[key].k.data.zero_()
        assert torch.equal(copied.kv[key].k.data, original)


def test_voice_key_follows_the_arrays() -> None:
    tokens, mel, emb = np.arange(60, dtype=np.int32), np.ones((120, 80), np.float32), np.zeros(192, np.float32)
    assert voice_key(tokens, mel, emb) == voice_key(tokens.copy(), torch.from_numpy(mel), emb)
    assert voice_key(tokens, mel, emb) != voice_key(tokens, mel * 2, emb)
    assert voice_key(tokens, mel, emb) != voice_key(tokens.astype(np.int64), mel, emb)


def test_warming_a_voice_stores_its_prefix_without_a_stream(flow) -> None:
    inc = IncrementalFlow(flow)
    cache = VoicePrefixCache(inc)
    tokens, feat, emb = _voice(4)
    assert cache.warm(b"w", tokens[:PROMPT], feat, emb) and cache.stats.misses == 1
    assert cache.warm(b"w", tokens[:PROMPT], feat, emb) and cache.stats.misses == 1  # kept: not computed again
    torch.testing.assert_close(_stream(inc, (tokens, feat, emb), cache, b"w"), _stream(inc, (tokens, feat, emb), None),
                               atol=1e-5, rtol=0)
    assert cache.stats.hits == 1
    short = _voice(5, prompt=27)
    assert not cache.warm(b"s", short[0][:27], short[1], short[2])  # no whole chunk before the look-ahead
    assert not VoicePrefixCache(inc, budget_bytes=0).warm(b"w", tokens[:PROMPT], feat, emb)


def test_a_restored_stream_has_room_for_its_first_call(flow) -> None:
    """Its buffers are not regrown (copied and faulted in again) by the call that restored them."""
    inc = IncrementalFlow(flow)
    cache = VoicePrefixCache(inc)
    tokens, feat, emb = _voice(6)
    assert cache.warm(b"r", tokens[:PROMPT], feat, emb)
    state = FlowStreamState()
    call = StreamCall(state, tokens[: PROMPT + 40 + LOOK], feat, emb)  # 50 prefix tokens -> 100 after the call
    with torch.inference_mode():
        cache.prepare([(b"r", call)])
        assert state.tokens_done == 50
        before = {key: (kv.k.data.data_ptr(), kv.k.length, kv.k.data.size(2)) for key, kv in state.kv.items()}
        assert all(cap >= 2 * length for _, length, cap in before.values())
        inc.forward([call])
    assert state.tokens_done == PROMPT + 40
    assert all(state.kv[key].k.data.data_ptr() == ptr and state.kv[key].k.length > length
               for key, (ptr, length, _) in before.items())
