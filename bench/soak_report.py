"""The soak's numbers and verdict, from its records and samples. Pure: no clock, no sockets.

Warm-up: the first max(60 s, 10 %) of the run (at most half of it), when caches, pools and allocator
arenas fill. After it, two comparison windows of max(60 s, 10 % of what follows), at most its two halves
(the 2-minute CI run): the first after the warm-up and the run's last; medians, so one GC or allocator
spike does not decide. (The server's RSS moves by hundreds of MiB from sample to
sample as requests' flow caches are mapped and unmapped, kernels/runtime/host_buffers.py; a window of a few
samples would read one busy moment as growth.)
Limits (LIMITS): RSS may grow at most 5 %; fds not held by a client connection (open fds - the
server's connections gauge) by at most FD_TOLERANCE; no request lost.
"""
from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

from bench.load_stats import percentile
from bench.soak_outcomes import DOCUMENTED, HUNG_UP, LOST, OK
from bench.soak_sampler import HEAP_KINDS
from bench.soak_workers import Record

RSS_GROWTH_PCT = 5.0
# /proc/<pid>/fd and the /metrics connections gauge are read a few ms apart, and 2x-concurrency clients
# open and close connections all the time (every WebSocket request, every upload, every hang-up), so a
# sample can be off by a connection or two even with medians; a leak of one fd per request or per
# connection shows as hundreds over a run.
FD_TOLERANCE = 2
LIMITS = {"rss_growth_pct": RSS_GROWTH_PCT, "fd_growth": FD_TOLERANCE, "lost": 0}
Series = list[list[float]]  # [[seconds, value], ...]


def warmup_s(duration_s: float, override: float | None = None) -> float:
    w = override if override is not None else max(60.0, 0.1 * duration_s)
    return min(w, duration_s / 2)


def compare_window_s(duration_s: float, warmup: float) -> float:
    """max(1 minute, 10 % of what follows the warm-up), at most half of it: a 30-minute run compares two
    162-second medians (its one-minute medians spread 9 % with no trend, so 5 % could not be read on them)."""
    measured = duration_s - warmup
    return min(max(60.0, 0.1 * measured), measured / 2)


def ttfp_window_s(duration_s: float) -> float:
    """Per 5 minutes; per minute for runs under 5 minutes (the issue's CI run is 2)."""
    return 300.0 if duration_s >= 300 else 60.0


def series(samples: Sequence[dict[str, Any]], key: str, end_s: float | None = None) -> Series:
    """[[t, value]] of the samples that have `key` (not None), up to `end_s`."""
    return [[s["t_s"], s[key]] for s in samples
            if s.get(key) is not None and (end_s is None or s["t_s"] <= end_s)]  # fmt: skip


def fds_less_connections(samples: Sequence[dict[str, Any]], end_s: float | None = None) -> Series:
    return [[s["t_s"], s["open_fds"] - s["connections"]] for s in samples
            if s.get("open_fds") is not None and s.get("connections") is not None
            and (end_s is None or s["t_s"] <= end_s)]  # fmt: skip


def window_median(points: Series, start: float, end: float) -> float | None:
    values = [v for t, v in points if start <= t <= end]
    return statistics.median(values) if values else None


def first_and_last(points: Series, warmup: float, end: float, window: float) -> tuple[float, float] | None:
    """Medians of the first window after the warm-up and of the run's last window; None without samples."""
    first = window_median(points, warmup, warmup + window)
    last = window_median(points, end - window, end)
    return None if first is None or last is None else (first, last)


def growth_pct(pair: tuple[float, float] | None) -> float | None:
    if pair is None or pair[0] <= 0:
        return None
    return (pair[1] - pair[0]) / pair[0] * 100


def ttfp_windows(records: Sequence[Record], duration_s: float, window_s: float) -> list[dict[str, Any]]:
    """TTFP p50/p95/p99 of the requests that started in each window (those with audio: ok and hang-ups)."""
    out = []
    for k in range(max(1, math.ceil(duration_s / window_s - 1e-9))):
        lo, hi = k * window_s, min((k + 1) * window_s, duration_s)
        values = [r.ttfp_ms for r in records if lo <= r.start_s < hi and not math.isnan(r.ttfp_ms)]
        out.append({"start_s": lo, "end_s": hi, "requests": len(values),
                    **{f"p{p}": _finite(percentile(values, p)) for p in (50, 95, 99)}})  # fmt: skip
    return out


def request_counts(records: Sequence[Record]) -> dict[str, Any]:
    by_outcome = Counter(r.outcome for r in records)
    by_op: dict[str, Counter[str]] = {}
    for r in records:
        by_op.setdefault(r.op, Counter())[r.outcome] += 1
    return {
        "sent": len(records),
        "ok": by_outcome[OK],
        "documented_errors": by_outcome[DOCUMENTED],
        "lost": by_outcome[LOST],
        "client_disconnects": by_outcome[HUNG_UP],
        "by_op": {op: dict(c) for op, c in sorted(by_op.items())},
        "documented_by_code": dict(Counter(r.code for r in records if r.outcome == DOCUMENTED)),
        "lost_examples": [f"{r.start_s:.1f} s {r.op}: {r.error}" for r in records if r.outcome == LOST][:20],
    }


def verdict(rss: dict[str, tuple[float, float] | None], fds: tuple[float, float] | None, lost: int,
            probe_failures: int, process_known: bool) -> list[str]:
    """The reasons the run fails; empty when it passes. `rss`: (first, last) medians by what was measured
    (the server process; with its children). Without a pid (`process_known` False) RSS/fds are skipped."""
    reasons = []
    for what, pair in rss.items():
        g = growth_pct(pair)
        if pair is not None and g is not None and g > RSS_GROWTH_PCT:
            reasons.append(f"RSS of {what} grew {g:.1f} % after warm-up ({pair[0]:.0f} -> {pair[1]:.0f} MiB; "
                           f"limit {RSS_GROWTH_PCT:g} %)")  # fmt: skip
    if fds is not None and fds[1] - fds[0] > FD_TOLERANCE:
        reasons.append(f"open fds (less client connections) grew {fds[0]:g} -> {fds[1]:g} after warm-up "
                       f"(tolerance +{FD_TOLERANCE})")  # fmt: skip
    if process_known and (fds is None or any(pair is None for pair in rss.values())):
        reasons.append("no RSS/fd samples in a comparison window (sample interval too long for the run?)")
    if lost:
        reasons.append(f"{lost} request(s) lost (no answer, a 5xx, a malformed or cut-off response)")
    if probe_failures:
        reasons.append(f"{probe_failures} /health or /metrics probe(s) failed")
    return reasons


def build_json(records: Sequence[Record], samples: Sequence[dict[str, Any]], probe_failures: Sequence[str],
               duration_s: float, warmup_override: float | None, meta: dict[str, Any],
               notes: Sequence[str] = ()) -> dict[str, Any]:
    """The run's JSON; `pass` and `reasons` are the verdict. Series stop at the run's end (`duration_s`):
    samples taken while the last requests finished are left out of the comparison and the plot."""
    warm = warmup_s(duration_s, warmup_override)
    window = compare_window_s(duration_s, warm)
    rss = {"the server": series(samples, "rss_mb", duration_s),
           "the server and its children": series(samples, "rss_tree_mb", duration_s)}  # fmt: skip
    fd_points = fds_less_connections(samples, duration_s)
    rss_pairs = {what: first_and_last(points, warm, duration_s, window) for what, points in rss.items()}
    fd_pair = first_and_last(fd_points, warm, duration_s, window)
    counts = request_counts(records)
    audible = [r for r in records if not math.isnan(r.ttfp_ms)]  # ok and hang-ups: a first chunk came
    process_known = meta.get("pid") is not None
    reasons = verdict(rss_pairs, fd_pair, counts["lost"], len(probe_failures), process_known)
    if not process_known:
        notes = [*notes, "no server pid (--url without --pid): RSS and fds not sampled, not judged"]
    tw = ttfp_window_s(duration_s)
    count_keys = ["sent", OK, DOCUMENTED, HUNG_UP, LOST]
    return {
        "minutes": round(duration_s / 60, 4),
        "duration_s": duration_s,
        "warmup_s": warm,
        "compare_window_s": window,
        "requests": counts,
        "rss_mb": rss["the server"],
        "rss_tree_mb": rss["the server and its children"],
        "open_fds": series(samples, "open_fds", duration_s),
        "fds_less_connections": fd_points,
        "connections": series(samples, "connections", duration_s),
        "loop_lag_ms": series(samples, "loop_lag_ms", duration_s),
        "health_ms": series(samples, "health_ms", duration_s),
        "inflight": series(samples, "inflight", duration_s),
        "server_errors": series(samples, "server_errors", duration_s),  # cosyserve_errors_total, all codes
        "heap_mb": {kind: series(samples, f"heap_{kind}_mb", duration_s) for kind in HEAP_KINDS},
        "heap_trims": series(samples, "heap_trims", duration_s),  # cumulative malloc_trim calls
        "ttfp_ms_by_request": [[r.start_s, round(r.ttfp_ms, 1)] for r in audible],
        "counts": {
            "columns": ["t_s", *count_keys],
            "rows": [[s["t_s"], *(s[k] for k in count_keys)] for s in samples if s["t_s"] <= duration_s],
        },
        "rss_growth_pct_after_warmup": _round(growth_pct(rss_pairs["the server"])),
        "rss_tree_growth_pct_after_warmup": _round(growth_pct(rss_pairs["the server and its children"])),
        "rss_mb_first_last": rss_pairs["the server"],
        "fd_growth_after_warmup": None if fd_pair is None else fd_pair[1] - fd_pair[0],
        "fds_first_last": fd_pair,
        "ttfp_ms": {
            "window_s": tw,
            "note": "per 5-minute window" if tw == 300 else "per 1-minute window (runs under 5 minutes)",
            "windows": ttfp_windows(records, duration_s, tw),
        },
        "limits": LIMITS,
        "pass": not reasons,
        "reasons": reasons,
        "probe_failures": list(probe_failures)[:20],
        "notes": list(notes),
        "meta": meta,
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 3)
