"""Flow work ahead of chunks (scheduler/chunk_policy.py `next_advance`, flow_budget.py `plan_advances`). Torch-free.

The engine-level check that advanced frames equal a chunk's own is
tests/test_kernels_engine.py::test_flow_ahead_gives_the_frames_of_chunk_calls."""
from __future__ import annotations

import pytest

from scheduler.chunk_policy import ChunkPolicy, ChunkPolicyConfig
from scheduler.config import SchedulerConfig
from scheduler.flow_budget import FlowBudgetConfig, FlowCacheBudget, need_bytes
from scheduler.plan import ChunkItem
from scheduler.request import Request
from scheduler.scheduler import Scheduler
from scheduler.testing import FakeClock, answer, run_until_idle

BPF = 1000  # bytes per mel frame


def need(end: int) -> int:
    return need_bytes(end, BPF)


def streaming(prompt: int, generated: int, offset: int = 0, chunks_done: int = 0, **kw: object) -> Request:
    req = Request("a", text_ids=[1], fixed_tokens=500, flow_prompt_len=prompt, **kw)
    req.speech_ids = [7] * generated
    req.token_offset, req.chunks_done = offset, chunks_done
    return req


def advance_end(policy: ChunkPolicy, req: Request, cache_end: int = 0) -> int | None:
    item = policy.next_advance(req, cache_end)
    return None if item is None else item.token_end


# ---------------------------------------------------------------- the policy


@pytest.mark.parametrize("prompt, generated, end", [
    (75, 2, None),  # the prompt's last chunk needs 3 generated look-ahead tokens
    (75, 3, 3),  # ... then its frames (up to the grid point 75) can be computed
    (75, 27, 3),  # the first hop's grid chunk is not complete yet: still only the prompt's last chunk
    (80, 3, None),  # the prompt's whole chunks end at 75, whose look-ahead (75..77) is prompt: the voice's
    (80, 22, None),
    (80, 23, 23),  # grid point 100 once 100 + 3 tokens exist
    (50, 10, 3),  # prompt on the grid: chunk 25..50 reads 50..52
])
def test_an_advance_ends_on_the_last_grid_point_with_its_look_ahead(prompt: int, generated: int, end: int | None) -> None:
    policy = ChunkPolicy(ChunkPolicyConfig())
    assert advance_end(policy, streaming(prompt, generated)) == end


def test_an_advance_covers_the_whole_grid_chunks_of_the_first_hop_only() -> None:
    policy = ChunkPolicy(ChunkPolicyConfig())
    # prompt 60: first hop 40 (frames to 100): the prompt's last chunk 50..75 once 75 + 3 exist
    req = streaming(60, 18)
    item = policy.next_advance(req, 50)
    assert item is not None and (item.token_offset, item.token_end) == (0, 18)
    assert item.advance and item.incremental and item.streaming and not (item.is_first or item.is_last)
    assert item.token_ids == tuple(req.speech_ids[:18])
    assert policy.next_advance(req, 75) is None  # already there
    # later hops: none (beside the LLM the flow's work costs throughput; only the first audio gains)
    later = streaming(71, 29 + 28, offset=29, chunks_done=1)  # grid chunk 100..125 of hop 50 is complete
    assert policy.next_chunk(later) is None and advance_end(policy, later, cache_end=100) is None


def test_no_advance_when_the_chunk_itself_is_ready_or_for_other_requests() -> None:
    policy = ChunkPolicy(ChunkPolicyConfig())
    assert policy.next_chunk(streaming(75, 28)) is not None and advance_end(policy, streaming(75, 28)) is None
    assert advance_end(policy, streaming(75, 10, stream=False)) is None  # one chunk after the LLM: nothing ahead
    done = streaming(75, 10)
    done.llm_done = True
    assert advance_end(policy, done) is None  # its final chunk is ready
    assert advance_end(ChunkPolicy(ChunkPolicyConfig(flow_ahead=False)), streaming(75, 10)) is None


# ---------------------------------------------------------------- the budget


def budget(**kw: object) -> FlowCacheBudget:
    return FlowCacheBudget(FlowBudgetConfig(**{"enabled": True, "bytes_per_frame": BPF, **kw}))


def item(offset: int, end: int, advance: bool) -> ChunkItem:
    return ChunkItem("a", tuple(range(end)), offset, end, finalize=False, streaming=True,
                     is_first=offset == 0 and not advance, is_last=False, incremental=advance, advance=advance)


def test_the_chunk_after_an_advance_continues_from_the_advance() -> None:
    b = budget()
    # prompt 71 (first hop 29: frames to 100); an advance to grid 75 with the first 7 generated tokens
    assert b.plan_advances([(item(0, 7, True), 71)]) == [item(0, 7, True)]
    assert b.tokens_done("a") == 75 and b.reserved_bytes == need(75)
    # the chunk keeps tokens from 71 on, before the cache end: it continues because the runner holds 71..75
    assert [c.incremental for c in b.plan([(item(0, 32, False), 71)])] == [True]
    assert b.tokens_done("a") == 100 and b.reserved_bytes == need(100)
    # hop 50: an advance to 125, then the chunk to 150
    assert b.plan_advances([(item(29, 57, True), 71)]) and b.tokens_done("a") == 125
    assert [c.incremental for c in b.plan([(item(29, 82, False), 71)])] == [True]
    assert b.tokens_done("a") == 150


def test_without_an_advance_a_cache_past_the_chunk_start_recomputes() -> None:
    b = budget()
    assert [c.incremental for c in b.plan([(item(0, 32, False), 71)])] == [True]  # to 100
    # a chunk keeping tokens from 90 on cannot use a cache that ends at 100 (nothing holds 90..100)
    assert [c.incremental for c in b.plan([(item(19, 57, False), 71)])] == [False]
    assert b.tokens_done("a") == 0


def test_an_advance_that_does_not_fit_is_left_out_and_the_cache_kept() -> None:
    b = budget(pool_bytes=need(100))
    assert [c.incremental for c in b.plan([(item(0, 32, False), 71)])] == [True]  # to 100
    assert b.plan_advances([(item(29, 82 - 25, True), 71)]) == []  # 125 > the pool
    assert b.tokens_done("a") == 100 and b.reserved_bytes == need(100)
    assert b.plan_advances([(ChunkItem("a", (), 0, 3, False, False, False, False, True, True), 71)]) == []  # offline
    assert FlowCacheBudget(FlowBudgetConfig()).plan_advances([(item(0, 7, True), 71)]) == []  # budget off


def test_release_forgets_the_advance() -> None:
    b = budget()
    b.plan_advances([(item(0, 7, True), 71)])
    b.release("a")
    assert b.tokens_done("a") == 0 and b.reserved_bytes == 0
    # a fresh cache cannot continue a chunk from 71 unless it starts there: the chunk starts one (done 0)
    assert [c.incremental for c in b.plan([(item(0, 32, False), 71)])] == [True]


# ---------------------------------------------------------------- the scheduler


def sched(**chunk_kw: object) -> Scheduler:
    cfg = SchedulerConfig(num_slots=8, slot_len=4096, max_running=8, chunk=ChunkPolicyConfig(**chunk_kw),
                          flow_cache=FlowBudgetConfig(enabled=True, bytes_per_frame=BPF))
    return Scheduler(cfg, FakeClock())


def test_the_scheduler_plans_advances_only_when_no_chunk_is_ready_and_they_carry_no_audio() -> None:
    s = sched()
    s.add_request(Request("a", text_ids=[1], fixed_tokens=300, flow_prompt_len=71))
    plans = run_until_idle(s)
    items = [(c.advance, c.token_offset, c.token_end) for p in plans for c in p.chunks]
    assert items == [
        (True, 0, 7),  # the prompt's last chunk (50..75) once 75..77 exist
        (False, 0, 32),  # the first hop (29 tokens): frames 75..100 only
        (False, 29, 82),  # later hops as without
        (False, 79, 182),
        (False, 179, 282),
        (False, 279, 300),
    ]
    assert all(c.incremental for p in plans for c in p.chunks)
    totals = s.stats().totals
    assert totals.chunks == 5 and totals.flow_advances == 1
    assert totals.samples_emitted == 300 * 960 and s.flow_cache.reserved_bytes == 0


def test_no_advance_while_another_stream_is_live() -> None:
    s = sched()
    s.add_request(Request("a", text_ids=[1], fixed_tokens=100, flow_prompt_len=71))
    s.add_request(Request("b", text_ids=[1], fixed_tokens=60, flow_prompt_len=71))
    plans = run_until_idle(s)
    assert not any(c.advance for p in plans for c in p.chunks)  # both reach their first chunk side by side
    assert s.stats().totals.flow_advances == 0 and s.stats().totals.chunks >= 4


def test_answers_without_audio_for_advances() -> None:
    s = sched()
    s.add_request(Request("a", text_ids=[1], fixed_tokens=300, flow_prompt_len=71))
    plan = s.schedule()
    while not plan.chunks:
        s.update(plan, answer(plan))
        plan = s.schedule()
    assert plan.chunks[0].advance and answer(plan).chunk_samples == {}
    s.update(plan, answer(plan))
    assert s.get("a").token_offset == 0 and s.get("a").chunks_done == 0  # nothing emitted


def test_flow_ahead_off_plans_chunks_only() -> None:
    s = sched(flow_ahead=False)
    s.add_request(Request("a", text_ids=[1], fixed_tokens=120, flow_prompt_len=71))
    assert not any(c.advance for p in run_until_idle(s) for c in p.chunks)
