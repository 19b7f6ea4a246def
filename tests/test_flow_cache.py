"""Incremental streaming flow: every non-final call's new frames equal the recompute path's (tiny model)."""
from __future__ import annotations

import pytest
import torch

from kernels.flow import CausalMaskedDiffWithXvec
from kernels.flow_cache import (
    FlowStreamState,
    IncrementalFlow,
    StreamCall,
    TimeBuffer,
    _chunk_causal_attention,
    _chunk_masked,
)
from kernels.parity.flow import _rows, load_flow
from tests.conftest import REFERENCE_DIR, needs_reference

TINY = REFERENCE_DIR / "tiny"
CASES = REFERENCE_DIR / "cases"
pytestmark = needs_reference("tiny/flow.pt", "cases/flow.safetensors")
LOOK = 3


@pytest.fixture(scope="module")
def flow() -> CausalMaskedDiffWithXvec:
    return load_flow(TINY)


def _request(seed: int, prompt: int, generated: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 6561, (prompt + generated,), generator=gen), torch.randn(2 * prompt, 80, generator=gen),
            torch.randn(192, generator=gen))


def _hops(prompt: int, n: int) -> list[int]:
    """The scheduler's schedule: 25 + pad (prompt + hop on the 25 grid), 50, 100, 100, ..."""
    pad = -prompt % 25
    hops = [25 + pad] + [50] + [100] * n
    return hops[:n]


def _recompute(flow: CausalMaskedDiffWithXvec, tokens: torch.Tensor, feat: torch.Tensor, emb: torch.Tensor,
               offset: int) -> torch.Tensor:
    mel, _ = flow.inference(**_rows([(tokens, feat)], emb[None]), streaming=True, finalize=False)
    return mel[0, :, 2 * offset :]


def _new_frames(result: tuple[torch.Tensor, int], prompt: int, offset: int) -> torch.Tensor:
    mel, first = result
    return mel[:, 2 * (prompt + offset) - first :]


@pytest.mark.parametrize(("seed", "prompt"), [(1, 21), (2, 50), (3, 7)])
def test_each_call_matches_recompute(flow: CausalMaskedDiffWithXvec, seed: int, prompt: int) -> None:
    tokens, feat, emb = _request(seed, prompt, 220)
    inc, state, offset = IncrementalFlow(flow), FlowStreamState(), 0
    for hop in _hops(prompt, 3):
        end = prompt + offset + hop + LOOK
        assert inc.can_continue(state, prompt + offset, end - LOOK)
        got = inc.forward([StreamCall(state, tokens[:end], feat, emb)])[0]
        ref = _recompute(flow, tokens[:end], feat, emb, offset)
        new = _new_frames(got, prompt, offset)
        assert new.shape == ref.shape == (80, 2 * hop)
        torch.testing.assert_close(new, ref, atol=1e-5, rtol=0)
        offset += hop
        assert state.tokens_done == prompt + offset and inc.keeps_state(state.tokens_done)
    assert 0 < state.nbytes <= 2 * 2 * state.tokens_done * inc.bytes_per_frame()


def test_batched_requests_at_different_offsets_match_alone(flow: CausalMaskedDiffWithXvec) -> None:
    """Three requests (different prompts), one fresh and two mid-stream, in one call: each row == alone."""
    reqs = [_request(10 + i, p, 200) for i, p in enumerate((30, 12, 41))]
    inc = IncrementalFlow(flow)
    states = [FlowStreamState() for _ in reqs]
    offsets = [0, 0, 0]
    warm = [0, 1, 2]  # calls already done before the batched one
    for i, ((tokens, feat, emb), st) in enumerate(zip(reqs, states)):
        for hop in _hops(feat.size(0) // 2, warm[i]):
            p = feat.size(0) // 2
            inc.forward([StreamCall(st, tokens[: p + offsets[i] + hop + LOOK], feat, emb)])
            offsets[i] += hop
    calls, expected = [], []
    for i, ((tokens, feat, emb), st) in enumerate(zip(reqs, states)):
        p = feat.size(0) // 2
        hop = _hops(p, warm[i] + 1)[-1]
        end = p + offsets[i] + hop + LOOK
        calls.append(StreamCall(st, tokens[:end], feat, emb))
        expected.append(_recompute(flow, tokens[:end], feat, emb, offsets[i]))
    results = inc.forward(calls)
    for i, (res, ref) in enumerate(zip(results, expected)):
        torch.testing.assert_close(_new_frames(res, reqs[i][1].size(0) // 2, offsets[i]), ref, atol=1e-5, rtol=0)


def test_upstream_stream_fixture_new_frames(flow: CausalMaskedDiffWithXvec) -> None:
    from safetensors.torch import load_file

    c = load_file(str(CASES / "flow.safetensors"))
    prompt, feat, emb = c["prompt_token"][0].long(), c["prompt_feat"][0], c["embedding"][0]
    inc, state, offset = IncrementalFlow(flow), FlowStreamState(), 0
    for name in ("flow0", "flow1"):
        gen = c[f"stream.{name}.token"][0].long()
        res = inc.forward([StreamCall(state, torch.cat([prompt, gen]), feat, emb)])[0]
        ref = c[f"stream.{name}.mel"][:, :, 2 * offset :][0]
        # upstream fixture, same bound as the offline mel (test_flow): fp32 vs fp64 6.4e-6 on |mel| <= 5.9
        torch.testing.assert_close(_new_frames(res, prompt.numel(), offset), ref, atol=1e-4, rtol=0)
        offset = gen.numel() - LOOK


def test_planning_refuses_off_grid_or_discontinuous_or_over_budget(flow: CausalMaskedDiffWithXvec) -> None:
    inc = IncrementalFlow(flow)
    assert inc.can_continue(None, 21, 50) and inc.can_continue(FlowStreamState(tokens_done=50), 50, 100)
    assert not inc.can_continue(FlowStreamState(tokens_done=100), 75, 125)  # cache already past the start
    assert not inc.can_continue(FlowStreamState(tokens_done=60), 60, 110)  # off the 25-token grid
    assert inc.keeps_state(100) and not inc.keeps_state(101)
    small = IncrementalFlow(flow, budget_bytes=inc.need_bytes(25))
    assert small.can_continue(None, 0, 25) and not small.can_continue(None, 0, 50)
    # the projection covers the buffers' growth slack: at most 1.5x the frames (64 rows at least)
    assert inc.need_bytes(100) == int((1.5 * 2 * 100 + 64) * inc.bytes_per_frame())


def test_time_buffer_grows_and_keeps_prefix() -> None:
    buf = TimeBuffer()
    parts = [torch.randn(2, 3, n, 4) for n in (5, 70, 1, 200)]
    for i, p in enumerate(parts):
        view = buf.append(p)
        assert torch.equal(view, torch.cat(parts[: i + 1], dim=2))
    assert buf.length == 276 and buf.data is not None and buf.data.size(2) >= 276


@pytest.mark.parametrize("budget", [512 << 20, 1])
def test_runner_streaming_chunks_match_recompute_and_drop_state(tiny_model_dir, budget: int) -> None:
    """The runner's wiring: two requests batched chunk by chunk, incremental == recompute, state freed;
    over budget (1 byte) every chunk falls back to recomputing."""
    import numpy as np

    from kernels.model import load_model
    from kernels.runner import ModelRunner
    from scheduler.jobs import VoicePrompt
    from scheduler.plan import ChunkItem

    model = load_model(tiny_model_dir)
    runners = [ModelRunner(model, 1, 64, incremental_flow=flag, flow_cache_bytes=budget) for flag in (True, False)]
    reqs = {f"r{p}": _request(20 + p, p, 200) for p in (21, 40)}
    for runner in runners:
        for rid, (tokens, feat, emb) in reqs.items():
            p = feat.size(0) // 2
            voice = VoicePrompt(tokens[:p].numpy().astype(np.int32), emb.numpy(), feat.numpy(), "")
            runner.add_request(rid, voice)
    offsets = {rid: 0 for rid in reqs}
    for k in range(3):
        chunks = []
        for rid, (tokens, feat, _) in reqs.items():
            p, off = feat.size(0) // 2, offsets[rid]
            end = off + _hops(p, k + 1)[-1] + LOOK
            gen = tuple(int(t) for t in tokens[p : p + end])
            chunks.append(ChunkItem(rid, gen, off, end, finalize=False, streaming=True, is_first=k == 0,
                                    is_last=False))
            offsets[rid] = end - LOOK
        with torch.inference_mode():
            inc, ref = (r._flow_group(chunks, True, False) for r in runners)
        for c in chunks:
            torch.testing.assert_close(inc[c.request_id], ref[c.request_id], atol=1e-5, rtol=0)
    assert set(runners[0].flow_states) == (set(reqs) if budget > 1 else set())
    last = ChunkItem("r21", tuple(int(t) for t in reqs["r21"][0][21:]), offsets["r21"], 200, finalize=True,
                     streaming=False, is_first=False, is_last=True)
    with torch.inference_mode():
        runners[0]._flow_group([last], False, True)
    runners[0].release("r40")
    assert runners[0].flow_states == {}


@pytest.mark.parametrize(("seed", "prompt", "tail"), [(4, 21, 37), (5, 50, 3)])
def test_final_call_with_chunk_masks_matches_recompute(flow: CausalMaskedDiffWithXvec, seed: int, prompt: int,
                                                        tail: int) -> None:
    """A streaming request's last call with chunk masks (streaming=True, finalize=True): no look-ahead,
    zeros to the right, a partial last chunk; its new frames equal the full pass's."""
    hops = _hops(prompt, 2)
    tokens, feat, emb = _request(seed, prompt, sum(hops) + tail)
    inc, state, offset = IncrementalFlow(flow), FlowStreamState(), 0
    for hop in hops:
        inc.forward([StreamCall(state, tokens[: prompt + offset + hop + LOOK], feat, emb)])
        offset += hop
    got = inc.forward([StreamCall(state, tokens, feat, emb)], finalize=True)[0]
    mel, _ = flow.inference(**_rows([(tokens, feat)], emb[None]), streaming=True, finalize=True)
    new = _new_frames(got, prompt, offset)
    assert new.shape == (80, 2 * tail)
    torch.testing.assert_close(new, mel[0, :, 2 * offset :], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("start", "n"), [(0, 50), (0, 120), (100, 100), (150, 37), (30, 90), (7, 3)])
def test_chunk_causal_attention_equals_one_masked_call(start: int, n: int) -> None:
    g = torch.Generator().manual_seed(start * 1000 + n)
    q = torch.randn(2, 4, n, 16, generator=g)
    k = torch.randn(2, 4, start + n, 16, generator=g)
    v = torch.randn(2, 4, start + n, 16, generator=g)
    hidden = _chunk_masked(start, n, 50, q.device)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=~hidden)
    got = _chunk_causal_attention(q, k, v, start, 50)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5)


def test_shared_pool_admits_what_fits_and_frees_it(tiny_model_dir) -> None:
    """Two requests, a pool with room for one: the first chunk of each is exact either way, one request
    keeps a cache (its reservation counted), the other recomputes; finishing frees the reservation."""
    import numpy as np

    from kernels.model import load_model
    from kernels.runner import ModelRunner
    from scheduler.jobs import VoicePrompt
    from scheduler.plan import ChunkItem

    model = load_model(tiny_model_dir)
    probe = IncrementalFlow(model.flow)
    reqs = {rid: _request(30 + i, 50, 100) for i, rid in enumerate(("a", "b"))}
    need = probe.need_bytes(50 + _hops(50, 1)[0])  # frames up to the first chunk's end (prompt included)
    runner = ModelRunner(model, 1, 64, incremental_flow=True, flow_cache_pool_bytes=need + need // 2)
    ref = ModelRunner(model, 1, 64, incremental_flow=False)
    chunks = []
    for rid, (tokens, feat, emb) in reqs.items():
        voice = VoicePrompt(tokens[:50].numpy().astype(np.int32), emb.numpy(), feat.numpy(), "")
        for r in (runner, ref):
            r.add_request(rid, voice)
        end = _hops(50, 1)[0] + LOOK
        chunks.append(ChunkItem(rid, tuple(int(t) for t in tokens[50 : 50 + end]), 0, end, finalize=False,
                                streaming=True, is_first=True, is_last=False))
    with torch.inference_mode():
        got, want = runner._flow_group(chunks, True, False), ref._flow_group(chunks, True, False)
    for c in chunks:
        torch.testing.assert_close(got[c.request_id], want[c.request_id], atol=1e-5, rtol=0)
    assert list(runner.flow_states) == ["a"] and runner.flow_reserved == {"a": need}
    assert 0 < runner.flow_states["a"].nbytes <= need  # the reservation covers what the cache really holds
    runner.release("a")
    assert runner.flow_states == {} and runner.flow_reserved == {} and runner.flow_reserved_bytes == 0
