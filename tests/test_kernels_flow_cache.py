"""Incremental streaming flow: every non-final call's new frames equal the recompute path's (tiny model)."""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from kernels.networks.flow import CausalMaskedDiffWithXvec
from kernels.parity.flow import _rows, load_flow
from kernels.runtime.flow_cache import (
    DEFAULT_BUDGET_BYTES,
    FlowStreamState,
    IncrementalFlow,
    StreamCall,
    TimeBuffer,
    _chunk_causal_attention,
    _chunk_masked,
)
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


@pytest.mark.parametrize(("seed", "prompt", "hops"), [(6, 50, [10, 15, 50]), (7, 21, [3, 1, 25, 50]),
                                                    (8, 7, [40, 3, 25])])
def test_calls_ending_off_the_grid_keep_the_cache_at_its_last_grid_point(flow: CausalMaskedDiffWithXvec, seed: int,
                                                                           prompt: int, hops: list[int]) -> None:
    """A short first chunk (chunk_policy `lead_hop`): a call ending inside a grid chunk gives that chunk's
    frames as a recompute over its tokens would, and its cache stops at the grid point before, so the next
    call (which recomputes the rest of that chunk) is exact too."""
    tokens, feat, emb = _request(seed, prompt, 160)
    inc, state, offset = IncrementalFlow(flow), FlowStreamState(), 0
    for hop in hops:
        end = prompt + offset + hop + LOOK
        assert inc.can_continue(state, prompt + offset, end - LOOK)
        got = _new_frames(inc.forward([StreamCall(state, tokens[:end], feat, emb)])[0], prompt, offset)
        torch.testing.assert_close(got, _recompute(flow, tokens[:end], feat, emb, offset), atol=1e-5, rtol=0)
        offset += hop
        assert state.tokens_done == (prompt + offset) // 25 * 25 and inc.keeps_state(state.tokens_done)
    partial = _recompute(flow, tokens[: prompt + hops[0] + LOOK], feat, emb, 0)
    whole = _recompute(flow, tokens[: prompt + offset + LOOK], feat, emb, 0)[:, : partial.size(1)]
    assert (prompt + hops[0]) % 25 == 0 or not torch.allclose(partial, whole, atol=1e-3)  # a partial chunk differs


def test_off_grid_and_on_grid_calls_batch_together(flow: CausalMaskedDiffWithXvec) -> None:
    """One call, one request ending inside a grid chunk and one on the grid; then both go on: each == alone."""
    reqs = [_request(20 + i, p, 120) for i, p in enumerate((50, 30))]
    inc = IncrementalFlow(flow)
    states = [FlowStreamState(), FlowStreamState()]
    offsets = [0, 0]
    for hops in ([12, 20], [20, 45]):  # request 0 ends at 62, then 82 (off); request 1 at 50 (on), then 95
        calls, expected = [], []
        for i, ((tokens, feat, emb), st) in enumerate(zip(reqs, states)):
            end = feat.size(0) // 2 + offsets[i] + hops[i] + LOOK
            calls.append(StreamCall(st, tokens[:end], feat, emb))
            expected.append(_recompute(flow, tokens[:end], feat, emb, offsets[i]))
        for i, (res, ref) in enumerate(zip(inc.forward(calls), expected)):
            got = _new_frames(res, reqs[i][1].size(0) // 2, offsets[i])
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
            offsets[i] += hops[i]
    assert [st.tokens_done for st in states] == [75, 75]


def test_fewer_ode_steps_keep_incremental_equal_to_recompute(flow: CausalMaskedDiffWithXvec) -> None:
    """`--flow-steps`: the cache holds one set of estimator states per Euler step, however many there are."""
    few = copy.deepcopy(flow)
    few.cfg = few.decoder.cfg = replace(flow.cfg, n_timesteps=4)
    tokens, feat, emb = _request(4, 21, 120)
    inc, state, offset = IncrementalFlow(few), FlowStreamState(), 0
    for hop in _hops(21, 2):
        end = 21 + offset + hop + LOOK
        got = _new_frames(inc.forward([StreamCall(state, tokens[:end], feat, emb)])[0], 21, offset)
        torch.testing.assert_close(got, _recompute(few, tokens[:end], feat, emb, offset), atol=1e-5, rtol=0)
        assert not torch.allclose(got, _recompute(flow, tokens[:end], feat, emb, offset), atol=1e-3)
        offset += hop


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


def _runner(model, incremental: bool = True, rids_voices=()):
    """A runner with these requests' state made as the engine does: from a plan's `admitted` entries."""
    from kernels.runtime.runner import ModelRunner
    from scheduler.plan import NewRequest, StepPlan

    runner = ModelRunner(model, 1, 64, incremental_flow=incremental)
    runner.execute_llm(StepPlan(0, admitted=tuple(NewRequest(rid, voice) for rid, voice in rids_voices)))
    return runner


def _voice(tokens: torch.Tensor, feat: torch.Tensor, emb: torch.Tensor):
    import numpy as np

    from scheduler.jobs import VoicePrompt

    p = feat.size(0) // 2
    return VoicePrompt(tokens[:p].numpy().astype(np.int32), emb.numpy(), feat.numpy(), "")


def _stream_chunk(rid: str, tokens: torch.Tensor, p: int, offset: int, hop: int, first: bool):
    from scheduler.plan import ChunkItem

    end = offset + hop + LOOK
    return ChunkItem(rid, tuple(int(t) for t in tokens[p : p + end]), offset, end, finalize=False, streaming=True,
                     is_first=first, is_last=False)


@pytest.mark.parametrize("budget", [512 << 20, 1])
def test_runner_streaming_chunks_match_recompute_and_drop_state(tiny_model_dir, budget: int) -> None:
    """The runner obeys the scheduler's budget: two requests batched chunk by chunk, incremental ==
    recompute, state freed; over the per-request budget (1 byte) every chunk is planned to recompute."""
    from kernels.runtime.flow_cache import flow_budget_config
    from kernels.weights.model import load_model
    from scheduler.flow_budget import FlowCacheBudget
    from scheduler.plan import ChunkItem

    model = load_model(tiny_model_dir)
    reqs = {f"r{p}": _request(20 + p, p, 200) for p in (21, 40)}
    voices = [(rid, _voice(*r)) for rid, r in reqs.items()]
    runners = [_runner(model, flag, voices) for flag in (True, False)]
    plan = FlowCacheBudget(flow_budget_config(model.flow, True, budget, None))
    offsets = {rid: 0 for rid in reqs}
    for k in range(3):
        chunks = []
        for rid, (tokens, feat, _) in reqs.items():
            p, off = feat.size(0) // 2, offsets[rid]
            chunks.append((_stream_chunk(rid, tokens, p, off, _hops(p, k + 1)[-1], k == 0), p))
            offsets[rid] = chunks[-1][0].token_end - LOOK
        chunks = plan.plan(chunks)
        assert all(c.incremental == (budget > 1) for c in chunks)
        with torch.inference_mode():
            inc, ref = (r._flow_group(chunks, True, False) for r in runners)
        for c in chunks:
            torch.testing.assert_close(inc[c.request_id], ref[c.request_id], atol=1e-5, rtol=0)
    assert set(runners[0].flow_states) == (set(reqs) if budget > 1 else set())
    for rid, (_, feat, _) in reqs.items():
        assert runners[0].flow_states.get(rid, FlowStreamState()).tokens_done == plan.tokens_done(rid)
    last = ChunkItem("r21", tuple(int(t) for t in reqs["r21"][0][21:]), offsets["r21"], 200, finalize=True,
                     streaming=False, is_first=False, is_last=True)
    (last,) = plan.plan([(last, 21)])
    assert not last.incremental and plan.tokens_done("r21") == 0
    with torch.inference_mode():
        runners[0]._flow_group([last], False, True)
    runners[0].release("r40")
    plan.release("r40")
    assert runners[0].flow_states == {} and plan.reserved_bytes == 0


def test_runner_without_a_cache_starts_one_or_recomputes_and_says_so(tiny_model_dir) -> None:
    """An incremental chunk whose cache the runner lost starts a fresh one (exact, it computes the prefix
    too); a runner without incremental flow recomputes it and reports that in its StepResult."""
    from dataclasses import replace

    from kernels.weights.model import load_model

    model = load_model(tiny_model_dir)
    tokens, feat, emb = _request(7, 30, 200)
    voice = [("a", _voice(tokens, feat, emb))]
    runner, ref, plain = (_runner(model, flag, voice) for flag in (True, False, False))
    first = _stream_chunk("a", tokens, 30, 0, _hops(30, 1)[0], True)
    second = _stream_chunk("a", tokens, 30, first.token_end - LOOK, 50, False)
    with torch.inference_mode():
        runner._flow_group([replace(first, incremental=True)], True, False)
        assert runner.flow_states["a"].tokens_done == 75  # prompt 30 + hop 45
        runner.flow_states.clear()  # lost (e.g. an exception dropped it)
        got = runner._flow_group([replace(second, incremental=True)], True, False)
        assert runner.flow_states["a"].tokens_done == 125
        want = ref._flow_group([second], True, False)
        torch.testing.assert_close(got["a"], want["a"], atol=1e-5, rtol=0)
        result, _ = plain.execute_chunks((replace(first, incremental=True),))
    assert result.flow_recomputed == {"a"} and result.chunk_samples["a"] > 0 and not plain.flow_states


def test_plan_admitted_makes_runner_state_and_a_bad_voice_fails_alone(tiny_model_dir) -> None:
    from kernels.weights.model import load_model
    from scheduler.plan import NewRequest, StepPlan

    model = load_model(tiny_model_dir)
    voice = _voice(*_request(8, 10, 0))
    runner = _runner(model)
    result = runner.execute_llm(StepPlan(1, admitted=(NewRequest("ok", voice, speed=1.5, seed=3),
                                                      NewRequest("bad", None))))
    assert set(runner.requests) == {"ok"} and runner.requests["ok"].speed == 1.5
    assert runner.requests["ok"].sampler is not None and set(result.failed) == {"bad"}


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
    """Two requests, a pool with room for one: the budget lets the first keep a cache (its reservation
    counted) and plans the other to recompute; the first chunk of each is exact either way; the runner's
    cache stays within the reservation; releasing frees it."""
    from kernels.runtime.flow_cache import flow_budget_config
    from kernels.weights.model import load_model
    from scheduler.flow_budget import FlowCacheBudget

    model = load_model(tiny_model_dir)
    probe = IncrementalFlow(model.flow)
    reqs = {rid: _request(30 + i, 50, 100) for i, rid in enumerate(("a", "b"))}
    need = probe.need_bytes(50 + _hops(50, 1)[0])  # frames up to the first chunk's end (prompt included)
    budget = FlowCacheBudget(flow_budget_config(model.flow, True, DEFAULT_BUDGET_BYTES, need + need // 2))
    voices = [(rid, _voice(*r)) for rid, r in reqs.items()]
    runner, ref = _runner(model, True, voices), _runner(model, False, voices)
    chunks = budget.plan([(_stream_chunk(rid, r[0], 50, 0, _hops(50, 1)[0], True), 50) for rid, r in reqs.items()])
    assert [c.incremental for c in chunks] == [True, False]
    assert budget.reservation("a") == need and budget.reserved_bytes == need
    with torch.inference_mode():
        got, want = runner._flow_group(chunks, True, False), ref._flow_group(chunks, True, False)
    for c in chunks:
        torch.testing.assert_close(got[c.request_id], want[c.request_id], atol=1e-5, rtol=0)
    assert list(runner.flow_states) == ["a"]
    assert 0 < runner.flow_states["a"].nbytes <= need  # the reservation covers what the cache really holds
    runner.release("a")
    budget.release("a")
    assert runner.flow_states == {} and budget.reserved_bytes == 0
