"""The engine loop: one thread runs schedule -> execute -> update over typed messages. Torch-free.

Other threads talk to it only through `submit()` (returns a `JobHandle`) and the frozen commands of
scheduler/commands.py on its inbox, handled in order by `match`; what they read is the `EngineStats`
snapshot this thread publishes every pass. The scheduler, the runner (anything with `RunnerPort`'s
methods), the stage executor and the clock are injected, so tests drive `run_pass()` with a fake runner
and a fake clock: no model, no sleeps.

With a stage executor (`overlap`, the default) a step's flow/vocoder chunks go to the stage thread (on a
GPU, its own CUDA stream) and the loop goes on with LLM-only steps until that batch is back; then the
next batch is planned. Runner state of a request whose chunk is out is released only once it is back.
While a batch is out, streams already two chunks ahead of their audio do not decode (the scheduler's
pacing; one chunk ahead while the batch holds a listener's first audio, except the batch's own requests,
and those whose first audio it is hold too when the batch keeps the cores busy: `first_alone_batch`), so the
cores go to the chunks and to requests still working to a next chunk.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from typing import Protocol

from protocol.errors import ErrorCode
from scheduler.commands import Cancel, Command, FinishText, PushTokens, Stop, Submit
from scheduler.job_book import JobBook
from scheduler.jobs import EngineStats, EventSink, PreparedJob
from scheduler.plan import ChunkItem, ChunkOutput, StepPlan, StepResult
from scheduler.scheduler import Scheduler

log = logging.getLogger(__name__)


class RunnerPort(Protocol):
    """What the loop needs of a model runner (kernels' ModelRunner; tests' fakes)."""

    def execute_llm(self, plan: StepPlan) -> StepResult: ...  # prefills, decodes, sampling
    # alone: no LLM step runs meanwhile (the loop's own thread runs it, with every core)
    def execute_chunks(self, chunks: tuple[ChunkItem, ...], alone: bool = False) -> tuple[StepResult, list[ChunkOutput]]: ...
    def release(self, request_id: str) -> None: ...  # drop a request's runner-side state


@dataclass
class _InFlight:
    """The chunk batch running on the stage thread (at most one at a time)."""

    plan: StepPlan  # chunks only
    future: Future
    request_ids: frozenset[str]
    first_ids: frozenset[str]  # its requests whose chunk is a listener's first audio (not a later piece's)


class JobHandle:
    """JobControl for one submitted job; safe to call from any thread."""

    def __init__(self, loop: EngineLoop, request_id: str, encode: Callable[[str], list[int]]) -> None:
        self._loop = loop
        self._encode = encode
        self.request_id = request_id

    def push_tokens(self, ids: Sequence[int]) -> None:
        self._loop.post(PushTokens(self.request_id, tuple(ids)))

    def push_text(self, text: str) -> None:
        """Tokenises on the calling thread (servers use `encode_text` on a worker, then push_tokens)."""
        self.push_tokens(self._encode(text))

    def finish_text(self) -> None:
        self._loop.post(FinishText(self.request_id))

    def cancel(self) -> None:
        self._loop.post(Cancel(self.request_id))


class EngineLoop:
    def __init__(
        self,
        scheduler: Scheduler,
        runner: RunnerPort,
        stage: Executor | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_jobs: int = 0,
        idle_wait_s: float = 0.05,
        first_alone_batch: int = 0,
        lone_first_alone: bool = False,
    ) -> None:
        """`stage`: where chunk batches run beside the LLM (None: serial steps); `max_jobs`: jobs in flight
        at once (0 = no limit beyond the scheduler's queue); `idle_wait_s`: how long the thread waits on its
        inbox with nothing to do; `first_alone_batch`: a batch holding a listener's first audio with at least
        this many requests (it keeps the cores busy) pauses the LLM of the streams whose first audio it
        holds too (0 = never); `lone_first_alone`: the first audio of every live stream (a lone stream's, in
        practice) goes first, alone: their decodes wait from the step that plans it, the flow ahead of it
        counts as that audio, and a lone chunk planned with no LLM work runs on this thread, which then has
        every core, instead of the stage thread (see `_step_overlapped`)."""
        self.scheduler = scheduler
        self.runner = runner
        self.stage = stage
        self.idle_wait_s = idle_wait_s
        self.first_alone_batch = first_alone_batch
        self.lone_first_alone = lone_first_alone
        self.book = JobBook(scheduler, self._release, clock, max_jobs)
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        # submitted (callers, under a lock) - taken (this thread): jobs still in the inbox
        self._submit_lock = threading.Lock()
        self._submitted = 0
        self._taken = 0
        self._taken_published = 0  # `_taken` as of the snapshot: a job taken since is in neither count
        self._in_flight: _InFlight | None = None
        self._deferred: set[str] = set()  # runner state to drop once the in-flight batch is back
        self._last_batches = (0, 0)  # flow, vocoder batch of the latest chunk step
        # Live counts, not the scheduler's last-step ones: those go stale once the engine idles.
        self._snapshot = EngineStats(0, 0, 0, 0, 0, 0, 0, 0)
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ any thread
    def post(self, cmd: Command) -> None:
        self._inbox.put(cmd)

    def submit(self, prepared: PreparedJob, sink: EventSink, encode: Callable[[str], list[int]]) -> JobHandle:
        with self._submit_lock:
            self._submitted += 1
            self._inbox.put(Submit(prepared, sink))
        return JobHandle(self, prepared.request_id, encode)

    def pending_submits(self) -> int:
        return max(0, self._submitted - self._taken_published)

    def can_admit(self) -> bool:
        return self._snapshot.waiting + self.pending_submits() < self.scheduler.config.max_waiting

    def stats(self) -> EngineStats:
        """This thread's latest snapshot (other threads never read the scheduler or runner)."""
        return replace(self._snapshot, waiting=self._snapshot.waiting + self.pending_submits())

    def busy(self) -> bool:
        """Jobs running or still in the inbox (as of the latest snapshot)."""
        return self._snapshot.running + self._snapshot.waiting > 0 or self.pending_submits() > 0

    @property
    def overlap(self) -> bool:
        return self.stage is not None

    def start(self, on_thread_start: Callable[[], None] = lambda: None) -> None:
        def main() -> None:
            on_thread_start()
            self.run()

        self._thread = threading.Thread(target=main, name="cosyserve-engine", daemon=True)
        self._thread.start()

    def stop(self, deadline_s: float = 5.0) -> bool:
        """Let running jobs finish until the deadline, then cancel the rest and stop. True once stopped."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end and self.busy():
            time.sleep(0.02)
        self.post(Stop())
        if self._thread is None:
            return True
        self._thread.join(timeout=max(1.0, deadline_s))
        return not self._thread.is_alive()

    # ------------------------------------------------------------------ the loop thread
    def run(self) -> None:
        while self.run_pass():
            pass
        self._collect(None)
        self.book.cancel_all(ErrorCode.CANCELLED, "server shutting down")
        self._refuse_late_submits()
        self._publish_stats()

    def _refuse_late_submits(self) -> None:
        """Jobs submitted after the stop get their final event too (clients never wait on a dead engine)."""
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, Submit):
                self._taken += 1
                self.book.refuse(cmd, ErrorCode.CANCELLED, "server shutting down")

    def run_pass(self) -> bool:
        """One pass: commands, then one step (or a short wait when there is nothing to do). False on stop."""
        self._publish_stats()
        self.book.admit_backlog()
        self._collect()
        if not self._drain_inbox(block=not self.scheduler.has_work() and self._in_flight is None):
            return False
        self.book.admit_backlog()
        if not self.scheduler.has_work():
            self._collect(self.idle_wait_s)  # e.g. the chunks of a request cancelled meanwhile
            return True
        flight = self._in_flight
        first = flight is not None and bool(flight.first_ids)
        # a first packet in flight: other streams hold back to one chunk ahead, so it gets the cores sooner;
        # in a batch big enough to keep the cores busy, the streams whose first audio it holds too (their
        # chunk out is that one; streams already playing keep two): on a CPU the LLM beside the flow slows
        # both (bench/results/2026-12-07-cpu2-full-first-alone.md)
        in_flight: frozenset[str] = frozenset()
        if flight is not None:
            alone = first and (0 < self.first_alone_batch <= len(flight.request_ids)
                               or (self.lone_first_alone and len(flight.first_ids) >= self.scheduler.num_live))
            in_flight = flight.request_ids - flight.first_ids if alone else flight.request_ids
        plan = self.scheduler.schedule(with_chunks=flight is None, chunks_ahead=1 if first else 2,
                                       in_flight=in_flight)
        for rid in plan.released:
            self._release(rid)
        if plan.is_empty:
            if flight is not None:
                self._collect(self.idle_wait_s)  # nothing to decode: wait for the chunks
                return True
            return self._drain_inbox(block=True)  # e.g. bistream waiting for text
        if self.stage is None:
            self._step_serial(plan)
        else:
            self._step_overlapped(plan)
        self.book.advance_pieces()
        return True

    def _step_serial(self, plan: StepPlan) -> None:
        """LLM then chunks on this thread, one update."""
        try:
            llm = self.runner.execute_llm(plan)
            chunked, outputs = self.runner.execute_chunks(plan.chunks) if plan.chunks else (StepResult(), [])
        except Exception as exc:
            log.exception("engine step failed")
            self._fail_plan(plan, f"internal error: {exc}")
            return
        merged = StepResult(sampled=llm.sampled, chunk_samples=chunked.chunk_samples,
                            failed={**llm.failed, **chunked.failed}, flow_recomputed=chunked.flow_recomputed)
        self._apply_result(plan, merged, outputs)

    def _step_overlapped(self, plan: StepPlan) -> None:
        """Hand the chunks to the stage thread first, then run the LLM part here meanwhile. With
        `lone_first_alone`, a lone chunk planned with no LLM work (a lone stream's first audio, its decode held;
        its last chunk) runs right here instead: on a CPU this thread's intra-op threads are the only ones
        (kernels/runtime/engine.py says why), so the chunk gets every core."""
        assert self.stage is not None
        if self.lone_first_alone:
            plan = self._hold_lone_first(plan)
            if len(plan.chunks) == 1 and not (plan.prefills or plan.decodes or plan.admitted):
                self._step_alone(plan)
                return
        if plan.chunks:
            future = self.stage.submit(self.runner.execute_chunks, plan.chunks)
            self._in_flight = _InFlight(StepPlan(plan.step, chunks=plan.chunks), future,
                                        frozenset(c.request_id for c in plan.chunks),
                                        frozenset(c.request_id for c in plan.chunks
                                                  if (not c.advance or self.lone_first_alone)
                                                  and self.book.starts_playback(c.request_id)))
        llm_plan = replace(plan, chunks=())
        if llm_plan.is_empty:
            return
        try:
            result = self.runner.execute_llm(llm_plan)
        except Exception as exc:
            log.exception("engine LLM step failed")
            self._fail_plan(llm_plan, f"internal error: {exc}")
            return
        self._apply_result(llm_plan, result, [])

    def _hold_lone_first(self, plan: StepPlan) -> StepPlan:
        """`plan` without the decodes of its chunks' streams when those chunks hold the first audio of every
        live stream: they have their first chunk's tokens, and their next ones can wait for its audio."""
        firsts = {c.request_id for c in plan.chunks if not c.advance and self.book.starts_playback(c.request_id)}
        if not firsts or len(firsts) < self.scheduler.num_live:
            return plan
        return replace(plan, decodes=tuple(d for d in plan.decodes if d.request_id not in firsts))

    def _step_alone(self, plan: StepPlan) -> None:
        """The plan's chunks on this thread, with no LLM step beside them."""
        try:
            result, outputs = self.runner.execute_chunks(plan.chunks, alone=True)
        except Exception as exc:
            log.exception("engine chunk step failed")
            self._fail_plan(plan, f"internal error: {exc}")
            return
        self._apply_result(plan, result, outputs)

    def _collect(self, wait_s: float | None = 0.0) -> None:
        """Apply the stage thread's chunk batch if it is done, waiting up to wait_s for it (None: until done)."""
        flight = self._in_flight
        if flight is None or (wait_s == 0.0 and not flight.future.done()):
            return
        try:
            result, outputs = flight.future.result(wait_s)
        except FutureTimeout:
            return
        except Exception as exc:
            self._in_flight = None
            log.exception("engine chunk step failed")
            self._fail_plan(flight.plan, f"internal error: {exc}")
        else:
            self._in_flight = None
            self._apply_result(flight.plan, result, outputs)
        for rid in self._deferred:
            self.runner.release(rid)
        self._deferred.clear()

    def _apply_result(self, plan: StepPlan, result: StepResult, outputs: list[ChunkOutput]) -> None:
        ended = self.scheduler.update(plan, result)
        if outputs:
            self._last_batches = (max(o.flow_batch for o in outputs), len(outputs))
        for out in outputs:
            self.book.on_chunk(out)
        for rid in ended:
            self.book.on_request_end(rid)

    def _fail_plan(self, plan: StepPlan, message: str) -> None:
        """Every request of a step that raised fails; through `update`, so the scheduler also takes its
        chunks back (their flow-cache reservations) and reports each end once."""
        rids = {p.request_id for p in plan.prefills} | {d.request_id for d in plan.decodes}
        rids |= {c.request_id for c in plan.chunks}
        self._apply_result(plan, StepResult(failed=dict.fromkeys(rids, message)), [])

    def _release(self, rid: str) -> None:
        """Drop a request's runner state, or defer that while the stage thread is using it."""
        if self._in_flight is not None and rid in self._in_flight.request_ids:
            self._deferred.add(rid)
        else:
            self.runner.release(rid)

    def _publish_stats(self) -> None:
        self._taken_published = self._taken
        waiting = self.scheduler.num_waiting
        s = self.scheduler.stats()
        flow_batch, vocoder_batch = self._last_batches
        self._snapshot = EngineStats(
            running=max(0, self.book.num_requests - waiting),  # admitted requests (decoding or draining)
            waiting=waiting + self.book.num_backlogged,
            kv_used_tokens=self.scheduler.kv.used_tokens,
            kv_total_tokens=s.last_step.kv_total_tokens,
            last_decode_batch=s.last_step.decode_batch,
            last_flow_batch=flow_batch,
            last_vocoder_batch=vocoder_batch,
            steps=s.totals.steps,
            flow_cache_bytes=s.flow_cache_bytes,
            flow_cache_pool_bytes=s.flow_cache_pool_bytes,
            flow_advances=s.totals.flow_advances,
        )

    # ------------------------------------------------------------------ commands
    def _drain_inbox(self, block: bool) -> bool:
        """Apply queued commands (waiting up to idle_wait_s for the first when `block`); False on stop."""
        try:
            cmd = self._inbox.get(timeout=self.idle_wait_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while self._apply(cmd):
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return True
        return False

    def _apply(self, cmd: Command) -> bool:
        """One command from another thread; False on stop."""
        match cmd:
            case Stop():
                return False
            case Submit():
                self._taken += 1
                self.book.take(cmd)
            case Cancel(job_id=job_id):
                self.book.cancel(job_id)
            case PushTokens() | FinishText():
                self.book.text(cmd)
        return True
