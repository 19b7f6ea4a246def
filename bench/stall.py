"""Does a long text stall the streams already running? The engine alone, no HTTP.

`python -m bench.stall [--model-dir M] [--streams 8] [--chars 4500] [--rounds 2] [--json F] [--markdown F]`

Each round starts `--streams` streaming jobs (fixed length, seeded) on a fresh engine, waits until each has
sent its first chunk, then submits one more request the way the server does and cancels it at its first
audio: a one-sentence text (mode `short text`, the baseline: what any new request costs the others), or a
`--chars`-character one taken in on a worker thread or in the text child process. From that moment on,
every gap between two consecutive chunks of a running stream is recorded; the table compares the gaps'
p50 / p99 / max across modes, whose order rotates round by round so machine drift hits all. A long text
whose normalisation (wetext: ~1 s for 4,300 Chinese characters) holds the decode thread, or the GIL,
shows up as one gap that long in every stream.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.engine import make_voice
from bench.outputs import write_results
from bench.provenance import commit, cpu_name, now_iso
from kernels.runtime.auto_settings import settings_for
from kernels.runtime.host_memory import usable_cores
from scheduler.jobs import AudioChunk, Failed, Mode, SpeechJob

STREAM_TEXT = "你好，这是一个测试。"
# ~45 characters of ordinary Chinese prose with numbers, dates and units (what wetext works hardest on).
LONG_UNIT = "二零二四年三月五日，我们在3号会议室讨论了第12季度的预算，总计约1500万元，增长了25%。"


def long_text(chars: int) -> str:
    return (LONG_UNIT * (chars // len(LONG_UNIT) + 1))[:chars]


class Gaps:
    """Chunk arrival times per running stream; gaps counted from `mark` on."""

    def __init__(self) -> None:
        self.arrivals: dict[str, list[float]] = {}
        self.first = threading.Semaphore(0)
        self.ended = threading.Semaphore(0)
        self.errors: list[str] = []

    def sink(self, event: Any) -> None:  # engine thread
        now = time.perf_counter()
        if isinstance(event, AudioChunk):
            times = self.arrivals.setdefault(event.request_id, [])
            times.append(now)
            if len(times) == 1:
                self.first.release()
            return
        if isinstance(event, Failed):
            self.errors.append(f"{event.request_id}: {event.code} {event.message}")
        self.ended.release()

    def after(self, mark: float) -> list[float]:
        gaps = []
        for times in self.arrivals.values():
            later = [t for t in times if t >= mark]
            previous = [t for t in times if t < mark][-1:]
            seq = previous + later
            gaps.extend(b - a for a, b in itertools.pairwise(seq))
        return gaps


def submit(engine: Any, job: Any, sink: Any) -> Any:
    """As the server does: text prepared off the engine thread when the engine takes prepared jobs (a job
    prepared already goes as it is)."""
    prepare = getattr(engine, "prepare", None)
    return engine.submit(prepare(job) if prepare is not None and isinstance(job, SpeechJob) else job, sink)


class CancelAtFirstAudio:
    """The long job is cancelled at its first chunk: what is measured is the cost of taking its text in,
    not the (unrelated) compute of speaking 4,500 characters alongside the streams."""

    def __init__(self, engine: Any, job: SpeechJob) -> None:
        self.engine, self.job = engine, job
        self.handle: Any = None
        self.heard = threading.Event()

    def sink(self, event: Any) -> None:  # engine thread
        if isinstance(event, AudioChunk) and not self.heard.is_set():
            self.heard.set()
            if self.handle is not None:
                self.handle.cancel()

    def run(self) -> None:  # its own thread, like the server's pool
        self.handle = submit(self.engine, self.job, self.sink)
        if self.heard.is_set():
            self.handle.cancel()


def _engine_takes_text_process() -> bool:
    """False for an engine from before text preparation moved off the decode thread (the "before" runs)."""
    from kernels.runtime.engine import EngineConfig

    return "text_process" in EngineConfig.__dataclass_fields__


def modes(text_process: list[int]) -> list[tuple[str, int | None]]:
    """(label, text_process) per mode; None: the short-text baseline. An older engine has one long-text
    mode: text taken in on the engine thread."""
    if not _engine_takes_text_process():
        return [("short text", None), ("long text, on the engine thread", 0)]
    where = {0: "long text, in a worker thread", 1: "long text, in a child process",
             2: "long text, prepared beforehand (engine intake only)",
             3: "its first sentence only, prepared beforehand"}
    return [("short text", None), *((where[t], t) for t in text_process)]


def one_round(model: Any, model_dir: Path, voice: Any, args: argparse.Namespace, label: str,
              text_process: int | None) -> dict[str, Any]:
    from kernels.runtime.engine import Engine, EngineConfig

    chars = args.chars if text_process is not None else len(LONG_UNIT)
    limits = {"num_slots": args.streams + 2, "slot_len": 1024}
    if "scheduler" in EngineConfig.__dataclass_fields__:  # today's nested limits (older revisions: flat)
        from scheduler.config import SchedulerConfig
        limits = {"scheduler": SchedulerConfig(**limits)}
    engine = Engine(model_dir, model=model, config=EngineConfig(
        **limits, overlap_stages=args.overlap,
        **({"text_process": text_process == 1} if _engine_takes_text_process() else {})))
    gaps = Gaps()
    long_job: Any = SpeechJob("new", Mode.ZERO_SHOT, voice, long_text(chars), seed=99, fixed_tokens=25)
    if text_process in (2, 3):  # its text work done before the streams start: what is left is the engine's
        long_job = engine.prepare(long_job)
    if text_process == 3:  # one piece: without the next sentence that starts once the first one's LLM is done
        long_job = replace(long_job, pieces=long_job.pieces[:1])
    try:
        for i in range(args.streams):
            submit(engine, SpeechJob(f"s{i}", Mode.ZERO_SHOT, voice, STREAM_TEXT, seed=i,
                                     fixed_tokens=args.tokens), gaps.sink)
        for _ in range(args.streams):
            if not gaps.first.acquire(timeout=args.timeout):
                raise TimeoutError("streams did not start")
        mark = time.perf_counter()
        taker = CancelAtFirstAudio(engine, long_job)
        worker = threading.Thread(target=taker.run)
        worker.start()
        for _ in range(args.streams):
            if not gaps.ended.acquire(timeout=args.timeout):
                raise TimeoutError("streams did not finish")
        if gaps.errors:
            raise RuntimeError("; ".join(gaps.errors[:3]))
        worker.join(args.timeout)
    finally:
        engine.shutdown(1.0)
    ms = np.asarray(gaps.after(mark)) * 1000.0
    return {"mode": label, "gaps": int(ms.size),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "max_ms": round(float(ms.max()), 1)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.stall", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, help="default: a tiny random model made in a temp dir")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--chars", type=int, default=4500, help="length of the long text")
    p.add_argument("--tokens", type=int, default=250, help="speech tokens per running stream (10 s)")
    p.add_argument("--rounds", type=int, default=2, help="rounds per mode (modes alternate)")
    p.add_argument("--overlap-stages", default="auto", choices=("auto", "0", "1"))
    p.add_argument("--text-process", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1],
                   help="long-text modes: 1 = text normalised in a child process (the server's default), "
                        "0 = on the submitting thread, 2 = prepared before the streams start (what the "
                        "engine's own intake costs), 3 = as 2 with its first sentence only (default: 0,1)")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    tmp = None
    try:
        if args.model_dir is None:
            from kernels.weights.make_checkpoint import main as make_checkpoint

            tmp = tempfile.TemporaryDirectory(prefix="cosy-stall-")
            args.model_dir = Path(tmp.name)
            make_checkpoint(["--preset", "tiny", "--out", tmp.name])
        return _run(args)
    finally:
        torch.set_num_threads(threads)
        if tmp is not None:
            tmp.cleanup()


def _run(args: argparse.Namespace) -> dict[str, Any]:
    from kernels.weights.model import load_model

    settings = settings_for(args.model_dir, overlap_stages=args.overlap_stages)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    args.overlap = settings.overlap_stages
    torch.set_grad_enabled(False)
    model = load_model(args.model_dir)
    voice = make_voice(args.model_dir)
    rounds = []
    order = modes(args.text_process)
    for r in range(args.rounds):
        for label, text_process in order[r % len(order):] + order[: r % len(order)]:  # rotate who goes first
            rounds.append({"round": r + 1, **one_round(model, args.model_dir, voice, args, label, text_process)})
            print(json.dumps(rounds[-1]), file=sys.stderr)
    result = {"meta": {"date": now_iso(), "machine": f"{cpu_name()}, {usable_cores()} cores",
                       "commit": commit(), "settings": settings.summary(), "streams": args.streams,
                       "chars": args.chars, "tokens": args.tokens},
              "rounds": rounds}
    table = markdown(result)
    write_results(result, table, args.json, args.markdown)
    print(table)
    return result


def markdown(result: dict[str, Any]) -> str:
    m = result["meta"]
    lines = [(f"{m['date']} · {m['machine']} · commit {m['commit']} · {m['settings']} · {m['streams']} streams "
             f"of {m['tokens']} tokens · long text {m['chars']} chars"), "",
             "| round | mode | gaps | p50 ms | p99 ms | max ms |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['round']} | {r['mode']} | {r['gaps']} | {r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} |"
              for r in result["rounds"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
