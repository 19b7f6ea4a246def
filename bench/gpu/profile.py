"""A small torch-profiler trace of N engine steps at concurrency C (default 50 steps at C32).

    python -m bench.gpu.profile --model-dir DIR --out DIR [--device cuda] [--concurrency 32]
        [--steps 50] [--skip 20] [--tokens 150] [--no-cuda-graphs] [--overlap-stages auto|0|1]

One unmeasured run first (CUDA-graph capture, allocator and kernel caches warm), then a closed loop of
C jobs; the profiler starts before LLM step `skip` and stops after `skip + steps` steps. It is driven
from the engine thread (torch's profiler records CPU ops of the thread that starts it): with
overlapped stages the flow/vocoder thread's CPU ops are missing, its CUDA kernels are not. On CUDA
each profiled step ends with a synchronize, so the step times in profile.json include the GPU work.
Writes OUT/profile.txt (key_averages table, top rows), OUT/profile.json (window, step times, top ops)
and OUT/trace.json.gz (chrome trace; dropped when over --max-trace-mb, to keep the results small).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from bench.engine import ClosedLoop, make_jobs, make_voice, run_engine
from bench.provenance import commit, now_iso


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu.profile", description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--steps", type=int, default=50, help="LLM steps profiled")
    p.add_argument("--skip", type=int, default=20, help="LLM steps run before the profiler starts")
    p.add_argument("--tokens", type=int, default=150, help="fixed speech tokens per request")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--overlap-stages", default="auto", choices=("auto", "0", "1"))
    p.add_argument("--row-limit", type=int, default=40)
    p.add_argument("--max-trace-mb", type=float, default=20.0)
    p.add_argument("--timeout", type=float, default=600.0)
    return p.parse_args(argv)


class WindowProfiler:
    """Wraps runner.execute_llm (engine thread): starts the profiler before step `skip`, stops it after
    `skip + steps`, and times every step of the window."""

    def __init__(self, runner: Any, skip: int, steps: int, activities: list[Any]) -> None:
        self.skip, self.steps = skip, steps
        self.prof = torch.profiler.profile(activities=activities, record_shapes=False, with_stack=False)
        self.calls = 0
        self.active = self.started = False
        self.t0 = 0.0
        self.step_s: list[float] = []
        self.window_s = 0.0
        self.done = threading.Event()
        inner = runner.execute_llm

        def call(*args, **kwargs):  # type: ignore[no-untyped-def]
            if self.calls == self.skip and not self.done.is_set():
                self.prof.start()
                self.active = self.started = True
                self.t0 = time.perf_counter()
            t = time.perf_counter()
            with torch.profiler.record_function("engine.execute_llm"):
                out = inner(*args, **kwargs)
            if self.active:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.step_s.append(time.perf_counter() - t)
            self.calls += 1
            if self.active and self.calls >= self.skip + self.steps:
                self.stop()
            return out

        runner.execute_llm = call

    def stop(self) -> None:
        if self.active:
            self.window_s = time.perf_counter() - self.t0
            self.prof.stop()
            self.active = False
        self.done.set()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    from kernels.runtime.auto_settings import settings_for
    from kernels.runtime.engine import Engine, EngineConfig, weight_dtype
    from kernels.weights.model import load_model
    from scheduler.chunk_policy import ChunkPolicyConfig
    from scheduler.config import SchedulerConfig

    cuda = args.device == "cuda"
    settings = settings_for(args.model_dir, threads=0, overlap_stages=args.overlap_stages, cuda=cuda)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = load_model(args.model_dir, device=args.device, llm_dtype=weight_dtype("auto", cuda),
                       flow_dtype=weight_dtype("fp32", False))
    voice = make_voice(args.model_dir)
    load_s = time.perf_counter() - t0
    c, graphs = args.concurrency, not args.no_cuda_graphs
    tokens = max(args.tokens, args.skip + args.steps + 10)  # the window fits inside every job
    slot_len = len(voice.speech_tokens) + tokens + 256
    t0 = time.perf_counter()
    run_engine(model, args.model_dir, make_jobs(voice, c, tokens, True, "warm"), c, False, graphs, slot_len,
               args.timeout, settings.overlap_stages)
    warm_s = time.perf_counter() - t0
    print(f"model loaded in {load_s:.1f} s, warm run {warm_s:.1f} s", file=sys.stderr)

    config = EngineConfig(
        scheduler=SchedulerConfig(num_slots=c, slot_len=slot_len,
                                  chunk=ChunkPolicyConfig(max_chunks_per_step=max(16, c))),
        cuda_graphs=graphs, use_wetext=False, overlap_stages=settings.overlap_stages,
    )
    engine = Engine(args.model_dir, model=model, config=config)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    window = WindowProfiler(engine.runner, args.skip, args.steps, activities)
    try:
        loop = ClosedLoop(engine, make_jobs(voice, c, tokens, True, "prof"), c)
        loop.run(args.timeout)
    finally:
        window.stop()  # a run shorter than the window still leaves a trace
        engine.shutdown(1.0)

    if not window.started:
        raise SystemExit(f"the run ended after {window.calls} LLM steps, before the window (--skip {args.skip})")
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    averages = window.prof.key_averages()
    (args.out / "profile.txt").write_text(averages.table(sort_by=sort, row_limit=args.row_limit) + "\n")
    top = sorted(averages, key=lambda e: getattr(e, "device_time_total", 0) if cuda else e.cpu_time_total,
                 reverse=True)[:15]
    trace = args.out / "trace.json"
    window.prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as src, gzip.open(str(trace) + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()
    gz = Path(str(trace) + ".gz")
    trace_mb = gz.stat().st_size / 2**20
    if trace_mb > args.max_trace_mb:
        gz.unlink()
    steps = window.step_s
    result = {
        "date": now_iso(),
        "commit": commit(),
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "concurrency": c,
        "cuda_graphs": cuda and graphs,
        "overlap_stages": settings.overlap_stages,
        "tokens_per_request": tokens,
        "steps_requested": args.steps,
        "steps_profiled": len(steps),
        "window_s": round(window.window_s, 4),
        "step_ms": {
            "mean": round(1e3 * sum(steps) / len(steps), 3) if steps else None,
            "max": round(1e3 * max(steps), 3) if steps else None,
        },
        "load_s": round(load_s, 2),
        "warm_run_s": round(warm_s, 2),
        "sort": sort,
        "top_ops": [
            {
                "name": e.key,
                "calls": e.count,
                "cpu_total_ms": round(e.cpu_time_total / 1e3, 3),
                "device_total_ms": round(getattr(e, "device_time_total", 0) / 1e3, 3),
            }
            for e in top
        ],
        "trace": gz.name if gz.exists() else None,
        "trace_mb": round(trace_mb, 2),
    }
    (args.out / "profile.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("steps_profiled", "window_s", "step_ms", "trace_mb")}))
    return result


if __name__ == "__main__":
    main()
