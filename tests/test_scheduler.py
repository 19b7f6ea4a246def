"""Scheduler core: admission, stop rules, slots, cancellation, failures, stats (fake runner)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from scheduler.config import SchedulerConfig
from scheduler.plan import SOS, TASK, Segment, StepResult
from scheduler.request import Request, RequestStatus
from scheduler.scheduler import RequestRejected, Scheduler
from scheduler.testing import FakeClock, answer, run_until_idle, step


def make(num_slots: int = 4, slot_len: int = 512, **kw: object) -> Scheduler:
    return Scheduler(SchedulerConfig(num_slots=num_slots, slot_len=slot_len, max_running=num_slots, **kw), FakeClock())


def req(rid: str, n_text: int = 5, **kw: object) -> Request:
    return Request(request_id=rid, text_ids=list(range(1, n_text + 1)), **kw)


def test_status_order_makes_finished_one_comparison() -> None:
    assert RequestStatus.WAITING < RequestStatus.RUNNING < RequestStatus.DRAINING < RequestStatus.FINISHED_STOPPED
    assert all(s.is_finished for s in RequestStatus if s >= RequestStatus.FINISHED_STOPPED)
    assert not RequestStatus.DRAINING.is_finished


def test_prefill_segments_positions_and_first_decode() -> None:
    s = make()
    r = Request("a", text_ids=[7, 8], prompt_text_ids=(5, 6), prompt_speech_ids=(11, 12, 13), flow_prompt_len=3)
    s.add_request(r)
    plan, _ = step(s, token=42)
    (p,) = plan.prefills
    assert p.segments == (SOS, Segment("text", (5, 6, 7, 8)), TASK, Segment("speech", (11, 12, 13)))
    assert (p.slot, p.start_pos, p.num_tokens) == (0, 0, 9) and p.sample.ignore_eos and p.sample.step == 0
    assert r.speech_ids == [42] and r.num_computed == 9
    plan, _ = step(s, token=43)
    (d,) = plan.decodes
    assert (d.position, d.token_id, d.sample.recent_ids, d.sample.step) == (9, 42, (42,), 1)
    assert not plan.prefills


def test_cross_lingual_prefill_has_no_empty_segments() -> None:
    s = make()
    s.add_request(req("a", n_text=2))
    plan = s.schedule()
    assert plan.prefills[0].segments == (SOS, Segment("text", (1, 2)), TASK)


def test_admission_queues_fifo_at_slot_limit_and_reuses_freed_slot() -> None:
    s = make(num_slots=2)
    for rid in "abc":
        s.add_request(req(rid, fixed_tokens=3, stream=False))
    plan, _ = step(s)
    assert [p.request_id for p in plan.prefills] == ["a", "b"] and s.num_waiting == 1
    assert s.stats().last_step.running == 2 and s.stats().last_step.waiting == 1
    step(s)
    step(s)  # a and b generated 3 tokens: LLM done, slots freed at once
    assert s.kv.num_free == 2 and s.get("a").status is RequestStatus.DRAINING
    plan, _ = step(s)
    assert [p.request_id for p in plan.prefills] == ["c"] and plan.prefills[0].slot == 0


def test_max_running_limit_below_slot_count() -> None:
    s = Scheduler(SchedulerConfig(num_slots=4, slot_len=512, max_running=1), FakeClock())
    s.add_request(req("a"))
    s.add_request(req("b"))
    plan = s.schedule()
    assert len(plan.prefills) == 1 and s.num_waiting == 1


def test_waiting_queue_bound_rejects_with_overloaded() -> None:
    s = make(num_slots=1, max_waiting=1)
    s.add_request(req("a"))
    assert not s.can_admit()
    with pytest.raises(RequestRejected) as err:
        s.add_request(req("b"))
    assert err.value.code == "Overloaded" and s.stats().totals.rejected == 1


def test_prefill_token_budget_keeps_fifo() -> None:
    s = make(max_prefill_tokens_per_step=20)
    s.add_request(req("long", n_text=15))  # 17 positions
    s.add_request(req("long2", n_text=15))
    s.add_request(req("short", n_text=1))
    plan = s.schedule()
    assert [p.request_id for p in plan.prefills] == ["long"]  # short does not overtake long2


def test_max_len_clipped_to_slot_and_min_len_follows() -> None:
    s = make(slot_len=64)
    r = req("a", n_text=10, prompt_text_ids=(1, 2))
    assert (r.min_len, r.max_len) == (20, 200)
    s.add_request(r)
    assert r.max_len == 64 - r.prompt_len == 50 and r.min_len == 20
    r2 = req("b", n_text=40)
    s.add_request(r2)
    assert r2.max_len == 22 and r2.min_len == 22
    run_until_idle(s)
    assert len(r.speech_ids) == 50 and r.num_computed <= 64


def test_prompt_longer_than_slot_rejected() -> None:
    s = make(slot_len=16)
    with pytest.raises(RequestRejected) as err:
        s.add_request(req("a", n_text=20))
    assert err.value.code == "InvalidParameter"


def test_min_len_masks_eos_then_eos_stops_and_is_not_kept() -> None:
    s = make()
    r = req("a", n_text=2, stream=False)  # min_len 4
    s.add_request(r)
    flags = []
    tokens = iter([10, 11, 12, 13, 6561])
    while not r.llm_done:
        plan = s.schedule()
        item = (*plan.prefills, *plan.decodes)[0]
        flags.append(item.sample.ignore_eos)
        s.update(plan, answer(plan, next(tokens)))
    assert flags == [True, True, True, True, False]
    assert r.speech_ids == [10, 11, 12, 13] and r.status is RequestStatus.DRAINING


@pytest.mark.parametrize("stop", [6562, 6563])
def test_other_stop_ids_stop_even_during_min_len(stop: int) -> None:
    s = make()
    r = req("a", n_text=5)
    s.add_request(r)
    step(s, 10)
    step(s, stop)
    assert r.llm_done and r.speech_ids == [10] and 6562 not in r.sampled_ids


def test_max_len_stops_generation() -> None:
    s = make()
    r = req("a", n_text=1, stream=False)  # max_len 20
    s.add_request(r)
    run_until_idle(s)
    assert len(r.speech_ids) == 20 and r.status is RequestStatus.FINISHED_STOPPED


def test_fixed_tokens_ignore_all_stops_and_stop_exactly() -> None:
    s = make()
    r = req("a", n_text=1, fixed_tokens=30, stream=False)
    s.add_request(r)
    plans = run_until_idle(s)
    items = [i for p in plans for i in (*p.prefills, *p.decodes)]
    assert len(items) == 30 and all(i.sample.ignore_all_stops and i.sample.ignore_eos for i in items)
    assert len(r.speech_ids) == 30


def test_slot_freed_on_finish_and_released_once() -> None:
    s = make(num_slots=1)
    r = req("a", fixed_tokens=4, stream=False)
    s.add_request(r)
    ended = []
    for _ in range(4):
        ended += step(s)[1]
    assert s.kv.num_free == 1 and r.slot is None and s.kv.used_tokens == 0
    _plan, done = step(s)  # the one final chunk
    assert done == ["a"] and r.status is RequestStatus.FINISHED_STOPPED
    assert s.schedule().released == ("a",) and s.schedule().released == ()
    assert not s.has_work()


def test_cancel_running_and_waiting() -> None:
    s = make(num_slots=1)
    a, b = req("a"), req("b")
    s.add_request(a)
    s.add_request(b)
    step(s)
    assert s.cancel("a") and s.cancel("b") and not s.cancel("a")
    assert s.kv.num_free == 1 and a.status is RequestStatus.FINISHED_CANCELLED and s.num_waiting == 0
    plan = s.schedule()
    assert plan.is_empty and set(plan.released) == {"a", "b"}
    assert s.stats().totals.cancelled == 2


def test_cancel_drops_results_of_inflight_plan() -> None:
    s = make()
    s.add_request(req("a"))
    plan = s.schedule()
    s.cancel("a")
    s.update(plan, answer(plan))
    assert s.get("a").speech_ids == []


def test_failure_of_one_request_does_not_affect_others() -> None:
    s = make()
    a, b, c = req("a", stream=False), req("b", stream=False), req("c", stream=False)
    for r in (a, b, c):
        s.add_request(r)
    plan = s.schedule()
    result = answer(plan, 5)
    sampled = dict(result.sampled)
    del sampled["c"]  # runner lost c's token
    ended = s.update(plan, StepResult(sampled=sampled, failed={"a": "CUDA error"}))
    assert set(ended) == {"a", "c"}
    assert a.status is RequestStatus.FINISHED_FAILED and a.fail_reason == "CUDA error"
    assert c.status is RequestStatus.FINISHED_FAILED and s.kv.num_free == 3
    plans = run_until_idle(s)
    assert b.status is RequestStatus.FINISHED_STOPPED and len(b.speech_ids) == b.max_len
    assert all(i.request_id == "b" for p in plans for i in (*p.decodes, *p.chunks))


def test_invalid_token_fails_request() -> None:
    s = make()
    r = req("a")
    s.add_request(r)
    step(s, 99999)
    assert r.status is RequestStatus.FINISHED_FAILED


def test_immediate_stop_finishes_without_audio() -> None:
    s = make()
    r = req("a", min_len=0)
    s.add_request(r)
    _, ended = step(s, 6561)
    assert ended == ["a"] and r.status is RequestStatus.FINISHED_STOPPED and r.samples_emitted == 0


def test_stats_counters_and_kv_use() -> None:
    s = make(num_slots=2, slot_len=100)
    s.add_request(req("a", n_text=3, fixed_tokens=5, stream=False))
    s.add_request(req("b", n_text=3, fixed_tokens=5, stream=False))
    step(s)
    st = s.stats()
    assert st.last_step.prefills == 2 and st.last_step.prefill_tokens == 10 and st.last_step.kv_total_tokens == 200
    s.schedule()
    assert s.stats().last_step.kv_used_tokens == 10 and s.stats().last_step.decode_batch == 2
    s2 = make()
    s2.add_request(req("x", fixed_tokens=7, stream=False))
    run_until_idle(s2)
    t = s2.stats().totals
    assert (t.admitted, t.decode_tokens, t.chunks, t.finished, t.samples_emitted) == (1, 6, 1, 1, 7 * 960)


def test_seed_and_step_passed_for_per_request_rng() -> None:
    s = make()
    s.add_request(req("a", seed=1234))
    step(s)
    plan = s.schedule()
    assert plan.decodes[0].sample.seed == 1234 and plan.decodes[0].sample.step == 1


def test_recent_window_is_last_ten() -> None:
    s = make()
    r = req("a", n_text=10)
    s.add_request(r)
    counter = iter(range(1000, 2000))
    for _ in range(12):
        step(s, lambda _item: next(counter))
    plan = s.schedule()
    assert plan.decodes[0].sample.recent_ids == tuple(range(1002, 1012))


def test_scheduler_never_imports_torch() -> None:
    code = ("import sys, scheduler.scheduler, scheduler.bistream, scheduler.flow_budget; "
            "assert not any(m == 'torch' or m.startswith('kernels') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
