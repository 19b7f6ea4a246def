"""The engine loop and its jobs with a fake runner, a fake clock and a hand-stepped stage: no model, no sleeps."""
from __future__ import annotations

import numpy as np
import pytest

from protocol.errors import ErrorCode
from scheduler.commands import Cancel, FinishText, PushTokens, Stop
from scheduler.config import SchedulerConfig
from scheduler.engine_loop import EngineLoop
from scheduler.jobs import (
    AudioChunk,
    EngineEvent,
    Failed,
    Finished,
    Mode,
    PreparedJob,
    SpeechJob,
    VoicePrompt,
)
from scheduler.scheduler import Scheduler
from scheduler.testing import SAMPLES_PER_TOKEN, FakeClock, FakeRunner, ManualExecutor

VOICE = VoicePrompt(speech_tokens=np.zeros(0, np.int32), embedding=np.zeros(192, np.float32),
                    mel=np.zeros((0, 80), np.float32), text="")


def piece_number(request_id: str) -> float:
    return float(request_id.split("#")[1]) + 1  # audio of piece i is filled with i + 1


class Sink:
    def __init__(self) -> None:
        self.events: list[EngineEvent] = []

    def __call__(self, event: EngineEvent) -> None:
        self.events.append(event)

    @property
    def ended(self) -> bool:
        return bool(self.events) and not isinstance(self.events[-1], AudioChunk)

    @property
    def audio(self) -> np.ndarray:
        return np.concatenate([e.pcm for e in self.events if isinstance(e, AudioChunk)] or [np.zeros(0)])


class Harness:
    def __init__(self, overlap: bool = False, max_jobs: int = 0, max_waiting: int = 256, num_slots: int = 4,
                 first_alone_batch: int = 0, lone_first_alone: bool = False) -> None:
        self.clock = FakeClock()
        self.scheduler = Scheduler(SchedulerConfig(num_slots=num_slots, slot_len=1024, max_waiting=max_waiting),
                                   self.clock)
        self.runner = FakeRunner(fill=piece_number)
        self.stage = ManualExecutor() if overlap else None
        self.loop = EngineLoop(self.scheduler, self.runner, stage=self.stage, clock=self.clock, max_jobs=max_jobs,
                               idle_wait_s=0.0, first_alone_batch=first_alone_batch,
                               lone_first_alone=lone_first_alone)

    def submit(self, rid: str, pieces: tuple[tuple[int, ...], ...] = ((1, 2, 3),), tokens: int = 30,
               duplex: bool = False, refusal: str | None = None) -> Sink:
        sink = Sink()
        job = SpeechJob(rid, Mode.ZERO_SHOT, VOICE, None if duplex else "text", fixed_tokens=tokens)
        self.loop.submit(PreparedJob(job, pieces=() if duplex else pieces, refusal=refusal), sink, lambda t: [7])
        return sink

    def run(self, until, max_passes: int = 5000, stage_every: int = 3) -> int:
        for n in range(max_passes):
            if until():
                return n
            assert self.loop.run_pass()
            self.clock.now += 0.01
            if self.stage is not None and n % stage_every == stage_every - 1:
                self.stage.finish()  # the stage thread is slower than a decode step
        raise AssertionError("condition not reached")


@pytest.mark.parametrize("overlap", [False, True])
def test_a_jobs_sentence_pieces_play_in_order_and_add_up(overlap: bool) -> None:
    h = Harness(overlap=overlap)
    sink = h.submit("j", pieces=((1, 2), (3, 4), (5, 6)), tokens=30)
    h.run(lambda: sink.ended)
    assert isinstance(sink.events[-1], Finished)
    audio = sink.audio
    assert np.all(np.diff(audio) >= 0) and set(np.unique(audio)) == {1.0, 2.0, 3.0}  # piece 1, then 2, then 3
    assert sink.events[-1].total_samples == audio.size == 3 * 30 * SAMPLES_PER_TOKEN
    assert set(h.runner.released) == {"j#0", "j#1", "j#2"} and not h.scheduler.has_work()


def test_the_next_piece_starts_before_the_previous_one_has_all_its_audio() -> None:
    h = Harness()
    sink = h.submit("j", pieces=((1, 2), (3, 4)), tokens=60)
    h.run(lambda: sink.ended)
    plans = h.runner.llm_plans  # serial steps: every plan, chunks included
    second_starts = next(i for i, p in enumerate(plans) if any(x.request_id == "j#1" for x in p.prefills))
    first_ends = next(i for i, p in enumerate(plans) if any(c.request_id == "j#0" and c.is_last for c in p.chunks))
    assert second_starts <= first_ends  # planned with (not after) the previous piece's last chunk


def test_jobs_over_max_jobs_wait_in_order_and_keep_their_duplex_text() -> None:
    h = Harness(max_jobs=1)
    first = h.submit("a", tokens=30)
    second = h.submit("b", duplex=True)
    h.loop.post(PushTokens("b", (4, 5, 6, 7, 8)))  # sent while "b" is backlogged
    h.loop.post(FinishText("b"))
    h.run(lambda: len(h.runner.added) == 1)
    h.run(lambda: first.ended)
    assert h.runner.added == ["a#0"]  # b waited for a
    h.run(lambda: second.ended)
    assert isinstance(second.events[-1], Finished) and second.audio.size > 0
    assert h.scheduler.get("b#0") is None or h.scheduler.get("b#0").text_ids == [4, 5, 6, 7, 8]


def test_refused_and_duplicate_jobs_fail_with_invalid_parameter() -> None:
    h = Harness()
    refused = h.submit("r", refusal="nothing to speak")
    first = h.submit("d", tokens=200)
    twin = h.submit("d")
    h.run(lambda: refused.ended and twin.ended)
    assert [(e.code, e.message) for e in refused.events] == [(ErrorCode.INVALID_PARAMETER, "nothing to speak")]
    assert isinstance(twin.events[-1], Failed) and twin.events[-1].code is ErrorCode.INVALID_PARAMETER
    assert not first.ended


def test_a_full_queue_answers_overloaded() -> None:
    h = Harness(max_waiting=1, num_slots=1)
    running = h.submit("a", tokens=200)
    h.run(lambda: h.scheduler.num_waiting == 0 and h.runner.added)
    queued = h.submit("b")
    over = h.submit("c")
    h.run(lambda: over.ended)
    assert over.events[-1].code is ErrorCode.OVERLOADED
    assert not queued.ended and not running.ended


def test_cancel_stops_events_and_frees_runner_state() -> None:
    h = Harness()
    sink = h.submit("j", pieces=((1, 2), (3, 4)), tokens=100)
    h.run(lambda: len(sink.events) >= 1)
    seen = len(sink.events)
    h.loop.post(Cancel("j"))
    h.run(lambda: not h.scheduler.has_work())
    assert len(sink.events) == seen  # nothing after the cancel, not even Finished
    assert set(h.runner.released) >= set(h.runner.added)


def test_a_cancelled_requests_state_is_kept_until_its_chunk_batch_is_back() -> None:
    h = Harness(overlap=True)
    assert h.stage is not None
    sink = h.submit("j", tokens=200)
    for _ in range(500):
        h.loop.run_pass()
        if h.stage.pending:
            break
    assert h.stage.pending, "no chunk batch went out"
    h.loop.post(Cancel("j"))
    h.loop.run_pass()
    assert "j#0" not in h.runner.released  # the stage thread still uses it
    events = len(sink.events)
    h.stage.finish()
    h.loop.run_pass()
    assert "j#0" in h.runner.released and len(sink.events) == events  # its audio is dropped


@pytest.mark.parametrize("first_alone_batch, decodes_beside", [(0, True), (2, False), (3, True)])
def test_a_first_audio_batch_that_fills_the_workers_runs_without_its_streams_decoding(
        first_alone_batch: int, decodes_beside: bool) -> None:
    """scheduler/engine_loop.py: two streams' first chunks go out together; while that batch runs, their LLM
    pauses only when the batch is as big as `first_alone_batch` (the stage workers), else it goes on."""
    h = Harness(overlap=True, first_alone_batch=first_alone_batch)
    assert h.stage is not None
    sinks = [h.submit(rid, tokens=200) for rid in ("a", "b")]
    for _ in range(500):
        h.loop.run_pass()
        if h.stage.pending:
            break
    assert h.stage.pending, "no chunk batch went out"
    out = h.stage.pending[0][2][0]  # the chunks handed to the stage
    assert sorted(c.request_id for c in out) == ["a#0", "b#0"] and all(c.is_first for c in out)
    plans_before = len(h.runner.llm_plans)
    for _ in range(5):
        h.loop.run_pass()
    decoded = [d.request_id for p in h.runner.llm_plans[plans_before:] for d in p.decodes]
    assert bool(decoded) == decodes_beside
    h.stage.finish()
    h.run(lambda: all(sink.ended for sink in sinks))
    assert all(isinstance(sink.events[-1], Finished) for sink in sinks)
    assert [len(sink.audio) for sink in sinks] == [200 * SAMPLES_PER_TOKEN] * 2


@pytest.mark.parametrize("first_alone_batch, expected", [(2, {"a#0"}), (3, {"a#0", "b#0"})])
def test_only_the_streams_whose_first_audio_is_out_hold_with_it(first_alone_batch: int, expected: set) -> None:
    """A batch of a playing stream's chunk (a) and a new stream's first chunk (b): when it fills the workers,
    b holds (its chunk out is its one chunk ahead) while a keeps two ahead so its audio does not gap."""
    from concurrent.futures import Future

    from scheduler.engine_loop import _InFlight
    from scheduler.plan import StepPlan

    h = Harness(overlap=True, first_alone_batch=first_alone_batch)
    h.submit("a", tokens=200)
    h.submit("b", tokens=200)
    h.loop.run_pass()  # both admitted
    seen: list[dict] = []
    schedule = h.scheduler.schedule

    def spy(**kw):
        seen.append(kw)
        return schedule(**kw)

    h.scheduler.schedule = spy  # type: ignore[method-assign]
    h.loop._in_flight = _InFlight(StepPlan(0), Future(), frozenset({"a#0", "b#0"}), frozenset({"b#0"}))
    h.loop.run_pass()
    assert seen[-1]["chunks_ahead"] == 1 and set(seen[-1]["in_flight"]) == expected


@pytest.mark.parametrize("lone_first_alone", [True, False])
def test_a_lone_streams_first_and_last_chunks_run_alone_on_the_loop_thread(lone_first_alone: bool) -> None:
    """`lone_first_alone`: the lone stream's decode stops at its first chunk's tokens and that chunk runs on
    the loop's thread (not the stage), as does its last one (its LLM is done); the audio is the same."""
    h = Harness(overlap=True, lone_first_alone=lone_first_alone)
    assert h.stage is not None
    sink = h.submit("a", tokens=200)
    h.run(lambda: sink.ended)
    assert isinstance(sink.events[-1], Finished) and len(sink.audio) == 200 * SAMPLES_PER_TOKEN
    alone = [c for batch in h.runner.alone_batches for c in batch]
    if not lone_first_alone:
        assert alone == []
        return
    assert [(c.is_first, c.is_last) for c in alone] == [(True, False), (False, True)]
    staged = [c for batch in h.runner.chunk_batches for c in batch if c not in alone]
    assert staged and all(not c.is_first and not c.is_last for c in staged)
    # sampled before the first chunk ran: exactly its tokens (hop + look-ahead), no decode beside it
    sampled = sum(len(p.decodes) + len(p.prefills) for p in h.runner.llm_plans[: h.runner.alone_after[0]])
    assert sampled == alone[0].token_end == 25 + 3


def test_a_failing_step_fails_its_jobs_and_the_loop_goes_on() -> None:
    h = Harness()
    h.runner.fail_llm = True
    failed = h.submit("a")
    h.run(lambda: failed.ended)
    assert failed.events[-1].code is ErrorCode.INTERNAL_ERROR and "fake LLM failure" in failed.events[-1].message
    later = h.submit("b")
    h.run(lambda: later.ended)
    assert isinstance(later.events[-1], Finished)


def test_a_failing_chunk_batch_fails_its_jobs() -> None:
    h = Harness(overlap=True)
    h.runner.fail_chunks = True
    sink = h.submit("a")
    h.run(lambda: sink.ended)
    assert sink.events[-1].code is ErrorCode.INTERNAL_ERROR


def test_stop_cancels_what_is_left_with_cancelled() -> None:
    h = Harness()
    sink = h.submit("a", tokens=500)
    h.run(lambda: len(sink.events) >= 1)
    h.loop.post(Stop())
    assert not h.loop.run_pass()
    h.loop.post(Stop())
    h.loop.run()
    assert sink.events[-1].code is ErrorCode.CANCELLED and not h.scheduler.has_work()


def test_stats_count_the_inbox_and_the_backlog_as_waiting() -> None:
    h = Harness(max_jobs=1, max_waiting=3)
    for rid in "abc":
        h.submit(rid, tokens=200)
    assert h.loop.stats().waiting == 3 and not h.loop.can_admit()  # all still in the inbox
    h.loop.run_pass()
    h.loop.run_pass()
    stats = h.loop.stats()
    assert (stats.running, stats.waiting) == (1, 2) and h.loop.can_admit()


def test_a_sink_that_raises_cancels_only_its_own_job() -> None:
    h = Harness()
    calls = []

    def bad_sink(event: EngineEvent) -> None:
        calls.append(event)
        raise RuntimeError("client went away")

    h.loop.submit(PreparedJob(SpeechJob("bad", Mode.ZERO_SHOT, VOICE, "t", fixed_tokens=60), pieces=((1,),)),
                  bad_sink, lambda t: [])
    good = h.submit("good", tokens=60)
    h.run(lambda: good.ended)
    assert isinstance(good.events[-1], Finished) and len(calls) == 1
    assert "bad#0" in h.runner.released


def test_a_job_just_taken_still_counts_as_busy_so_stop_waits_for_it() -> None:
    h = Harness()
    h.submit("a")
    h.loop.run_pass()  # taken from the inbox after this pass's snapshot was published
    assert h.runner.added == ["a#0"] and h.loop.busy() and h.loop.stats().waiting + h.loop.stats().running == 1


def test_stop_gives_backlogged_and_late_jobs_their_final_event() -> None:
    h = Harness(max_jobs=1)
    running = h.submit("a", tokens=500)
    backlogged = h.submit("b")
    h.run(lambda: bool(running.events))
    h.loop.post(Stop())
    late = h.submit("c")  # behind the Stop in the inbox
    h.loop.run()
    for sink in (running, backlogged, late):
        assert sink.events[-1].code is ErrorCode.CANCELLED
    assert h.loop.pending_submits() == 0


def test_a_piece_that_ends_without_speech_does_not_stall_its_job() -> None:
    h = Harness()
    h.runner.token = lambda item: 6562 if item.request_id == "j#1" else 100  # piece 1 stops at once
    sink = h.submit("j", pieces=((1, 2), (3, 4), (5, 6)), tokens=30)
    h.run(lambda: sink.ended)
    assert isinstance(sink.events[-1], Finished) and set(np.unique(sink.audio)) == {1.0, 3.0}


def test_text_after_finish_text_is_ignored_and_the_loop_goes_on() -> None:
    h = Harness()
    sink = h.submit("d", duplex=True)
    h.loop.post(PushTokens("d", (4, 5, 6, 7, 8)))
    h.loop.post(FinishText("d"))
    h.loop.post(PushTokens("d", (9,)))
    h.run(lambda: sink.ended)
    assert isinstance(sink.events[-1], Finished)


def test_a_job_of_many_short_sentences_runs_one_piece_ahead_at_most() -> None:
    """While a slow chunk batch is out, short pieces finish their LLM quickly: without the bound, every
    piece would be admitted in turn and their first chunks would crowd the next batch."""
    h = Harness(overlap=True, num_slots=12)
    streams = [h.submit(f"s{i}", tokens=150) for i in range(3)]
    job = h.submit("j", pieces=tuple((i,) for i in range(8)), tokens=4)
    alive_most = 0

    def done() -> bool:
        nonlocal alive_most
        alive = [r for i in range(8) if (r := h.scheduler.get(f"j#{i}")) is not None and not r.is_finished]
        alive_most = max(alive_most, len(alive))
        return job.ended and all(s.ended for s in streams)

    h.run(done, stage_every=40)
    assert isinstance(job.events[-1], Finished) and alive_most == 2
    assert np.all(np.diff(job.audio) >= 0)  # still in order
