"""Fixed work on an engine with a given heap-trim interval: what the trim costs, run by run.

    python -m bench.heap_trim --interval 5 [--jobs 32] [--model-dir DIR]
    python -m bench.heap_trim --interval 0            # the same work without trims

Jobs of varied length (40-300 fixed tokens, 70 % streaming, fixed seeds) run 8 at a time on one engine
whose `heap_trim_s` is `--interval` (kernels/runtime/heap_trim.py); it prints the wall time, the speech
rate and the number of trims. Run the two commands alternately (A B A B ...) and compare them pair by
pair: the process's peak RSS and its time are the figures (`/usr/bin/time -v` gives both).
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

from bench.engine import SAMPLE_RATE, ClosedLoop, make_voice
from bench.servers import build_tiny_model


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(prog="python -m bench.heap_trim", description=__doc__.split("\n")[0])
    p.add_argument("--interval", type=float, required=True, help="heap_trim_s (0: no trims)")
    p.add_argument("--jobs", type=int, default=32)
    p.add_argument("--model-dir", type=Path, help="default: a tiny random checkpoint, built for the run")
    args = p.parse_args(argv)
    if args.model_dir is None:
        with tempfile.TemporaryDirectory(prefix="heap-trim-") as tmp:
            return _run(args, build_tiny_model(Path(tmp) / "tiny"))
    return _run(args, args.model_dir)


def _run(args: argparse.Namespace, model_dir: Path) -> float:
    from kernels.runtime.engine import Engine, EngineConfig
    from kernels.runtime.host_memory import TRIM_COUNTS
    from scheduler.chunk_policy import ChunkPolicyConfig
    from scheduler.config import SchedulerConfig
    from scheduler.jobs import Mode, SpeechJob

    voice = make_voice(model_dir)
    config = EngineConfig(scheduler=SchedulerConfig(num_slots=8, chunk=ChunkPolicyConfig(max_chunks_per_step=16)),
                          use_wetext=False, heap_trim_s=args.interval)
    engine = Engine(model_dir, config=config)
    rnd = random.Random(1)
    jobs = [SpeechJob(f"j{i}", Mode.ZERO_SHOT, voice, "Hello there, a benchmark sentence." * rnd.randint(1, 3),
                      stream=rnd.random() < 0.7, seed=i, fixed_tokens=rnd.randint(40, 300)) for i in range(args.jobs)]
    try:
        loop = ClosedLoop(engine, jobs, 8)
        wall = loop.run(3600)
    finally:
        engine.shutdown(1.0)
    print(f"interval {args.interval:g} s: {wall:.1f} s, {loop.samples / SAMPLE_RATE / wall:.2f} speech-s/s, "
          f"{TRIM_COUNTS.trims} trims")
    return wall


if __name__ == "__main__":
    main(sys.argv[1:])
