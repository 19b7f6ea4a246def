"""Soak test: minutes of mixed traffic at 2x the admitted concurrency; does the server leak or lose?

    python -m bench.soak --minutes N --json F [--plot F] [--url URL --token T [--pid P]] [--workers W]

Without --url it spawns its own tiny-model server (`--max-inflight 8 --max-batch 8` unless told) and
knows its pid. The admitted concurrency is read from the server's /metrics (`cosyserve_max_inflight`:
what it runs at once before answering 429), and twice that many workers each loop over a weighted mix of
SSE, WebSocket duplex, non-stream JSON, OpenAI audio streams, voice uploads and deletes, and clients that
hang up after the first audio chunk (bench.soak_workers), backing off 1 s after a 429/503. A sampler
records the server's RSS and open fds (/proc, needs the pid: spawned, or --pid), its event-loop lag and
connections (/metrics), a /health round trip and the outcome counts (bench.soak_sampler).

Every request is ok, a documented error, our own disconnect, or lost (bench.soak_outcomes). The run
fails (exit 1) when, after the warm-up, RSS grows more than 5 %, fds not held by a client connection
grow, or anything is lost (bench.soak_report). JSON and a PNG plot (bench.soak_plot) are written.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import requests

from bench import texts
from bench.load import Target, upload_voice
from bench.outputs import write_json
from bench.provenance import commit, machine, now_iso
from bench.servers import spawn_server
from bench.soak_report import build_json
from bench.soak_sampler import Sampler, open_fds, parse_metrics, server_limits
from bench.soak_workers import MIX, Tally, WorkerPlan, delete_result, record, run_workers


def parse_mix(text: str) -> dict[str, float]:
    """`sse=30,ws=20,...`: the kinds to run and their weights (a kind left out does not run)."""
    mix = {}
    for item in filter(None, text.split(",")):
        kind, _, weight = item.partition("=")
        if kind not in MIX:
            raise argparse.ArgumentTypeError(f"unknown kind {kind!r}; choose from {', '.join(MIX)}")
        mix[kind] = float(weight or 1)
    if not mix or any(w < 0 for w in mix.values()) or not sum(mix.values()):
        raise argparse.ArgumentTypeError("the mix needs a positive weight")
    return mix


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--minutes", type=float, help="how long the load runs")
    length.add_argument("--seconds", type=float, help="the same in seconds (tests)")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--plot", type=Path, help="PNG (default: the JSON's path with .png)")
    p.add_argument("--url", help="a running server (default: spawn a tiny-model one)")
    p.add_argument("--token", default="bench-token")
    p.add_argument("--pid", type=int, help="the --url server's pid on this machine, for RSS and fds")
    p.add_argument("--workers", type=int, help="client workers (default: 2x the server's max inflight)")
    p.add_argument("--max-inflight", type=int, default=8, help="spawned server's --max-inflight")
    p.add_argument("--max-batch", type=int, help="spawned server's --max-batch (default: --max-inflight)")
    p.add_argument("--server-args", default="", help="more flags for the spawned server")
    p.add_argument("--model-dir", type=Path, help="spawned server's model (default: tiny random)")
    p.add_argument("--mix", type=parse_mix, default=dict(MIX), help="kind=weight,... of " + ",".join(MIX))
    p.add_argument("--texts", default="short", choices=sorted(texts.TEXTS),
                   help="bench.texts set (short: 1-2 s of speech, so the 2x load turns over many requests)")
    p.add_argument("--timeout", type=float, default=60.0, help="per request: no byte for this long is lost")
    p.add_argument("--sample-s", type=float, default=2.0, help="sampling interval")
    p.add_argument("--warmup-s", type=float, help="default max(60 s, 10 %% of the run), at most half of it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.duration_s = args.seconds if args.seconds is not None else args.minutes * 60
    if args.duration_s <= 0 or args.sample_s <= 0 or args.timeout <= 0:
        p.error("--minutes/--seconds, --sample-s and --timeout must be positive")
    if args.pid is not None and not args.url:
        p.error("--pid is for a --url server (a spawned one's pid is known)")
    if args.workers is not None and args.workers < 1:
        p.error("--workers must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with ExitStack() as stack:
        if args.url:
            target, pid, model = Target("main", args.url.rstrip("/"), args.token), args.pid, "unknown (--url)"
        else:
            extra = ["--max-inflight", str(args.max_inflight), *shlex.split(args.server_args)]
            srv = stack.enter_context(
                spawn_server(args.model_dir, max_batch=args.max_batch or args.max_inflight, extra=extra)
            )
            target, pid = Target("main", srv.url, srv.token), srv.pid
            model = str(args.model_dir) if args.model_dir else "tiny (random)"
        limits = server_limits(target)
        admitted = _int(limits.get("cosyserve_max_inflight"))
        if args.workers is None and admitted is None:
            raise SystemExit("the server's /metrics has no cosyserve_max_inflight: give --workers")
        workers = args.workers or 2 * admitted  # type: ignore[operator]
        meta = {"date": now_iso(), "machine": machine(), "commit": commit(), "model": model,
                "url": target.url, "pid": pid, "admitted_concurrency": admitted,
                "max_batch": _int(limits.get("cosyserve_max_batch")), "workers": workers, "mix": args.mix,
                "texts": args.texts, "timeout_s": args.timeout, "sample_s": args.sample_s, "seed": args.seed,
                "server_args": args.server_args}  # fmt: skip
        result = soak(target, pid, workers, args, meta)
    plot_path = args.plot or args.json.with_suffix(".png")
    write_json(args.json, result, indent=1, ensure_ascii=False)
    from bench.soak_plot import plot  # lazy: matplotlib is a bench extra

    plot(result, plot_path)
    print(summary(result, args.json, plot_path))
    return 0 if result["pass"] else 1


def soak(
    target: Target, pid: int | None, workers: int, args: argparse.Namespace, meta: dict[str, Any]
) -> dict[str, Any]:
    shared_voice = upload_voice(target)
    idle_before = idle_fds(target, pid)
    tally = Tally()
    origin = time.perf_counter()
    plan = WorkerPlan(target, shared_voice, origin, origin + args.duration_s, args.mix, args.texts,
                      args.timeout)  # fmt: skip
    sampler = Sampler(target, pid, tally, origin, args.sample_s, None if args.quiet else progress)
    sampler.start()
    try:
        run_workers(plan, workers, tally, args.seed)
    finally:
        sampler.stop()
        start = time.perf_counter()
        tally.add(record("voice", "delete", delete_result(target, shared_voice, start), start - origin))
    idle = f"before {idle_before}, after {idle_fds(target, pid)}"
    notes = [f"idle open fds (no load, client connections closed): {idle}; reported, not judged"]
    return build_json(tally.records, sampler.samples, sampler.probe_failures, args.duration_s, args.warmup_s,
                      meta, notes)  # fmt: skip


def idle_fds(target: Target, pid: int | None, wait_s: float = 15.0) -> int | None:
    """Open fds once the server holds no client connection but the probe's own (waits up to `wait_s`)."""
    if pid is None:
        return None
    deadline = time.monotonic() + wait_s
    with requests.Session() as session:
        while True:
            try:
                r = session.get(f"{target.url}/metrics", headers=target.auth, timeout=10)
                connections = parse_metrics(r.text).get("cosyserve_connections", 0)
            except requests.RequestException:
                connections = 0
            if connections <= 1 or time.monotonic() > deadline:
                return open_fds(pid)
            time.sleep(0.2)


def progress(sample: dict[str, Any]) -> None:
    rss = f"{sample['rss_mb']:.0f} MiB" if sample.get("rss_mb") is not None else "-"
    lag = f"{sample['loop_lag_ms']:.0f} ms" if sample.get("loop_lag_ms") is not None else "-"
    print(f"\r  {sample['t_s']:6.0f} s: {sample['sent']} sent, {sample['ok']} ok, "
          f"{sample['documented_error']} documented, {sample['client_disconnect']} hung up, "
          f"{sample['lost']} lost · RSS {rss} · fds {sample.get('open_fds')} · loop lag {lag}   ",
          end="", file=sys.stderr, flush=True)  # fmt: skip


def summary(result: dict[str, Any], json_path: Path, plot_path: Path) -> str:
    n = result["requests"]
    meta = result["meta"]
    windows = ", ".join(f"{w['start_s']:g}-{w['end_s']:g} s p50 {w['p50']} p95 {w['p95']}"
                        for w in result["ttfp_ms"]["windows"])  # fmt: skip
    lines = [
        "",
        f"soak {result['minutes']:g} min, {meta['workers']} workers "
        + f"(2x admitted {meta['admitted_concurrency']}), warm-up {result['warmup_s']:g} s",
        f"requests: {n['sent']} sent, {n['ok']} ok, {n['documented_errors']} documented errors "
        + f"{n['documented_by_code']}, {n['client_disconnects']} client disconnects, {n['lost']} lost",
        f"RSS growth after warm-up: {_pct(result['rss_growth_pct_after_warmup'])} (server), "
        + f"{_pct(result['rss_tree_growth_pct_after_warmup'])} (with children); fds less connections, "
        + f"first/last window: {result['fds_first_last']}",
        f"TTFP ms per window: {windows}",
        *result["notes"],
        "PASS" if result["pass"] else "FAIL:\n  " + "\n  ".join(result["reasons"]),
        *(f"  lost: {x}" for x in n["lost_examples"][:5]),
        f"json: {json_path}, plot: {plot_path}",
    ]
    return "\n".join(lines)


def _int(x: float | None) -> int | None:
    return None if x is None else int(x)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1f} %"


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds the ExitStack: a spawned server stops
    sys.exit(main())
