"""Bistream (§5.5): the feeder state machine and its scheduling, against hand-computed sequences."""
from __future__ import annotations

import pytest

from scheduler.bistream import BistreamFeeder, Feed, FeederState, Outcome, runaway_cap
from scheduler.config import SchedulerConfig
from scheduler.plan import SOS, TASK, Segment, StepResult
from scheduler.request import Request, RequestStatus
from scheduler.scheduler import Scheduler
from scheduler.testing import FakeClock, answer

FILL, EOS = 6563, 6561


def feed(segments: tuple[Segment, ...], ignore_eos: bool, forced_token: int | None) -> Feed:
    """The Feed expected at a stage: its redraw ids (special ids drawn again) follow from the stage."""
    redraw = (EOS, EOS + 1) if ignore_eos else (EOS + 1, FILL)  # text phase: a fill asks for text
    return Feed(segments, ignore_eos, forced_token, redraw)
PROMPT_TEXT = (100, 101, 102, 103)
PROMPT_SPEECH = tuple(range(1000, 1020))  # P = 20: groups of 15 + 5, next_fill = 30 - 20 = 10


def T(*ids: int) -> Segment:
    return Segment("text", ids)


def S(*ids: int) -> Segment:
    return Segment("speech", ids)


def test_feeder_zero_shot_sequence() -> None:
    f = BistreamFeeder(PROMPT_TEXT, PROMPT_SPEECH)
    assert f.pending_feed() is None
    f.push_text([200])  # cache = 4 prompt + 1 = 5: group 1 = T(5) + S(15); 5 prompt speech left
    assert f.pending_feed() is None
    f.push_text([201, 202, 203])
    assert f.pending_feed() is None
    f.push_text([204, 205, 206])  # 205 completes group 2 (last 5 prompt speech); 206 stays pending
    first = feed((SOS, T(100, 101, 102, 103, 200), S(*range(1000, 1015)), T(201, 202, 203, 204, 205),
                  S(*range(1015, 1020))), ignore_eos=True, forced_token=None)
    assert f.pending_feed() == first and f.pending_feed() == first  # idempotent
    for tok in range(7, 17):  # 10 speech tokens: out indices 0..9
        assert f.on_sampled(tok) is Outcome.SPEECH
        forced = FILL if tok == 16 else None  # index 10 == next_fill
        assert f.pending_feed() == feed((S(tok),), True, forced)
    assert f.on_sampled(FILL) is Outcome.FILL
    assert f.pending_feed() is None  # 206 pulled: 1 < 5
    f.push_text([207, 208, 209])
    assert f.pending_feed() is None
    f.push_text([210])
    assert f.pending_feed() == feed((T(206, 207, 208, 209, 210),), True, None)  # replaces lm_input
    assert f.on_sampled(FILL) is Outcome.FILL  # a sampled fill also breaks (next_fill = 11 + 16)
    f.finish_text()
    # quirk: the consumed lm_input (the 5 text tokens) is fed again before task_id
    assert f.pending_feed() == feed((T(206, 207, 208, 209, 210), TASK), False, None)
    assert f.on_sampled(20) is Outcome.SPEECH
    assert f.pending_feed() == feed((S(20),), False, None)
    assert f.on_sampled(EOS) is Outcome.END and f.state is FeederState.DONE


def test_feeder_cross_lingual_forces_a_fill_after_every_15_speech_tokens() -> None:
    f = BistreamFeeder((), ())  # P = 0: next_fill = 15
    f.push_text([1, 2, 3, 4])
    assert f.pending_feed() is None
    f.push_text([5, 6])  # 6 stays pending until the first fill
    assert f.pending_feed() == feed((SOS, T(1, 2, 3, 4, 5)), True, None)
    forced_at, tok = [], 500
    for group in range(3):
        while (got := f.pending_feed()) is not None and got.forced_token is None:
            tok += 1
            assert f.on_sampled(tok) is Outcome.SPEECH
        assert got is not None
        forced_at.append(f.out_len)
        assert f.on_sampled(got.forced_token) is Outcome.FILL
        base = 7 + 5 * group
        f.push_text(list(range(base, base + 5)))
        expected_text = (6, 7, 8, 9, 10) if group == 0 else tuple(range(base - 1, base + 4))
        assert f.pending_feed() == feed((T(*expected_text),), True, None)
    assert forced_at == [15, 31, 47]  # 15 speech tokens between fills; fills count in out indices
    assert f.out_len == 48 and tok == 545


def test_feeder_final_refeeds_last_speech_with_remaining_text() -> None:
    f = BistreamFeeder((), ())
    f.push_text([1, 2, 3, 4, 5])
    for tok in range(100, 115):
        assert f.pending_feed() is not None  # the scheduler always plans before it reports
        f.on_sampled(tok)
    assert f.pending_feed() == feed((S(114),), True, FILL)
    f.on_sampled(FILL)
    f.push_text([6, 7])
    f.finish_text()
    assert f.pending_feed() == feed((S(114), T(6, 7), TASK), False, None)


def test_feeder_text_ends_during_interleave_drops_prompt_speech() -> None:
    f = BistreamFeeder((), PROMPT_SPEECH)
    f.push_text([1, 2, 3, 4, 5])
    assert f.pending_feed() is None  # 5 prompt speech tokens left, no more text
    f.finish_text()
    assert f.pending_feed() == feed((SOS, T(1, 2, 3, 4, 5), S(*range(1000, 1015)), TASK), False, None)
    assert f.dropped_prompt_speech == 5


def test_feeder_no_text_at_all() -> None:
    f = BistreamFeeder(PROMPT_TEXT[:2], ())
    f.finish_text()
    assert f.pending_feed() == feed((SOS, T(100, 101), TASK), False, None)


@pytest.mark.parametrize("stage, token", [("decode", EOS), ("decode", 6562), ("final", FILL), ("final", 6562)])
def test_feeder_unexpected_special_ids_are_errors(stage: str, token: int) -> None:
    f = BistreamFeeder((), ())
    f.push_text([1, 2, 3, 4, 5])
    if stage == "final":
        f.finish_text()
        assert f.pending_feed() is not None
        f.on_sampled(FILL)  # decode stage ends on a fill, then the final stage starts
        assert f.pending_feed() is not None and not f.pending_feed().ignore_eos
    assert f.pending_feed() is not None
    assert f.on_sampled(token) is Outcome.ERROR


def test_push_after_finish_is_an_error() -> None:
    r = Request("a", text_ids=[], bistream=True)
    r.finish_text()
    with pytest.raises(ValueError):
        r.push_text([1])
    with pytest.raises(ValueError):
        Request("u", text_ids=[1]).push_text([2])


# ---------------------------------------------------------------- through the scheduler


def make() -> Scheduler:
    return Scheduler(SchedulerConfig(num_slots=2, slot_len=512, max_running=2), FakeClock())


def log_step(s: Scheduler, log: list, token: int | None = None) -> None:
    """One step; non-forced items get `token` (or the next counter value); logs every LLM item."""
    plan = s.schedule()
    for p in plan.prefills:
        log.append(("prefill", p.start_pos, p.segments, p.sample.forced_token, p.sample.ignore_eos))
    for d in plan.decodes:
        log.append(("decode", d.position, d.token_id, d.sample.forced_token, d.sample.ignore_eos))
    s.update(plan, answer(plan, token if token is not None else 0))


def test_scheduler_bistream_with_text_arriving_while_decoding() -> None:
    s = make()
    r = Request("b", text_ids=[], prompt_text_ids=PROMPT_TEXT, prompt_speech_ids=PROMPT_SPEECH,
                flow_prompt_len=20, bistream=True)
    s.add_request(r)
    log: list = []
    log_step(s, log)
    r.push_text([200, 201, 202, 203])
    log_step(s, log)
    assert log == [] and r.status is RequestStatus.WAITING  # not admitted while it has nothing to feed
    r.push_text([204, 205])
    log_step(s, log, 7)  # admitted: prefill, samples 7
    for tok in range(8, 17):
        if tok == 10:
            r.push_text([206, 207])  # arrives while decoding: waits for the fill
        log_step(s, log, tok)
    log_step(s, log)  # forced fill
    log_step(s, log)  # waiting for text: nothing for b
    r.push_text([208, 209, 210])
    log_step(s, log, 17)  # extend with 5 text tokens
    r.finish_text()  # decoding continues until the next fill (index 26), then the final stage
    for tok in range(18, 32):
        log_step(s, log, tok)
    log_step(s, log)  # forced fill at index 26
    log_step(s, log, 40)  # final stage: re-fed last speech + task_id
    log_step(s, log, EOS)

    prompt = (SOS, T(100, 101, 102, 103, 200), S(*range(1000, 1015)), T(201, 202, 203, 204, 205),
              S(*range(1015, 1020)))
    expected: list = [("prefill", 0, prompt, None, True)]
    expected += [("decode", 31 + i, 7 + i, None, True) for i in range(9)]  # feeds 7..15 at 31..39
    expected += [("decode", 40, 16, FILL, True)]  # out index 10 == next_fill: forced, KV still written
    expected += [("prefill", 41, (T(206, 207, 208, 209, 210),), None, True)]  # fill not fed back
    expected += [("decode", 46 + i, 17 + i, None, True) for i in range(14)]  # feeds 17..30
    expected += [("decode", 60, 31, FILL, True)]  # index 26 = 10 + 16
    expected += [("prefill", 61, (S(31), TASK), None, False)]  # quirk: speech 31 fed a second time
    expected += [("decode", 63, 40, None, False)]
    assert log == expected
    assert r.speech_ids == list(range(7, 32)) + [40]
    assert r.sampled_ids.count(FILL) == 2 and r.sampled_ids[10] == FILL and r.sampled_ids[26] == FILL
    assert r.status is RequestStatus.DRAINING and r.slot is None and s.kv.num_free == 2


def test_scheduler_bistream_items_name_the_ids_the_runner_draws_again() -> None:
    """The special ids a stage has no rule for (upstream raises on them) reach the runner's sampling as
    redraw ids: eos and 6562 while text is read (a fill asks for more), 6562 and fill once it has ended;
    a unistream request has none (every special id stops it)."""
    s = make()
    r = Request("b", text_ids=[1, 2, 3, 4, 5], bistream=True)
    u = Request("u", text_ids=[1, 2, 3], min_len=0, max_len=50)
    s.add_request(r)
    s.add_request(u)

    def specs() -> dict[str, tuple[int, ...]]:
        plan = s.schedule()
        items = {i.request_id: i.sample.redraw_ids for i in (*plan.prefills, *plan.decodes)}
        s.update(plan, answer(plan, 100))
        return items

    assert specs() == {"b": (EOS, EOS + 1), "u": ()}
    r.finish_text()
    for _ in range(20):  # to the next fill, then the final stage
        specs()
        if r.feeder is not None and r.feeder.state is FeederState.FINAL:
            break
    assert specs()["b"] == (EOS + 1, FILL)


def test_scheduler_bistream_recent_window_includes_fills() -> None:
    s = make()
    r = Request("b", text_ids=[1, 2, 3, 4, 5], bistream=True)
    s.add_request(r)
    for tok in range(100, 115):
        log_step(s, [], tok)
    log_step(s, [])  # forced fill
    r.push_text([6, 7, 8, 9, 10])
    plan = s.schedule()
    assert plan.prefills[0].sample.recent_ids == tuple(range(106, 115)) + (FILL,)
    assert plan.prefills[0].sample.step == 16


def test_scheduler_bistream_runaway_cap_after_finish_text() -> None:
    s = make()
    r = Request("b", text_ids=[1, 2], bistream=True)
    r.finish_text()
    s.add_request(r)
    for _ in range(200):
        if r.llm_done:
            break
        log_step(s, [], 123)
    assert len(r.speech_ids) == runaway_cap(2) == 90 and r.llm_done


def test_scheduler_bistream_error_token_fails_only_that_request() -> None:
    s = make()
    a = Request("a", text_ids=[1, 2, 3, 4, 5], bistream=True)
    b = Request("b", text_ids=[1, 2], stream=False)
    s.add_request(a)
    s.add_request(b)
    plan = s.schedule()
    ended = s.update(plan, StepResult(sampled={"a": 6562, "b": 9}))
    assert ended == ["a"] and a.status is RequestStatus.FINISHED_FAILED and "6562" in (a.fail_reason or "")
    assert b.status is RequestStatus.RUNNING


def test_scheduler_bistream_waiting_for_text_is_skipped_not_blocking() -> None:
    s = make()
    a = Request("a", text_ids=[1, 2, 3, 4, 5], bistream=True)
    s.add_request(a)
    for tok in range(100, 116):
        log_step(s, [], tok)  # 15 speech + forced fill: a now waits for text, holding its slot
    u = Request("u", text_ids=[1, 2, 3])
    s.add_request(u)
    plan = s.schedule()
    assert [p.request_id for p in plan.prefills] == ["u"] and not plan.decodes
    assert s.stats().last_step.running == 2
