"""Scheduler overhead per engine step with a fake runner, against a trivial baseline.

The baseline does the least a batching loop must do per step (build a batch list, append one
token per running request). The ratio says what our decisions cost on top; the absolute
microseconds per step are what matters against a GPU decode step (~10-20 ms at batch 32).

    .venv/bin/python -m bench.scheduler_overhead [--batch 32] [--tokens 400] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time

from scheduler.chunk_policy import ChunkPolicyConfig
from scheduler.config import SchedulerConfig
from scheduler.request import Request
from scheduler.scheduler import Scheduler
from scheduler.testing import FakeClock, answer


def run_scheduler(batch: int, tokens: int, rounds: int) -> tuple[float, int]:
    cfg = SchedulerConfig(num_slots=batch, slot_len=4096, max_running=batch, max_prefills_per_step=batch,
                          max_prefill_tokens_per_step=100_000, chunk=ChunkPolicyConfig(max_chunks_per_step=batch))
    clock = FakeClock()
    sched = Scheduler(cfg, clock)
    for i in range(batch * rounds):
        sched.add_request(Request(f"r{i}", text_ids=list(range(30)), prompt_speech_ids=tuple(range(75)),
                                  flow_prompt_len=75, fixed_tokens=tokens, seed=i))
    spent, steps = 0.0, 0
    while sched.has_work():
        t0 = time.perf_counter()
        plan = sched.schedule()
        t1 = time.perf_counter()
        result = answer(plan, lambda item: (item.sample.step * 7919) % 6561)  # runner: not timed
        t2 = time.perf_counter()
        sched.update(plan, result)
        spent += (t1 - t0) + (time.perf_counter() - t2)
        clock.now += 0.02
        steps += 1
    return spent, steps


def run_baseline(batch: int, tokens: int, rounds: int) -> tuple[float, int]:
    spent, steps = 0.0, 0
    for _ in range(rounds):
        outs: list[list[int]] = [[] for _ in range(batch)]
        for _ in range(tokens):
            t0 = time.perf_counter()
            plan = [(i, len(o)) for i, o in enumerate(outs)]
            for i, pos in plan:
                outs[i].append(pos % 6561)
            spent += time.perf_counter() - t0
            steps += 1
    return spent, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    s_time, s_steps = run_scheduler(args.batch, args.tokens, args.rounds)
    b_time, b_steps = run_baseline(args.batch, args.tokens, args.rounds)
    s_us, b_us = 1e6 * s_time / s_steps, 1e6 * b_time / b_steps
    out = {
        "batch": args.batch,
        "tokens_per_request": args.tokens,
        "scheduler_steps": s_steps,
        "scheduler_us_per_step": round(s_us, 1),
        "scheduler_steps_per_s": round(s_steps / s_time),
        "baseline_us_per_step": round(b_us, 1),
        "ratio_vs_baseline": round(s_us / b_us, 1),
        "share_of_15ms_gpu_step_pct": round(100 * s_us / 15_000, 2),
    }
    for key, value in out.items():
        print(f"{key:>28}: {value}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
