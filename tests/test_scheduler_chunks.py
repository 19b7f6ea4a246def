"""Chunk policy: hop schedule 25+pad, 50, 100..., full coverage, non-stream, urgency order."""
from __future__ import annotations

import itertools
import math

import pytest

from scheduler.chunk_policy import ChunkPolicy, ChunkPolicyConfig
from scheduler.config import SchedulerConfig
from scheduler.plan import ChunkItem, StepPlan
from scheduler.request import Request, RequestStatus
from scheduler.scheduler import Scheduler
from scheduler.testing import FakeClock, answer, run_until_idle, step


def sched(clock: FakeClock | None = None, **chunk_kw: object) -> Scheduler:
    """Upstream's chunk schedule (its final chunk with full attention) unless a test says otherwise."""
    chunk_kw.setdefault("final_streaming", False)
    cfg = SchedulerConfig(num_slots=8, slot_len=4096, max_running=8, chunk=ChunkPolicyConfig(**chunk_kw))
    return Scheduler(cfg, clock or FakeClock())


def chunks_of(plans: list, rid: str) -> list[ChunkItem]:
    return [c for p in plans for c in p.chunks if c.request_id == rid]


@pytest.mark.parametrize("p, first", [(0, 25), (71, 29), (75, 25), (76, 49), (100, 25), (1, 49)])
def test_first_hop_aligns_prompt_to_25_grid(p: int, first: int) -> None:
    policy = ChunkPolicy(ChunkPolicyConfig())
    assert policy.hop(0, p) == first and (p + first) % 25 == 0
    assert [policy.hop(i, p) for i in (1, 2, 3, 9)] == [50, 100, 100, 100]


def test_stream_schedule_boundaries_and_total_coverage() -> None:
    s = sched()
    r = Request("a", text_ids=[1], fixed_tokens=300, flow_prompt_len=71)
    s.add_request(r)
    plans = run_until_idle(s)
    got = [(c.token_offset, c.token_end, c.finalize, c.streaming, c.is_first, c.is_last) for c in chunks_of(plans, "a")]
    assert got == [
        (0, 32, False, True, True, False),  # hop 29 (=25+4) + 3 look-ahead
        (29, 82, False, True, False, False),  # hop 50
        (79, 182, False, True, False, False),  # hop 100
        (179, 282, False, True, False, False),
        (279, 300, True, False, False, True),  # final: the rest, full attention
    ]
    # a chunk is planned the step after its tokens exist: never needs a token not yet sampled
    for plan in plans:
        for c in plan.chunks:
            assert c.token_ids == tuple(r.speech_ids[: c.token_end])
    assert r.token_offset == 300 and r.mel_frames_vocoded == 600
    assert r.samples_emitted == 960 * 300 and r.status is RequestStatus.FINISHED_STOPPED


@pytest.mark.parametrize("p, lead, hops", [(75, 10, [10, 15, 50, 100]), (71, 10, [10, 19, 50, 100]),
                                           (76, 15, [15, 34, 50, 100]), (75, 25, [25, 50, 100, 100]),
                                           (71, 40, [29, 50, 100, 100])])
def test_a_lead_hop_splits_the_first_hop_and_keeps_the_grid(p: int, lead: int, hops: list[int]) -> None:
    """`lead_hop`: the first chunk is shorter, the second ends where upstream's first does (a lead hop as
    long as the first hop, or longer, changes nothing)."""
    policy = ChunkPolicy(ChunkPolicyConfig(lead_hop=lead))
    assert [policy.hop(i, p, policy.lead_for(1)) for i in range(4)] == hops
    ends = list(itertools.accumulate(hops, initial=p))
    assert all(e % 25 == 0 for e in ends[2 if hops[0] < 25 else 1 :])


def test_a_lead_hop_brings_the_first_chunk_forward_and_covers_every_token() -> None:
    s = sched(lead_hop=10)
    r = Request("a", text_ids=[1], fixed_tokens=120, flow_prompt_len=75)
    s.add_request(r)
    plans = run_until_idle(s)
    got = [(c.token_offset, c.token_end, c.is_first) for c in chunks_of(plans, "a")]
    assert got == [(0, 13, True), (10, 28, False), (25, 78, False), (75, 120, False)]
    assert r.samples_emitted == 960 * 120


@pytest.mark.parametrize("max_live, leads", [(1, [10, 0, 0]), (2, [10, 10, 0]), (0, [10, 10, 10])])
def test_a_lead_hop_goes_to_requests_starting_with_few_streams_live(max_live: int, leads: list[int]) -> None:
    """`lead_max_live`: decided once, as each request starts (by the streams live then, itself included)."""
    s = sched(lead_hop=10, lead_max_live=max_live)
    reqs = [Request(rid, text_ids=[1], fixed_tokens=200, flow_prompt_len=75) for rid in "abc"]
    for r in reqs:
        s.add_request(r)
        step(s)  # admitted one at a time
    assert [r.lead_hop for r in reqs] == leads
    run_until_idle(s)
    assert [r.samples_emitted for r in reqs] == [960 * 200] * 3


@pytest.mark.parametrize("n_tokens, p", [(1, 75), (12, 75), (13, 75), (14, 75), (30, 71), (200, 80), (27, 0)])
def test_a_lead_hop_covers_every_token_once_for_any_length(n_tokens: int, p: int) -> None:
    s = sched(lead_hop=10)
    r = Request("a", text_ids=[1], fixed_tokens=n_tokens, flow_prompt_len=p)
    s.add_request(r)
    chunks = chunks_of(run_until_idle(s), "a")
    assert chunks[-1].is_last and chunks[-1].token_end == n_tokens and sum(c.is_last for c in chunks) == 1
    for prev, nxt in itertools.pairwise(chunks):
        assert nxt.token_offset == prev.token_end - 3
    assert r.samples_emitted == 960 * n_tokens


def test_no_lead_hop_for_a_request_that_does_not_stream() -> None:
    s = sched(lead_hop=10)
    r = Request("a", text_ids=[1], fixed_tokens=60, flow_prompt_len=75, stream=False)
    s.add_request(r)
    step(s)
    assert r.lead_hop == 0


def test_first_chunk_waits_for_hop_plus_lookahead() -> None:
    s = sched()
    r = Request("a", text_ids=[1], fixed_tokens=100, flow_prompt_len=0)
    s.add_request(r)
    n_at_first_chunk = None
    while n_at_first_chunk is None:
        n_before = len(r.speech_ids)
        plan, _ = step(s)
        if plan.chunks:
            n_at_first_chunk = n_before
    assert n_at_first_chunk == 28  # 25 + 3 (spec §8.2 timing)


def test_llm_end_drains_full_hops_then_final_like_upstream() -> None:
    policy = ChunkPolicy(ChunkPolicyConfig())
    r = Request("a", text_ids=[1], flow_prompt_len=0, speech_ids=list(range(300)), llm_done=True)
    c = policy.next_chunk(r)
    assert c is not None and (c.token_offset, c.token_end, c.finalize) == (0, 28, False)
    r.token_offset, r.chunks_done = 25, 1
    r.speech_ids = r.speech_ids[:60]  # 35 left < 50 + 3: the final chunk takes everything
    c = policy.next_chunk(r)
    assert c is not None and (c.token_offset, c.token_end, c.finalize) == (25, 60, True)
    one_shot = ChunkPolicy(ChunkPolicyConfig(drain_in_hops=False))
    r2 = Request("b", text_ids=[1], speech_ids=list(range(300)), llm_done=True)
    c2 = one_shot.next_chunk(r2)
    assert c2 is not None and (c2.token_offset, c2.token_end, c2.finalize) == (0, 300, True)


@pytest.mark.parametrize("n_tokens, p", [(1, 0), (27, 0), (28, 0), (53, 71), (1000, 3), (250, 25)])
def test_coverage_is_exact_for_any_length(n_tokens: int, p: int) -> None:
    s = sched()
    r = Request("a", text_ids=[1], fixed_tokens=n_tokens, flow_prompt_len=p)
    s.add_request(r)
    chunks = chunks_of(run_until_idle(s), "a")
    assert chunks[-1].is_last and chunks[-1].token_end == n_tokens and sum(c.is_last for c in chunks) == 1
    for prev, nxt in itertools.pairwise(chunks):
        assert nxt.token_offset == prev.token_end - 3  # contiguous: audio of [offset, end-3)
    assert r.samples_emitted == 960 * n_tokens


def test_non_stream_gets_one_final_chunk_after_llm() -> None:
    s = sched()
    r = Request("a", text_ids=[1], fixed_tokens=120, flow_prompt_len=71, stream=False)
    s.add_request(r)
    plans = run_until_idle(s)
    (c,) = chunks_of(plans, "a")
    assert (c.token_offset, c.token_end, c.finalize, c.streaming, c.is_first, c.is_last) == (0, 120, True, False, True, True)
    assert r.samples_emitted == 960 * 120


def test_chunk_order_by_margin_then_arrival() -> None:
    policy = ChunkPolicy(ChunkPolicyConfig(max_chunks_per_step=3))
    now = 10.0
    ahead = Request("ahead", text_ids=[1], arrival_s=0.0, first_chunk_s=8.0, samples_emitted=24000 * 5)  # +3 s
    behind = Request("behind", text_ids=[1], arrival_s=0.0, first_chunk_s=8.0, samples_emitted=24000 * 2)  # 0 s
    new_late = Request("new_late", text_ids=[1], arrival_s=5.0)
    new_early = Request("new_early", text_ids=[1], arrival_s=1.0)
    assert policy.margin_s(behind, now) == pytest.approx(0.0) and policy.margin_s(new_late, now) == -math.inf
    reqs = [ahead, behind, new_late, new_early]
    ready = [(r, ChunkItem(r.request_id, (), 0, 0, False, True, False, False)) for r in reqs]
    assert [c.request_id for c in policy.pick(ready, now)] == ["new_early", "new_late", "behind"]


def test_urgent_chunks_go_alone() -> None:
    now = 10.0
    ahead = Request("ahead", text_ids=[1], arrival_s=0.0, first_chunk_s=8.0, samples_emitted=24000 * 5)  # +3 s
    calm = Request("calm", text_ids=[1], arrival_s=0.0, first_chunk_s=8.0, samples_emitted=24000 * 4)  # +2 s
    low = Request("low", text_ids=[1], arrival_s=0.0, first_chunk_s=8.0, samples_emitted=int(24000 * 2.5))  # +0.5 s
    new = Request("new", text_ids=[1], arrival_s=9.0)
    item = lambda r: (r, ChunkItem(r.request_id, (), 0, 0, False, True, False, False))
    policy = ChunkPolicy(ChunkPolicyConfig())
    # a first packet (and a stream about to run dry) go without the chunks that can wait a batch
    assert [c.request_id for c in policy.pick([item(r) for r in (ahead, new, calm, low)], now)] == ["new", "low"]
    assert [c.request_id for c in policy.pick([item(r) for r in (ahead, calm)], now)] == ["calm", "ahead"]
    off = ChunkPolicy(ChunkPolicyConfig(urgent_margin_s=0))
    assert [c.request_id for c in off.pick([item(r) for r in (ahead, new, calm)], now)] == ["new", "calm", "ahead"]


def test_scheduler_caps_chunks_per_step_and_serves_urgent_first() -> None:
    clock = FakeClock()
    s = sched(clock, max_chunks_per_step=1)
    a = Request("a", text_ids=[1], fixed_tokens=200, arrival_s=0.0)
    b = Request("b", text_ids=[1], fixed_tokens=200, arrival_s=1.0)
    s.add_request(a)
    s.add_request(b)
    order = []
    while s.has_work():
        clock.now += 0.02  # one decode step = 20 ms: both streams outrun real time
        plan, _ = step(s)
        assert len(plan.chunks) <= 1
        order += [c.request_id for c in plan.chunks]
    # both get their first chunk before either gets a second (no audio yet = most urgent)
    assert order[:2] == ["a", "b"]
    assert a.samples_emitted == b.samples_emitted == 960 * 200


def _run_with_chunk_lag(lag: int, chunks_ahead: int = 2, tell_in_flight: bool = False
                        ) -> tuple[list[tuple[int, int, bool]], Request, int, int]:
    """Drive the scheduler like the overlapped engine: a chunk batch's result comes back `lag` steps
    after it was planned, LLM-only steps (schedule(with_chunks=False)) running meanwhile."""
    s = sched()
    r = Request("a", text_ids=[1], fixed_tokens=300, flow_prompt_len=71)
    s.add_request(r)
    in_flight: list | None = None  # [chunk-only plan, steps until its result]
    planned: list[tuple[int, int, bool]] = []
    decodes_while_in_flight = runahead = 0
    while s.has_work():
        out = {c.request_id for c in in_flight[0].chunks} if in_flight is not None and tell_in_flight else ()
        plan = s.schedule(with_chunks=in_flight is None, chunks_ahead=chunks_ahead, in_flight=out)
        if in_flight is not None:
            assert not plan.chunks  # nothing planned twice
            decodes_while_in_flight += len(plan.decodes)
            runahead = max(runahead, len(r.speech_ids) - r.token_offset)
        llm = StepPlan(plan.step, plan.prefills, plan.decodes)
        s.update(llm, answer(llm))
        if plan.chunks:
            in_flight = [StepPlan(plan.step, chunks=plan.chunks), lag]
            planned += [(c.token_offset, c.token_end, c.finalize) for c in plan.chunks]
        if in_flight is not None:
            if in_flight[1] == 0:
                s.update(in_flight[0], answer(in_flight[0]))
                in_flight = None
            else:
                in_flight[1] -= 1
    return planned, r, decodes_while_in_flight, runahead


@pytest.mark.parametrize("lag", [7, 400])
def test_chunk_results_arriving_steps_later_keep_the_same_chunks(lag: int) -> None:
    serial, _, _, _ = _run_with_chunk_lag(0)
    lagged, r, decodes, runahead = _run_with_chunk_lag(lag)
    assert lagged == serial  # chunk boundaries depend on the hop schedule, not on timing
    assert decodes > 0  # the LLM went on while chunks were out
    assert r.token_offset == 300 and r.samples_emitted == 960 * 300
    assert r.status is RequestStatus.FINISHED_STOPPED
    # ... but paused two chunks ahead of its audio: the in-flight chunk (hop 29, 50, 100) + the next + look-ahead
    assert runahead <= 100 + 100 + 3


def test_pacing_one_chunk_ahead() -> None:
    """What the engine asks while a first packet is in flight: hold back to the in-flight chunk's tokens."""
    serial, _, _, _ = _run_with_chunk_lag(0)
    lagged, r, _, runahead = _run_with_chunk_lag(400, chunks_ahead=1)
    assert lagged == serial and r.token_offset == 300
    assert runahead <= 100 + 3 + 1  # + the token of the step that planned the chunk (decoded unpaced)
    # a request whose own chunk is out may still get its next chunk's tokens (no gap when it is back)
    _, _, _, own = _run_with_chunk_lag(400, chunks_ahead=1, tell_in_flight=True)
    assert own > 100 + 3 + 1 and own <= 100 + 100 + 3 + 1


def test_a_later_sentence_piece_shares_its_jobs_playback() -> None:
    """A job's second piece is a new request, but its listener already has the first piece's audio: its
    first chunk is urgent only when that audio runs low (else long texts starve the other streams)."""
    now = 10.0
    first = Request("job#0", text_ids=[1], arrival_s=0.0, first_chunk_s=8.0, samples_emitted=24000 * 5)  # +3 s
    second = Request("job#1", text_ids=[1], arrival_s=9.0, playback=first.playback)
    other = Request("other", text_ids=[1], arrival_s=0.0, first_chunk_s=8.0, samples_emitted=int(24000 * 2.5))
    policy = ChunkPolicy(ChunkPolicyConfig())
    assert policy.margin_s(second, now) == pytest.approx(3.0)
    item = lambda r: (r, ChunkItem(r.request_id, (), 0, 0, False, True, False, False))
    assert [c.request_id for c in policy.pick([item(second), item(other)], now)] == ["other"]
    assert policy.margin_s(second, now + 2.5) == pytest.approx(0.5)  # the job's audio is running out
    assert [c.request_id for c in policy.pick([item(second), item(other)], now + 2.5)] == ["other", "job#1"]


def test_the_scheduler_counts_a_pieces_audio_on_the_shared_playback() -> None:
    clock = FakeClock(5.0)
    s = sched(clock)
    first = Request("job#0", text_ids=[1, 2, 3], fixed_tokens=30, arrival_s=5.0)
    s.add_request(first)
    run_until_idle(s)
    assert first.playback.start_s == 5.0 and first.playback.samples == first.samples_emitted > 0
    second = Request("job#1", text_ids=[4, 5], fixed_tokens=30, arrival_s=5.0, playback=first.playback)
    s.add_request(second)
    run_until_idle(s)
    assert first.playback.samples == first.samples_emitted + second.samples_emitted
    assert second.first_chunk_s == 5.0 and second.playback.start_s == 5.0


def test_a_later_sentence_piece_waits_for_its_jobs_first_audio() -> None:
    """Its chunk cannot be heard before the job's first piece has played: last in line, never urgent."""
    s = sched()
    first = Request("j#0", text_ids=[1], fixed_tokens=30)
    later = Request("j#1", text_ids=[1], fixed_tokens=30, playback=first.playback, follows=True)
    other = Request("o", text_ids=[1], fixed_tokens=30)
    assert s.chunks.margin_s(later, 0.0) == float("inf") and s.chunks.margin_s(other, 0.0) == float("-inf")
    first.playback.start_s = 0.0  # the job's audio has started: the later piece is timed on it
    assert s.chunks.margin_s(later, 0.5) == -0.5
