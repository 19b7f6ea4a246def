"""The flow-cache budget (scheduler/flow_budget.py) and the scheduler marking chunks incremental. Torch-free."""
from __future__ import annotations

import numpy as np

from scheduler.chunk_policy import ChunkPolicyConfig
from scheduler.config import SchedulerConfig
from scheduler.flow_budget import FlowBudgetConfig, FlowCacheBudget, need_bytes
from scheduler.jobs import VoicePrompt
from scheduler.plan import ChunkItem, StepPlan, StepResult
from scheduler.request import Request
from scheduler.scheduler import Scheduler
from scheduler.testing import FakeClock, answer, run_until_idle, step

BPF = 1000  # bytes per mel frame


def need(end: int) -> int:
    return int((1.5 * 2 * end + 64) * BPF)


def budget(**kw: object) -> FlowCacheBudget:
    return FlowCacheBudget(FlowBudgetConfig(**{"enabled": True, "bytes_per_frame": BPF, **kw}))


def chunk(rid: str, offset: int, end: int, final: bool = False, streaming: bool = True) -> ChunkItem:
    return ChunkItem(rid, tuple(range(end)), offset, end, finalize=final, streaming=streaming,
                     is_first=offset == 0, is_last=final)


def incremental(b: FlowCacheBudget, *chunks: tuple[ChunkItem, int]) -> list[bool]:
    return [c.incremental for c in b.plan(list(chunks))]


# ---------------------------------------------------------------- the budget alone

def test_need_bytes_matches_the_runner_formula() -> None:
    assert need_bytes(100, BPF) == need(100) == budget().need_bytes(100)
    assert need_bytes(100, 7, mel_ratio=3, growth=2.0) == int((2.0 * 3 * 100 + 64) * 7)


def test_streaming_chunks_continue_the_cache_on_the_grid() -> None:
    b = budget()
    # prompt 21: first hop 29 (+3 look-ahead) ends the frames at 21 + 29 = 50, on the 25 grid
    assert incremental(b, (chunk("a", 0, 32), 21)) == [True]
    assert b.tokens_done("a") == 50 and b.reservation("a") == need(50) == b.reserved_bytes
    assert incremental(b, (chunk("a", 29, 82), 21)) == [True]
    assert b.tokens_done("a") == 100 and b.reserved_bytes == need(100)


def test_over_the_per_request_budget_recomputes_and_drops_the_cache() -> None:
    b = budget(per_request_bytes=need(100))
    assert incremental(b, (chunk("a", 0, 28), 0), (chunk("b", 0, 53), 50)) == [True, True]
    assert incremental(b, (chunk("a", 25, 103), 0), (chunk("b", 50, 153), 50)) == [True, False]
    assert b.tokens_done("b") == 0 and b.reservation("b") == 0 and b.reserved_bytes == need(100)


def test_pool_shared_by_two_requests_the_second_recomputes_until_the_first_releases() -> None:
    b = budget(pool_bytes=need(100))
    assert incremental(b, (chunk("a", 0, 28), 25), (chunk("b", 0, 28), 25)) == [True, False]
    assert b.reserved_bytes == need(50)
    assert incremental(b, (chunk("b", 25, 53), 25),) == [False]  # still no room
    b.release("a")  # a ended (or was cancelled)
    assert b.reserved_bytes == 0
    # b starts a fresh cache (the runner computes its prefix too): prompt 25 + [50, 75) -> up to 100
    assert incremental(b, (chunk("b", 50, 78), 25),) == [True]
    assert b.tokens_done("b") == 100 and b.reserved_bytes == need(100)


def test_a_cache_over_the_pool_frees_its_room_for_the_others() -> None:
    b = budget(pool_bytes=need(100))
    assert incremental(b, (chunk("a", 0, 53), 0),) == [True]
    # a's next chunk would need more than the pool: it recomputes and its cache goes; b then fits
    assert incremental(b, (chunk("a", 50, 153), 0), (chunk("b", 0, 28), 0)) == [False, True]
    assert b.reserved_bytes == need(25)


def test_an_off_grid_end_leaves_the_cache_at_its_last_grid_point() -> None:
    """A short first chunk (lead_hop): the runner's cache stops at the grid point before its end, so the
    next chunk, which keeps frames from the off-grid point on, continues from there."""
    b = budget(token_chunk=50)
    assert incremental(b, (chunk("a", 0, 53), 0),) == [True] and b.tokens_done("a") == 50
    assert incremental(b, (chunk("a", 50, 78), 0),) == [True]  # ends at 75: off the 50 grid
    assert b.tokens_done("a") == 50 and b.reserved_bytes == need(75)  # room for the frames it computed
    assert incremental(b, (chunk("a", 75, 103), 0),) == [True]
    assert b.tokens_done("a") == 100 and b.reserved_bytes == need(100)
    # a cache that does not end on the grid, or ends past the first kept token, cannot continue
    b2 = budget()
    assert incremental(b2, (chunk("a", 0, 53), 0),) == [True]
    assert incremental(b2, (chunk("a", 25, 103), 0),) == [False]  # cache ends at 50, chunk keeps from 25


def test_a_final_chunk_holds_its_reservation_for_its_batch() -> None:
    """Its cache exists while the batch runs: the next chunk in the same batch sees it."""
    b = budget(pool_bytes=need(75) + need(50) - 1)
    final = chunk("a", 50, 75, final=True)  # streaming final chunk (final_chunk_streaming): frames to 75
    assert incremental(b, (chunk("a", 0, 53), 0),) == [True]
    assert incremental(b, (final, 0), (chunk("b", 0, 28), 25)) == [True, False]
    assert b.reserved_bytes == 0 and b.tokens_done("a") == 0


def test_non_streaming_chunks_recompute_and_free_first() -> None:
    b = budget(pool_bytes=need(50))
    assert incremental(b, (chunk("a", 0, 53), 0),) == [True]
    # a's full-attention final chunk recomputes; its room goes to b in the same batch
    assert incremental(b, (chunk("b", 0, 28), 25), (chunk("a", 50, 60, final=True, streaming=False), 0)) == [True, False]
    assert b.tokens_done("a") == 0 and b.reserved_bytes == need(50)


def test_disabled_budget_recomputes_everything() -> None:
    b = FlowCacheBudget(FlowBudgetConfig())
    assert incremental(b, (chunk("a", 0, 28), 0), (chunk("b", 0, 28), 0)) == [False, False]
    assert b.reserved_bytes == 0


# ---------------------------------------------------------------- the scheduler

VOICE = VoicePrompt(np.zeros(71, np.int32), np.zeros(192, np.float32), np.zeros((142, 80), np.float32), "")


def sched(flow: FlowBudgetConfig | None = None, **chunk_kw: object) -> Scheduler:
    flow = flow or FlowBudgetConfig(enabled=True, bytes_per_frame=BPF)
    chunk_kw.setdefault("final_streaming", False)  # upstream's full-attention final chunk unless a test says
    chunk_kw.setdefault("flow_ahead", False)  # the chunks' own decisions; advances have their tests below
    cfg = SchedulerConfig(num_slots=8, slot_len=4096, max_running=8, chunk=ChunkPolicyConfig(**chunk_kw),
                          flow_cache=flow)
    return Scheduler(cfg, FakeClock())


def plan_with_chunks(s: Scheduler) -> StepPlan:
    """Step until a plan holds chunks; that plan is returned unanswered (its batch is "out")."""
    plan = s.schedule()
    while not plan.chunks:
        s.update(plan, answer(plan))
        plan = s.schedule()
    return plan


def flags(plans: list, rid: str) -> list[bool]:
    return [c.incremental for p in plans for c in p.chunks if c.request_id == rid]


def test_scheduler_marks_streaming_chunks_incremental_and_frees_at_the_end() -> None:
    s = sched()
    s.add_request(Request("a", text_ids=[1], fixed_tokens=300, flow_prompt_len=71))
    s.add_request(Request("n", text_ids=[1], fixed_tokens=60, flow_prompt_len=71, stream=False))
    plans = run_until_idle(s)
    assert flags(plans, "a") == [True, True, True, True, False]  # the full-attention final chunk recomputes
    assert flags(plans, "n") == [False]
    assert s.flow_cache.reserved_bytes == 0 and s.stats().flow_cache_bytes == 0


def test_streaming_final_chunk_is_incremental_and_spent() -> None:
    s = sched(final_streaming=True)
    s.add_request(Request("a", text_ids=[1], fixed_tokens=110, flow_prompt_len=71))
    plans = run_until_idle(s)
    finals = [c for p in plans for c in p.chunks if c.finalize]
    assert flags(plans, "a") == [True, True, True] and finals[0].streaming
    assert s.flow_cache.reserved_bytes == 0


def test_scheduler_per_request_budget_exceeded_recomputes() -> None:
    s = sched(FlowBudgetConfig(enabled=True, bytes_per_frame=BPF, per_request_bytes=need(150)))
    s.add_request(Request("a", text_ids=[1], fixed_tokens=300, flow_prompt_len=71))
    # frames end at 100, 150, then 250 and 350: over the budget
    assert flags(run_until_idle(s), "a") == [True, True, False, False, False]


def test_scheduler_pool_the_second_request_recomputes_until_the_first_releases() -> None:
    s = sched(FlowBudgetConfig(enabled=True, bytes_per_frame=BPF, pool_bytes=need(100) + need(100) // 2))
    s.add_request(Request("a", text_ids=[1], fixed_tokens=40, flow_prompt_len=71))
    s.add_request(Request("b", text_ids=[1], fixed_tokens=90, flow_prompt_len=71))
    plans = run_until_idle(s)
    first = next(p for p in plans if p.chunks)
    assert [(c.request_id, c.incremental) for c in first.chunks] == [("a", True), ("b", False)]
    # a's last chunk (full attention) frees its cache; b's next chunk then starts a fresh one
    assert flags(plans, "a") == [True, False] and flags(plans, "b") == [False, True, False]


def test_cancel_releases_the_reservation() -> None:
    s = sched(FlowBudgetConfig(enabled=True, bytes_per_frame=BPF, pool_bytes=10 * need(100)))
    s.add_request(Request("a", text_ids=[1], fixed_tokens=300, flow_prompt_len=71))
    while not s.flow_cache.reserved_bytes:
        step(s)
    stats = s.stats()
    assert stats.flow_cache_bytes == need(100) and stats.flow_cache_pool_bytes == 10 * need(100)
    assert s.cancel("a")
    assert s.flow_cache.reserved_bytes == 0 and s.stats().flow_cache_bytes == 0


def test_a_request_ended_with_its_chunk_out_keeps_its_reservation_until_the_chunk_is_back() -> None:
    s = sched()
    s.add_request(Request("a", text_ids=[1], fixed_tokens=300, flow_prompt_len=71))
    plan = plan_with_chunks(s)
    assert s.cancel("a") and s.flow_cache.reserved_bytes == need(100)  # the runner's cache lives meanwhile
    s.update(plan, answer(plan))
    assert s.flow_cache.reserved_bytes == 0
    # a failed batch is never updated: the next plan with chunks (no batch out then) frees it
    s.add_request(Request("b", text_ids=[1], fixed_tokens=300, flow_prompt_len=71))
    plan = plan_with_chunks(s)
    assert s.fail("b", "flow exploded") and s.flow_cache.reserved_bytes == need(100)
    s.schedule(with_chunks=False)
    assert s.flow_cache.reserved_bytes == need(100)
    s.schedule()
    assert s.flow_cache.reserved_bytes == 0


def test_runner_reported_recompute_drops_the_budget_cache() -> None:
    s = sched()
    s.add_request(Request("a", text_ids=[1], fixed_tokens=300, flow_prompt_len=71))
    plan = plan_with_chunks(s)
    assert plan.chunks[0].incremental and s.flow_cache.tokens_done("a") == 100
    res = answer(plan)
    s.update(plan, StepResult(res.sampled, res.chunk_samples, flow_recomputed=frozenset({"a"})))
    assert s.flow_cache.tokens_done("a") == 0 and s.flow_cache.reserved_bytes == 0


def test_admitted_carries_voice_speed_seed_with_the_first_prefill_only() -> None:
    s = sched()
    s.add_request(Request("a", text_ids=[1, 2], fixed_tokens=5, voice=VOICE, speed=1.25, seed=9))
    s.add_request(Request("b", text_ids=[1], fixed_tokens=5))
    plans = run_until_idle(s)
    first = plans[0]
    assert [n.request_id for n in first.admitted] == [p.request_id for p in first.prefills] == ["a", "b"]
    a = first.admitted[0]
    assert a.voice is VOICE and a.speed == 1.25 and a.seed == 9
    assert first.admitted[1].voice is None and first.admitted[1].speed == 1.0
    assert all(not p.admitted for p in plans[1:])

