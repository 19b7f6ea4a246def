"""Fakes for scheduler tests (and engine tests): a clock, and a runner that answers plans by hand."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from scheduler.plan import ChunkItem, DecodeItem, PrefillItem, StepPlan, StepResult
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
    samples = {c.request_id: upstream_chunk_samples(c) for c in plan.chunks}
    return StepResult(sampled=sampled, chunk_samples=samples)


def step(sched: Scheduler, token: TokenFn | int = 100) -> tuple[StepPlan, list[str]]:
    plan = sched.schedule()
    return plan, sched.update(plan, answer(plan, token))


def run_until_idle(sched: Scheduler, token: TokenFn | int = 100, max_steps: int = 10_000) -> list[StepPlan]:
    plans = []
    while sched.has_work() and len(plans) < max_steps:
        plans.append(step(sched, token)[0])
    return plans
