"""Engine throughput without HTTP: batched vs one-request-at-a-time on the same code, same run.

    python -m bench.engine --model-dir DIR --concurrency 1,8 [--tokens 150] [--requests-per-level N]
        [--stream/--no-stream] [--device cpu|cuda] [--no-cuda-graphs] [--threads T] [--json FILE]
        [--markdown FILE] [--llm-only] [--sequential-concurrency 1,8]

For each concurrency C the same jobs (fixed_tokens, fixed seeds) run twice:
- "batched": one Engine(num_slots >= C), C jobs in flight (closed loop: a finished job submits the
  next until requests-per-level are done);
- "sequential": an Engine with max_jobs=1, num_slots=1, fed the same way, so it queues C-1 of them.
  Its time to first chunk therefore includes queueing, as a client of a one-at-a-time server sees.
  `--sequential-concurrency` limits the levels where it runs (its rate does not depend on C; at C64 it
  would run 64 requests one by one); empty: batched only.

On CUDA each run records its peak GPU memory (`gpu_peak_mb`: torch.cuda.max_memory_allocated). The
JSON file is rewritten after every run ("complete": false until the last), so a run cut short by a
time limit keeps the levels it finished.

`--baseline "llm=bf16,flow=bf16,voice_prefix=0"` also runs every level batched on another path (mode
"baseline": its own dtypes, the voice prefix on or off, its flow steps, int8, threads, stage overlap
`overlap=0|1`, `first_alone=0|1`, `lone_worker=0|1`, `llm_yields=0|1`, `lone_first=0|1`, `one_team=0|1`
(EngineConfig.first_chunk_alone, .lone_flow_worker, .llm_yields_cores, .lone_first_alone, .one_thread_team)),
right after the measured one in
the same process, and reports measured / baseline ("vs baseline" rows): a new path against today's, side by side. Each
engine computes the bench voice's streaming-flow prefix before it is timed (`Engine.warm_voice`), as a
server that has served the voice before has it; with `voice_prefix=0` there is nothing to compute.

`--repeats N` runs each level N times, swapping the order of batched and baseline on every other repeat
(A B B A ...), and reports each mode's repeats merged (rates over the summed time, percentiles over all
first chunks). The 2-vCPU VMs drift: four C8 runs in a row, two per path, took 31.8, 30.8, 28.8 and
27.4 s, so with one order a path's place in the sequence weighs as much as the path; use an even N.

`--llm-only` drives Qwen2LM directly (packed prefill + batched decode + RAS sampling) without flow or
vocoder, for the full-size model where the CPU flow is too slow to benchmark whole; "ttfc" is then
the time to the first sampled speech token.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.outputs import write_json, write_results
from bench.provenance import commit, cpu_name, now_iso
from kernels.config import FlowConfig
from kernels.runtime.auto_settings import settings_for
from kernels.runtime.device import intra_op_threads
from scheduler.jobs import AudioChunk, Failed, Finished, Mode, SpeechJob, VoicePrompt
from server.config import FLOW_DTYPES, LLM_DTYPES

UPSTREAM_FLOW_STEPS = FlowConfig.n_timesteps  # the flow ODE's Euler steps in upstream's inference

TEXT = "Hello, this is a steady benchmark sentence for the engine."
PROMPT_TEXT = "希望你以后能够做的比我还好呦。"
SAMPLE_RATE = 24000
FIGURES = (
    "speech_seconds_per_second",
    "llm_tokens_per_second",
    "llm_stage_tokens_per_second",
    "decode_batch_mean",
    "flow_batch_mean",
    "vocoder_batch_mean",
)


# ---------------------------------------------------------------- inputs


def voiced_signal(seconds: float = 3.0, rate: int = 16000) -> np.ndarray:
    """Deterministic speech-like float signal: a ~120 Hz harmonic stack with 4 Hz syllable bursts."""
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120.0 + 20.0 * np.sin(2 * np.pi * 0.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 * (1 - np.cos(2 * np.pi * 4.0 * t)) * np.minimum(1.0, np.minimum(t, seconds - t) * 20)
    return (0.25 * voiced * envelope / np.abs(voiced).max()).astype(np.float32)


def make_voice(model_dir: Path, seconds: float = 3.0) -> VoicePrompt:
    """The bench voice with its transcript ids kept, as the server keeps an uploaded voice's: jobs never
    normalise the transcript (normalised as the bench's engines do, without wetext). `seconds` of prompt
    audio give 25 speech tokens a second."""
    from frontend.prompt import with_transcript_ids
    from frontend.text_normalize import TextFrontend
    from kernels.features.extractor import PromptExtractor

    voice = PromptExtractor(model_dir).extract(voiced_signal(seconds), 16000, PROMPT_TEXT)
    return with_transcript_ids(voice, TextFrontend(model_dir, use_wetext=False))


def make_jobs(voice: VoicePrompt, n: int, tokens: int, stream: bool, tag: str) -> list[SpeechJob]:
    return [
        SpeechJob(
            f"{tag}-{i}", Mode.ZERO_SHOT, voice, TEXT, stream=stream, seed=1000 + i, fixed_tokens=tokens
        )
        for i in range(n)
    ]


# ---------------------------------------------------------------- measurement


@dataclass
class StepStats:
    """Accumulates `runner.last` after every executed step (hooked on the runner instance)."""

    decode_batches: list[int] = field(default_factory=list)
    flow_batches: list[int] = field(default_factory=list)
    vocoder_batches: list[int] = field(default_factory=list)
    seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            ("prefill_s", "decode_s", "sample_s", "flow_s", "vocoder_s", "step_s"), 0.0
        )
    )
    steps: int = 0

    def add(self, timings: Any, step_s: float, counts_step: bool = True) -> None:
        self.steps += counts_step
        if timings.decode_batch:
            self.decode_batches.append(timings.decode_batch)
        if timings.flow_batch:
            self.flow_batches.append(timings.flow_batch)
        if timings.vocoder_batch:
            self.vocoder_batches.append(timings.vocoder_batch)
        for key in ("prefill_s", "decode_s", "sample_s", "flow_s", "vocoder_s"):
            self.seconds[key] += getattr(timings, key)
        self.seconds["step_s"] += step_s


def hook_runner(runner: Any, stats: StepStats) -> None:
    """Wrap the runner's LLM and chunk calls on this instance only (the engine looks them up per step;
    with overlapped stages they run on two threads, so stage seconds may sum to more than the wall)."""
    lock = threading.Lock()

    def wrap(name: str, timings_attr: str, counts_step: bool) -> None:
        inner = getattr(runner, name)

        def call(*args, **kwargs):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            with lock:
                stats.add(getattr(runner, timings_attr), time.perf_counter() - t0, counts_step)
            return out

        setattr(runner, name, call)

    wrap("execute_llm", "last_llm", True)
    wrap("execute_chunks", "last_chunks", False)


def _mean(xs: list[int] | list[float]) -> float | None:
    return float(statistics.fmean(xs)) if xs else None


def percentiles(values_s: list[float]) -> dict[str, float | None]:
    if not values_s:
        return {"p50": None, "p95": None}
    ms = np.asarray(values_s) * 1000.0
    return {"p50": round(float(np.percentile(ms, 50)), 1), "p95": round(float(np.percentile(ms, 95)), 1)}


class ClosedLoop:
    """Keeps `concurrency` jobs in flight; each Finished submits the next. Sink runs on the engine thread."""

    def __init__(self, engine: Any, jobs: list[SpeechJob], concurrency: int) -> None:
        self.engine, self.jobs, self.concurrency = engine, jobs, concurrency
        self.next = 0
        self.submit_t: dict[str, float] = {}
        self.first_t: dict[str, float] = {}
        self.samples = 0
        self.tokens = 0
        self.errors: list[str] = []
        self.remaining = len(jobs)
        self.done = threading.Event()
        self.lock = threading.Lock()

    def _submit_next(self) -> None:
        with self.lock:
            if self.next >= len(self.jobs):
                return
            job = self.jobs[self.next]
            self.next += 1
            self.submit_t[job.request_id] = time.perf_counter()
        self.engine.submit(job, self.sink)

    def sink(self, event: Any) -> None:
        now = time.perf_counter()
        if isinstance(event, AudioChunk):
            self.first_t.setdefault(event.request_id, now)
            self.samples += int(event.pcm.shape[0])
            return
        if isinstance(event, Finished):
            self.tokens += event.llm_tokens
        elif isinstance(event, Failed):
            self.errors.append(f"{event.request_id}: {event.code} {event.message}")
        self.remaining -= 1
        if self.remaining == 0:
            self.end_t = now
            self.done.set()
        else:
            self._submit_next()

    def run(self, timeout_s: float) -> float:
        self.start_t = time.perf_counter()
        for _ in range(min(self.concurrency, len(self.jobs))):
            self._submit_next()
        if not self.done.wait(timeout_s):
            raise TimeoutError(f"engine run did not finish in {timeout_s:.0f} s")
        if self.errors:
            raise RuntimeError("jobs failed: " + "; ".join(self.errors[:3]))
        return self.end_t - self.start_t

    def ttfc_s(self) -> list[float]:
        return [self.first_t[rid] - self.submit_t[rid] for rid in self.first_t]


def run_engine(*args: Any, **kw: Any) -> dict[str, Any]:
    """`run_engine_here` on a thread of its own that ends with the run. A thread that runs torch on several
    threads keeps an OpenMP pool until it exits, and a second pool in the process slows every 2-thread
    region (EngineConfig.one_thread_team): built here, an engine with `one_thread_team=False` (a baseline of
    the old path) would leave one on this thread and slow the runs after it."""
    threads = torch.get_num_threads()

    def run() -> dict[str, Any]:
        torch.set_num_threads(threads)
        with torch.no_grad():
            return run_engine_here(*args, **kw)

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bench-run") as own:  # its thread ends here
        return own.submit(run).result()


def run_engine_here(
    model: Any,
    model_dir: Path,
    jobs: list[SpeechJob],
    concurrency: int,
    sequential: bool,
    cuda_graphs: bool,
    slot_len: int,
    timeout_s: float,
    overlap: bool = True,
    mode: str | None = None,
    flow_ahead: bool = True,
    lead_hop: int = 0,
    **engine_kw: Any,
) -> dict[str, Any]:
    """`engine_kw`: EngineConfig fields of this path (e.g. voice_prefix_bytes); `mode`: its label;
    `flow_ahead`, `lead_hop`: the scheduler's flow work ahead of chunks and short first chunk
    (scheduler/chunk_policy.py)."""
    from kernels.runtime.engine import Engine, EngineConfig
    from scheduler.chunk_policy import ChunkPolicyConfig
    from scheduler.config import SchedulerConfig

    chunk = {"flow_ahead": flow_ahead, "lead_hop": lead_hop}
    if sequential:
        config = EngineConfig(
            scheduler=SchedulerConfig(num_slots=1, slot_len=slot_len, chunk=ChunkPolicyConfig(**chunk)),
            max_jobs=1, cuda_graphs=cuda_graphs,
            use_wetext=False, overlap_stages=overlap, **engine_kw,
        )
    else:
        config = EngineConfig(
            scheduler=SchedulerConfig(num_slots=max(1, concurrency), slot_len=slot_len,
                                      chunk=ChunkPolicyConfig(max_chunks_per_step=max(16, concurrency), **chunk)),
            cuda_graphs=cuda_graphs,
            use_wetext=False,
            overlap_stages=overlap,
            **engine_kw,
        )
    engine = Engine(model_dir, model=model, config=config)
    if jobs and jobs[0].stream and jobs[0].voice is not None:
        engine.warm_voice(jobs[0].voice)  # a server that serves the voice has its prefix (off: a no-op)
    cuda = engine.runner.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    stats = StepStats()
    hook_runner(engine.runner, stats)
    try:
        loop = ClosedLoop(engine, jobs, concurrency)
        wall = loop.run(timeout_s)
    finally:
        engine.shutdown(1.0)
    speech_s = loop.samples / SAMPLE_RATE
    llm_s = stats.seconds["prefill_s"] + stats.seconds["decode_s"] + stats.seconds["sample_s"]
    return {
        "mode": mode or ("sequential" if sequential else "batched"),
        "concurrency": concurrency,
        "requests": len(jobs),
        "wall_s": round(wall, 3),
        "speech_seconds": round(speech_s, 3),
        "llm_tokens": loop.tokens,
        "speech_seconds_per_second": speech_s / wall,
        "llm_tokens_per_second": loop.tokens / wall,
        # the LLM's own rate inside the engine: tokens per second of prefill + decode + sampling time
        "llm_stage_tokens_per_second": loop.tokens / llm_s if llm_s else None,
        "ttfc_ms": percentiles(loop.ttfc_s()),
        "ttfc_each_s": [round(t, 4) for t in loop.ttfc_s()],
        "decode_batch_mean": _mean(stats.decode_batches),
        "flow_batch_mean": _mean(stats.flow_batches),
        "vocoder_batch_mean": _mean(stats.vocoder_batches),
        "steps": stats.steps,
        "stage_seconds": {k: round(v, 3) for k, v in stats.seconds.items()},
        **({"gpu_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)} if cuda else {}),
    }


# ---------------------------------------------------------------- LLM only


def llm_prompt_embeds(model: Any, model_dir: Path, voice: VoicePrompt) -> torch.Tensor:
    from frontend.prompt import llm_prompt_for
    from frontend.text_normalize import TextFrontend

    text = TextFrontend(model_dir, use_wetext=False)
    prompt = llm_prompt_for(Mode.ZERO_SHOT, voice, text, None)
    return model.llm.build_lm_input(text.encode(TEXT), prompt.prompt_text_ids, prompt.prompt_speech_tokens)


def _llm_batch(
    model: Any,
    kv: Any,
    embeds: torch.Tensor,
    batch: int,
    tokens: int,
    seed: int,
) -> tuple[float, int, list[int]]:
    """Prefill `batch` copies of the prompt (packed), then `tokens - 1` batched decode steps with RAS
    sampling (stop ids masked: fixed length). Returns (seconds to first token, tokens, decode batches)."""
    from kernels.networks.sampling import ras_sample, recent_window

    lm, cfg = model.llm, model.llm.cfg
    dev = embeds.device
    stops = torch.tensor(cfg.stop_token_ids, device=dev)
    gens = []
    for b in range(batch):
        g = torch.Generator(device=dev)
        g.manual_seed(seed + b)
        gens.append(g)
    history: list[list[int]] = [[] for _ in range(batch)]
    ignore_eos = torch.ones(batch, dtype=torch.bool, device=dev)
    t0 = time.perf_counter()

    def sample(hidden: torch.Tensor) -> list[int]:
        logp = lm.logprobs(hidden)
        logp[:, stops] = float("-inf")
        recent = recent_window(history, cfg.win_size)
        out = ras_sample(
            logp, recent.to(dev), ignore_eos, cfg.eos_token, cfg.top_p, cfg.top_k, cfg.tau_r, gens
        )
        ids = out.tolist()
        for row, tok in enumerate(ids):
            history[row].append(int(tok))
        return ids

    hidden = lm.prefill_batch([(embeds, slot, 0) for slot in range(batch)], kv)
    last = sample(hidden)
    ttft = time.perf_counter() - t0
    slots = torch.arange(batch, device=dev)
    decode_batches = []
    for step in range(tokens - 1):
        positions = torch.full((batch,), embeds.shape[0] + step, dtype=torch.long, device=dev)
        hidden = lm.decode(
            lm.speech_embed(torch.tensor(last, device=dev)), slots, positions, kv, embeds.shape[0] + tokens
        )
        last = sample(hidden)
        decode_batches.append(batch)
    return ttft, batch * tokens, decode_batches


def run_llm_only(
    model: Any, embeds: torch.Tensor, n_jobs: int, concurrency: int, sequential: bool, tokens: int
) -> dict[str, Any]:
    """Rounds of `concurrency` jobs (sequential: one job at a time); no flow, no vocoder."""
    from kernels.networks.kv_cache import KVCache

    batch = 1 if sequential else concurrency
    dtype = next(model.llm.parameters()).dtype
    kv = KVCache.for_model(model.config.llm.qwen, batch, embeds.shape[0] + tokens + 1, embeds.device, dtype)
    ttfts, total, batches = [], 0, []
    finish: list[float] = []  # per job, seconds since start
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, n_jobs, batch):
            size = min(batch, n_jobs - first)
            begin = time.perf_counter() - start
            ttft, n, b = _llm_batch(model, kv, embeds, size, tokens, seed=1000 + first)
            end = time.perf_counter() - start
            for j in range(first, first + size):
                # closed loop of `concurrency` clients: job j is sent when job j - C has finished
                arrival = finish[j - concurrency] if j >= concurrency else 0.0
                ttfts.append(begin + ttft - arrival)
                finish.append(end)
            total += n
            batches += b
    wall = time.perf_counter() - start
    return {
        "mode": "sequential" if sequential else "batched",
        "concurrency": concurrency,
        "requests": n_jobs,
        "wall_s": round(wall, 3),
        "speech_seconds": round(total / 25.0, 3),
        "llm_tokens": total,
        "speech_seconds_per_second": None,
        "llm_tokens_per_second": total / wall,
        "llm_stage_tokens_per_second": total / wall,
        "ttfc_ms": percentiles(ttfts),
        "decode_batch_mean": _mean(batches),
        "flow_batch_mean": None,
        "vocoder_batch_mean": None,
        "llm_only": True,
    }


# ---------------------------------------------------------------- report


def repeat_order(modes: list[str], repeat: int) -> list[str]:
    """The modes of one repeat: batched and baseline swap places on every other repeat (A B B A ...)."""
    if repeat % 2 == 0 or "baseline" not in modes:
        return modes
    swapped = {"batched": "baseline", "baseline": "batched"}
    return [swapped.get(m, m) for m in modes]


def merge_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's repeats at a level as one run: totals summed, rates over the summed wall time,
    first-chunk percentiles over every request, batch means averaged; `repeat_speech_s_per_s` keeps each."""
    if len(runs) == 1:
        return runs[0]
    first, wall = runs[0], sum(r["wall_s"] for r in runs)
    speech, tokens = sum(r["speech_seconds"] for r in runs), sum(r["llm_tokens"] for r in runs)
    llm_s = sum(r["llm_tokens"] / r["llm_stage_tokens_per_second"] for r in runs
                if r.get("llm_stage_tokens_per_second"))
    each = [t for r in runs for t in r.get("ttfc_each_s", [])]
    merged = {
        **first,
        "requests": sum(r["requests"] for r in runs),
        "wall_s": round(wall, 3),
        "speech_seconds": round(speech, 3),
        "llm_tokens": tokens,
        "speech_seconds_per_second": speech / wall,
        "llm_tokens_per_second": tokens / wall,
        "llm_stage_tokens_per_second": tokens / llm_s if llm_s else None,
        "ttfc_ms": percentiles(each),
        "ttfc_each_s": each,
        "repeat_speech_s_per_s": [round(r["speech_seconds_per_second"], 4) for r in runs],
    }
    for key in ("decode_batch_mean", "flow_batch_mean", "vocoder_batch_mean"):
        values = [r[key] for r in runs if r.get(key) is not None]
        merged[key] = sum(values) / len(values) if values else None
    if "steps" in first:
        merged["steps"] = sum(r["steps"] for r in runs)
    if "stage_seconds" in first:
        merged["stage_seconds"] = {k: round(sum(r["stage_seconds"][k] for r in runs), 3) for k in first["stage_seconds"]}
    return merged


def ratios(runs: list[dict[str, Any]], against: str = "sequential") -> dict[str, dict[str, float | None]]:
    """Batched / `against` (sequential, or baseline) of every figure, per concurrency (ttfc: batched
    p50/p95 over the other's)."""
    out: dict[str, dict[str, float | None]] = {}
    by = {(r["mode"], r["concurrency"]): r for r in runs}
    for (mode, c), batched in sorted(by.items(), key=lambda kv: kv[0][1]):
        seq = by.get((against, c))
        if mode != "batched" or seq is None:
            continue
        row: dict[str, float | None] = {k: _ratio(batched.get(k), seq.get(k)) for k in FIGURES}
        for p in ("p50", "p95"):
            row[f"ttfc_{p}"] = _ratio(batched["ttfc_ms"][p], seq["ttfc_ms"][p])
        out[str(c)] = row
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def meta(model_label: str, device: str, args: argparse.Namespace) -> dict[str, Any]:
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if device.startswith("cuda") and torch.cuda.is_available() else ""
    cpu, commit_id = cpu_name() + gpu, commit("kernels", "scheduler", "frontend")
    return {
        "date": now_iso(),
        "machine": f"{cpu}, {os.cpu_count()} cores, device {device}",
        "commit": commit_id,
        "model": model_label,
        "threads": {
            "torch": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT"),
        },
        "tokens_per_request": args.tokens,
        "prompt_seconds": args.prompt_seconds,
        "repeats": args.repeats,
        "stream": args.stream,
        "llm_only": args.llm_only,
        "dtypes": {"llm": args.llm_dtype, "flow": args.flow_dtype},
        "flow_steps": args.flow_steps or UPSTREAM_FLOW_STEPS,
        "llm_int8": bool(args.llm_int8),
        "packed_linears": bool(args.packed_linears),
        "first_chunk_tokens": args.first_chunk_tokens,
        "overlap_stages": args.overlap,
        "cuda_graphs": device == "cuda" and not args.no_cuda_graphs,
        "torch": torch.__version__,
        **({"gpu": torch.cuda.get_device_name(0),
            "gpu_total_mb": round(torch.cuda.get_device_properties(0).total_memory / 2**20)}
           if device.startswith("cuda") and torch.cuda.is_available() else {}),
    }


def _f(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(result: dict[str, Any]) -> str:
    header = (
        "C",
        "mode",
        "req",
        "wall s",
        "speech s/s",
        "LLM tok/s",
        "LLM-stage tok/s",
        "TTFC p50 ms",
        "TTFC p95 ms",
        "decode B",
        "flow B",
        "vocoder B",
    )
    rows = [
        "| " + " | ".join(header) + " |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["runs"]:
        rows.append(
            "| "
            + " | ".join(
                [
                    str(r["concurrency"]),
                    r["mode"],
                    str(r["requests"]),
                    _f(r["wall_s"], 1),
                    _f(r["speech_seconds_per_second"]),
                    _f(r["llm_tokens_per_second"], 1),
                    _f(r["llm_stage_tokens_per_second"], 1),
                    _f(r["ttfc_ms"]["p50"], 0),
                    _f(r["ttfc_ms"]["p95"], 0),
                    _f(r["decode_batch_mean"]),
                    _f(r["flow_batch_mean"]),
                    _f(r["vocoder_batch_mean"]),
                ]
            )
            + " |"
        )
        for key, label in (("ratios", "**ratio**"), ("ratios_vs_baseline", "**vs baseline**")):
            q = result.get(key, {}).get(str(r["concurrency"])) if r["mode"] == "batched" else None
            if q is not None:
                rows.append(_ratio_row(r["concurrency"], label, q))
    return "\n".join(rows)


def _ratio_row(concurrency: int, label: str, q: dict[str, float | None]) -> str:
    cells = [str(concurrency), label, "", "", _x(q["speech_seconds_per_second"]), _x(q["llm_tokens_per_second"]),
             _x(q["llm_stage_tokens_per_second"]), _x(q["ttfc_p50"]), _x(q["ttfc_p95"]), _x(q["decode_batch_mean"]),
             _x(q["flow_batch_mean"]), _x(q["vocoder_batch_mean"])]
    return "| " + " | ".join(cells) + " |"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}×"


def stage_table(result: dict[str, Any]) -> str:
    runs = [r for r in result["runs"] if "stage_seconds" in r]
    if not runs:
        return ""
    keys = ("prefill_s", "decode_s", "sample_s", "flow_s", "vocoder_s", "step_s")
    gpu = any("gpu_peak_mb" in r for r in runs)
    rows = [
        "| C | mode | " + " | ".join(keys) + " | other (engine loop) s |" + (" peak GPU MiB |" if gpu else ""),
        "| --- | --- | " + " | ".join("---" for _ in keys) + " | --- |" + (" --- |" if gpu else ""),
    ]
    for r in runs:
        s = r["stage_seconds"]
        other = r["wall_s"] - s["step_s"]  # < 0 when the stages ran side by side (overlapped engine)
        rows.append(
            f"| {r['concurrency']} | {r['mode']} | "
            + " | ".join(f"{s[k]:.2f}" for k in keys)
            + (f" | {other:.2f} |" if other >= 0 else " | - (stages overlapped) |")
            + (f" {_f(r.get('gpu_peak_mb'), 0)} |" if gpu else "")
        )
    return "\n".join(rows)


def markdown(result: dict[str, Any]) -> str:
    m = result["meta"]
    head = [
        f"# Engine throughput ({'LLM only' if m['llm_only'] else 'whole pipeline'})",
        "",
        f"- date: {m['date']}",
        f"- machine: {m['machine']}",
        f"- commit: {m['commit']}",
        f"- model: {m['model']}",
        f"- threads: {json.dumps(m['threads'])}",
        *([f"- dtypes: {json.dumps(m['dtypes'])}"] if "dtypes" in m else []),
        *([f"- flow steps: {m['flow_steps']}"] if "flow_steps" in m else []),
        *(["- LLM int8 weights for steps of <= 8 rows (--llm-int8 1)"] if m.get("llm_int8") else []),
        *([f"- packed linears: {'on' if m['packed_linears'] else 'off'} (--packed-linears)"]
          if "packed_linears" in m else []),
        *([f"- first chunk: {m['first_chunk_tokens']} tokens (--first-chunk-tokens)"]
          if m.get("first_chunk_tokens") else []),
        *([f"- baseline (\"vs baseline\" rows: measured / baseline): {json.dumps(result['baseline'])}"]
          if "baseline" in result else []),
        *([f"- overlapped stages: {m['overlap_stages']}"
           + (" (LLM steps run beside the flow: LLM-stage tok/s includes waiting for cores and the GIL;"
              " for the LLM's own batching use --llm-only or --overlap-stages 0)"
              if m["overlap_stages"] and not m["llm_only"] else "")]
          if "overlap_stages" in m else []),
        *([f"- CUDA graphs: {m['cuda_graphs']}; GPU {m['gpu']} ({m['gpu_total_mb']} MiB)"] if "gpu" in m else []),
        (f"- {m['tokens_per_request']} fixed speech tokens per request, stream={m['stream']}, "
         f"prompt {m.get('prompt_seconds', 3.0)} s"),
        *([f"- repeats: {m['repeats']} per level, batched and baseline alternating (A B B A ...), merged"]
          if m.get("repeats", 1) > 1 else []),
        "",
        table(result),
        "",
    ]
    stages = stage_table(result)
    if stages:
        head += ["Seconds per stage (summed over steps):", "", stages, ""]
    return "\n".join(head)


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 8])
    p.add_argument("--tokens", type=int, default=150, help="fixed speech tokens per request")
    p.add_argument("--requests-per-level", type=int, default=0, help="jobs per level (default: = C)")
    p.add_argument("--flow-steps", type=int, default=0,
                   help="Euler steps of the flow's ODE on the measured path (default 0: upstream's 10)")
    p.add_argument("--llm-int8", type=int, choices=(0, 1), default=0,
                   help="int8 copies of the LLM's decoder-layer weights for small steps (CPU, opt-in)")
    p.add_argument("--packed-linears", type=int, choices=(0, 1), default=1,
                   help="LLM and flow linears on oneDNN-packed weights (CPU; as the server's default)")
    p.add_argument("--prompt-seconds", type=float, default=3.0,
                   help="the voice's prompt audio (25 tokens a second; where it ends on the flow's 25-token "
                        "grid decides how much of the first chunk's flow the voice prefix holds)")
    p.add_argument("--first-chunk-tokens", type=int, default=0,
                   help="a shorter first streaming chunk on the measured path (scheduler lead_hop; 0: upstream's)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of each level, batched and baseline in alternating order (A B B A ...), merged")
    p.add_argument("--sequential-concurrency", type=lambda s: [int(x) for x in s.split(",") if x],
                   help="levels that also run one-at-a-time (default: every --concurrency level; '': none)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--overlap-stages", default="auto", choices=("auto", "0", "1"),
                   help="flow/vocoder on a stage thread while the LLM decodes (default: auto, as the server; "
                        "both modes)")
    p.add_argument("--threads", type=int, default=0,
                   help="engine intra-op threads (default 0: auto, as the server: kernels/runtime/auto_settings.py)")
    p.add_argument("--llm-dtype", default="auto", choices=LLM_DTYPES)
    p.add_argument("--flow-dtype", default="auto", choices=FLOW_DTYPES)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument(
        "--llm-only", action="store_true", help="LLM alone: prefill + batched decode, no flow/vocoder"
    )
    p.add_argument("--baseline", type=parse_path,
                   help='also run each level batched on this path, e.g. "llm=bf16,flow=bf16,voice_prefix=0" '
                        "(unnamed: as measured), and report measured / baseline")
    p.add_argument("--model-label", help="model name for meta (default: the model dir)")
    p.add_argument("--timeout", type=float, default=1800.0, help="per run")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    threads = torch.get_num_threads()
    try:
        return _main(parse_args(argv))
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) keep their own setting


def parse_path(spec: str) -> dict[str, str]:
    """`llm=bf16,flow=fp32,voice_prefix=0` -> {"llm": "bf16", "flow": "fp32", "voice_prefix": "0"}."""
    allowed = {"llm": LLM_DTYPES, "flow": FLOW_DTYPES, "voice_prefix": ("0", "1"),
               "flow_steps": tuple(str(n) for n in range(1, UPSTREAM_FLOW_STEPS + 1)), "llm_int8": ("0", "1"),
               "threads": tuple(str(n) for n in range(1, 257)), "overlap": ("0", "1"), "first_alone": ("0", "1"),
               "lone_worker": ("0", "1"), "flow_ahead": ("0", "1"), "llm_yields": ("0", "1"),
               "lone_first": ("0", "1"), "one_team": ("0", "1"), "first_chunk": tuple(str(n) for n in range(101)), "attention": ("sdpa", "matmul"),
               "packed": ("0", "1")}
    out: dict[str, str] = {}
    for part in filter(None, spec.split(",")):
        key, _, value = part.partition("=")
        if key not in allowed or value not in allowed[key]:
            raise argparse.ArgumentTypeError(f"{part!r}: expected one of {', '.join(f'{k}=' for k in allowed)} "
                                             f"with a value in {allowed.get(key, ())}")
        out[key] = value
    return out


def baseline_path(args: argparse.Namespace, model: Any, device: str) -> dict[str, Any] | None:
    """The --baseline path: its model (the measured one when the dtypes match) and EngineConfig fields."""
    if args.baseline is None or args.llm_only:
        return None
    from kernels.runtime.engine import weight_dtype
    from kernels.weights.model import load_model

    measured = {"llm": args.llm_dtype, "flow": args.flow_dtype,
                "flow_steps": str(args.flow_steps or UPSTREAM_FLOW_STEPS), "llm_int8": str(args.llm_int8),
                "packed": str(args.packed_linears)}
    spec = {**measured, "voice_prefix": "1", **args.baseline}
    settings = settings_for(args.model_dir, cuda=device == "cuda", llm_dtype=spec["llm"], flow_dtype=spec["flow"])
    spec["llm"], spec["flow"] = settings.llm_dtype, settings.flow_dtype
    same = all(spec[key] == value for key, value in measured.items())
    with intra_op_threads(1 if device == "cpu" else 0):  # as the measured model (see _main)
        base_model = model if same else load_model(args.model_dir, device=device,
                                                   llm_dtype=weight_dtype(spec["llm"], device == "cuda"),
                                                   flow_dtype=weight_dtype(spec["flow"], False),
                                                   flow_steps=int(spec["flow_steps"]),
                                                   llm_int8=spec["llm_int8"] == "1",
                                                   packed_linears=spec["packed"] == "1")
    engine: dict[str, Any] = {} if spec["voice_prefix"] == "1" else {"voice_prefix_bytes": 0}
    for key, switch in (("first_alone", "first_chunk_alone"), ("lone_worker", "lone_flow_worker"),
                        ("llm_yields", "llm_yields_cores"), ("lone_first", "lone_first_alone"),
                        ("one_team", "one_thread_team"),
                        ("flow_ahead", "flow_ahead")):
        if spec.get(key) == "0":
            engine[switch] = False
    lead = int(spec.get("first_chunk", args.first_chunk_tokens))  # unnamed: as measured
    if lead:
        engine["lead_hop"] = lead
    print(f"baseline: {spec}", file=sys.stderr)
    overlap = None if "overlap" not in spec else spec["overlap"] == "1"
    return {"spec": spec, "model": base_model, "engine": engine, "threads": int(spec.get("threads", 0)),
            "overlap": overlap, "sdpa": spec.get("attention") == "sdpa"}


@contextlib.contextmanager
def sdpa_only(on: bool) -> Iterator[None]:
    """The flow's chunk attention through torch's SDPA on every device while inside (`attention=sdpa`)."""
    from kernels.networks.chunk_attention import use_cpu_bf16_matmuls

    before = use_cpu_bf16_matmuls(False) if on else None
    try:
        yield
    finally:
        if before is not None:
            use_cpu_bf16_matmuls(before)


def report(runs: list[dict[str, Any]], base: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": runs, "ratios": ratios(runs)}
    if base is not None:
        out["baseline"] = base["spec"]
        out["ratios_vs_baseline"] = ratios(runs, "baseline")
    return out


def _main(args: argparse.Namespace) -> dict[str, Any]:
    settings = settings_for(args.model_dir, threads=args.threads, overlap_stages=args.overlap_stages,
                            cuda=args.device == "cuda", llm_dtype=args.llm_dtype, flow_dtype=args.flow_dtype)
    args.llm_dtype, args.flow_dtype = settings.llm_dtype, settings.flow_dtype  # resolved: what ran
    print(f"settings: {settings.summary()}", file=sys.stderr)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    args.overlap = settings.overlap_stages
    torch.set_grad_enabled(False)
    from kernels.weights.model import load_model

    device = args.device
    from kernels.runtime.engine import weight_dtype

    llm_dtype = weight_dtype(args.llm_dtype, device == "cuda")
    t0 = time.perf_counter()
    with intra_op_threads(1 if device == "cpu" else 0):  # this thread keeps no OpenMP pool (one_thread_team)
        model = load_model(args.model_dir, device=device, llm_dtype=llm_dtype,
                           flow_dtype=weight_dtype(args.flow_dtype, False), flow_steps=args.flow_steps or None,
                           llm_int8=bool(args.llm_int8), packed_linears=bool(args.packed_linears))
        voice = make_voice(args.model_dir, args.prompt_seconds)
    print(
        f"model loaded in {time.perf_counter() - t0:.1f} s; prompt {len(voice.speech_tokens)} tokens",
        file=sys.stderr,
    )
    slot_len = len(voice.speech_tokens) + args.tokens + 256  # prompt text + text + speech, with room
    cuda_graphs = not args.no_cuda_graphs
    runs: list[dict[str, Any]] = []
    if args.llm_only:
        embeds = llm_prompt_embeds(model, args.model_dir, voice)
        run_llm_only(model, embeds, 2, 2, sequential=False, tokens=min(args.tokens, 8))  # warm-up
    else:
        # One unmeasured batched run at the largest level: the process's heap and the kernel
        # caches (oneDNN primitives) are then warm for whichever mode is measured first.
        top = max(args.concurrency)
        warm = make_jobs(voice, top, args.tokens, args.stream, "warm")
        run_engine(model, args.model_dir, warm, top, False, cuda_graphs, slot_len, args.timeout,
                   args.overlap)
    base = baseline_path(args, model, device)
    label = args.model_label or str(args.model_dir)
    seq_levels = args.concurrency if args.sequential_concurrency is None else args.sequential_concurrency
    for c in args.concurrency:
        n = max(c, args.requests_per_level)
        modes = ["batched", *(["baseline"] if base else []), *(["sequential"] if c in seq_levels else [])]
        done: dict[str, list[dict[str, Any]]] = {}
        for repeat in range(args.repeats):
            for mode in repeat_order(modes, repeat):
                sequential = mode == "sequential"
                if args.llm_only:
                    run = run_llm_only(model, embeds, n, c, sequential, args.tokens)
                else:
                    jobs = make_jobs(voice, n, args.tokens, args.stream, f"c{c}")
                    baseline = mode == "baseline"
                    path_model, path_kw = ((base["model"], base["engine"]) if baseline
                                           else (model, {"lead_hop": args.first_chunk_tokens}))
                    overlap = base["overlap"] if baseline and base["overlap"] is not None else args.overlap
                    with intra_op_threads(base["threads"] if baseline else 0), sdpa_only(baseline and base["sdpa"]):
                        run = run_engine(
                            path_model, args.model_dir, jobs, c, sequential, cuda_graphs, slot_len, args.timeout,
                            overlap, mode, **path_kw,
                        )
                done.setdefault(mode, []).append(run)
                print(
                    f"C{c} {run['mode']}: wall {run['wall_s']:.1f} s, {_f(run['llm_tokens_per_second'], 1)} tok/s, "
                    f"{_f(run['speech_seconds_per_second'])} speech s/s",
                    file=sys.stderr,
                )
        runs.extend(merge_runs(done[mode]) for mode in modes)
        if args.json:  # partial results survive a run cut short
            partial = {**report(runs, base), "meta": meta(label, device, args), "complete": False}
            write_json(args.json, partial)
    result = {**report(runs, base), "meta": meta(label, device, args), "complete": True}
    text = markdown(result)
    print(text)
    write_results(result, text, args.json, args.markdown)
    return result


if __name__ == "__main__":
    main()
