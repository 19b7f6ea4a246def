"""Fakes for scheduler and engine-loop tests: a clock, a runner that answers plans by hand, a stage
executor the test steps by hand. No model, no sleeps."""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from scheduler.plan import ChunkItem, ChunkOutput, DecodeItem, PrefillItem, StepPlan, StepResult
from scheduler.scheduler import Scheduler

SAMPLES_PER_TOKEN = 960
HELD_BACK = 3840  # upstream withholds 8 mel frames of audio until the next chunk


@dataclass
class FakeClock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


def upstream_chunk_samples(chunk: ChunkItem) -> int:
    """Samples upstream emits for a chunk (spec §8.2): totals add up to 960 x N exactly."""
    if chunk.finalize:
        covered = chunk.token_end - chunk.token_offset
        return SAMPLES_PER_TOKEN * covered + (0 if chunk.is_first else HELD_BACK)
    covered = chunk.token_end - 3 - chunk.token_offset
    return SAMPLES_PER_TOKEN * covered - (HELD_BACK if chunk.is_first else 0)


TokenFn = Callable[[PrefillItem | DecodeItem], int]


def answer(plan: StepPlan, token: TokenFn | int = 100) -> StepResult:
    """A runner that honours forced tokens and otherwise samples `token`."""
    def pick(item: PrefillItem | DecodeItem) -> int:
        if item.sample.forced_token is not None:
            return item.sample.forced_token
        return token(item) if callable(token) else token

    sampled = {i.request_id: pick(i) for i in (*plan.prefills, *plan.decodes)}
    samples = {c.request_id: upstream_chunk_samples(c) for c in plan.chunks if not c.advance}  # advances: no audio
    return StepResult(sampled=sampled, chunk_samples=samples)


def step(sched: Scheduler, token: TokenFn | int = 100) -> tuple[StepPlan, list[str]]:
    plan = sched.schedule()
    return plan, sched.update(plan, answer(plan, token))


def run_until_idle(sched: Scheduler, token: TokenFn | int = 100, max_steps: int = 10_000) -> list[StepPlan]:
    plans = []
    while sched.has_work() and len(plans) < max_steps:
        plans.append(step(sched, token)[0])
    return plans


class FakeRunner:
    """A RunnerPort without a model: tokens from `answer`, chunk audio filled with `fill(request_id)`
    so tests can tell whose audio came out in which order. `fail_llm`/`fail_chunks` make the next call
    raise; `added`/`released` record the runner-side state the loop asked for."""

    def __init__(self, token: TokenFn | int = 100, fill: Callable[[str], float] = lambda rid: 0.5) -> None:
        self.token = token
        self.fill = fill
        self.added: list[str] = []
        self.released: list[str] = []
        self.fail_llm = False
        self.fail_chunks = False
        self.llm_plans: list[StepPlan] = []
        self.chunk_batches: list[tuple[ChunkItem, ...]] = []
        self.alone_batches: list[tuple[ChunkItem, ...]] = []  # those run with no LLM step beside them
        self.alone_after: list[int] = []  # how many LLM plans had run before each of them

    def execute_llm(self, plan: StepPlan) -> StepResult:
        self.llm_plans.append(plan)
        self.added.extend(new.request_id for new in plan.admitted)
        if self.fail_llm:
            self.fail_llm = False
            raise RuntimeError("fake LLM failure")
        return answer(StepPlan(plan.step, plan.prefills, plan.decodes), self.token)

    def execute_chunks(self, chunks: tuple[ChunkItem, ...], alone: bool = False) -> tuple[StepResult, list[ChunkOutput]]:
        self.chunk_batches.append(chunks)
        if alone:
            self.alone_batches.append(chunks)
            self.alone_after.append(len(self.llm_plans))
        if self.fail_chunks:
            self.fail_chunks = False
            raise RuntimeError("fake chunk failure")
        audible = [c for c in chunks if not c.advance]  # an advance is flow work only, as in the real runner
        samples = {c.request_id: upstream_chunk_samples(c) for c in audible}
        outputs = [ChunkOutput(c.request_id, np.full(samples[c.request_id], self.fill(c.request_id), np.float32),
                               tokens=c.token_end - c.token_offset, generate_time_s=0.0,
                               flow_batch=len(chunks), vocoder_batch=len(audible)) for c in audible]
        return StepResult(chunk_samples=samples), outputs

    def release(self, request_id: str) -> None:
        self.released.append(request_id)


class ManualExecutor(Executor):
    """A stage 'thread' that runs a submitted call only when the test says `finish()`."""

    def __init__(self) -> None:
        self.pending: list[tuple[Future, Callable[..., Any], tuple[Any, ...]]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        self.pending.append((future, fn, args))
        return future

    def finish(self) -> None:
        for future, fn, args in self.pending:
            try:
                future.set_result(fn(*args))
            except Exception as exc:  # noqa: BLE001 - handed to the loop like a real stage thread's error
                future.set_exception(exc)
        self.pending.clear()
