"""The soak's sampler thread: the server's RSS and open fds (from /proc), its event-loop lag and
connections (/metrics), a /health round trip, and the clients' outcome counts, every few seconds.

RSS and fds need the server's pid on this machine (spawned, or `--pid`); without one those fields
are None. Probe failures (/health or /metrics not answering) are counted: they are lost requests too.
"""
from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from bench.load import Target
from bench.soak_workers import Tally

HEAP_KINDS = ("in_use", "free", "mmapped")  # cosyserve_heap_bytes{kind=...}: what the server's RSS is made of
_SERIES = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def rss_mb(pid: int, proc: Path = Path("/proc")) -> float | None:
    """Resident set size of one process (VmRSS), MiB; None when it is gone."""
    try:
        for line in (proc / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def descendants(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """Children, grandchildren, ... of `pid` (the server's text-normalising child process, say)."""
    parent_of: dict[int, int] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rfind(")") + 2 :].split()  # the name in parentheses may hold spaces
        parent_of[int(entry.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, parent in parent_of.items() if parent in frontier]
        found += kids
        frontier = kids
    return found


def open_fds(pid: int, proc: Path = Path("/proc")) -> int | None:
    try:
        return len(os.listdir(proc / str(pid) / "fd"))
    except OSError:
        return None


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {series: value}; a labelled series keeps its labels in the key."""
    out = {}
    for line in text.splitlines():
        m = _SERIES.match(line.strip())
        if m:
            try:
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
            except ValueError:
                continue
    return out


def server_limits(target: Target, timeout_s: float = 10.0) -> dict[str, float]:
    """cosyserve_max_inflight / cosyserve_max_batch from /metrics (absent on servers that predate them)."""
    r = requests.get(f"{target.url}/metrics", headers=target.auth, timeout=timeout_s)
    r.raise_for_status()
    series = parse_metrics(r.text)
    return {k: series[k] for k in ("cosyserve_max_inflight", "cosyserve_max_batch") if k in series}


class Sampler(threading.Thread):
    """Samples until stop(); `samples` is a list of dicts, `t_s` in seconds since `origin`."""

    def __init__(self, target: Target, pid: int | None, tally: Tally, origin: float, interval_s: float,
                 on_sample: Callable[[dict[str, Any]], None] | None = None) -> None:
        super().__init__(daemon=True, name="soak-sampler")
        self.target, self.pid, self.tally = target, pid, tally
        self.origin, self.interval_s, self.on_sample = origin, interval_s, on_sample
        self.samples: list[dict[str, Any]] = []
        self.probe_failures: list[str] = []
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def run(self) -> None:
        with requests.Session() as session:
            while True:
                self.samples.append(self.sample(session))
                if self.on_sample is not None:
                    self.on_sample(self.samples[-1])
                if self._stop_event.wait(self.interval_s):
                    return

    def sample(self, session: requests.Session) -> dict[str, Any]:
        t = time.perf_counter() - self.origin
        out: dict[str, Any] = {"t_s": round(t, 3), **self.process(), **self.tally.counts()}
        start = time.perf_counter()
        try:
            session.get(f"{self.target.url}/health", timeout=30).raise_for_status()
            out["health_ms"] = (time.perf_counter() - start) * 1e3
        except requests.RequestException as exc:
            out["health_ms"] = None
            self.probe_failures.append(f"{t:.0f} s /health: {type(exc).__name__}: {exc}"[:300])
        try:
            r = session.get(f"{self.target.url}/metrics", headers=self.target.auth, timeout=30)
            r.raise_for_status()
            series = parse_metrics(r.text)
        except requests.RequestException as exc:
            series = {}
            self.probe_failures.append(f"{t:.0f} s /metrics: {type(exc).__name__}: {exc}"[:300])
        lag = series.get("cosyserve_loop_lag_seconds")
        out["loop_lag_ms"] = lag * 1e3 if lag is not None else None
        out["connections"] = series.get("cosyserve_connections")
        out["inflight"] = series.get("cosyserve_inflight")
        out["server_errors"] = sum(v for k, v in series.items() if k.startswith("cosyserve_errors_total{"))
        for kind in HEAP_KINDS:  # absent off glibc and on servers that predate the gauge
            value = series.get(f'cosyserve_heap_bytes{{kind="{kind}"}}')
            out[f"heap_{kind}_mb"] = value / 2**20 if value is not None else None
        out["heap_trims"] = series.get("cosyserve_heap_trims_total")  # kernels/runtime/heap_trim.py
        return out

    def process(self) -> dict[str, Any]:
        if self.pid is None:
            return {"rss_mb": None, "rss_tree_mb": None, "open_fds": None}
        own = rss_mb(self.pid)
        kids = [rss_mb(p) for p in descendants(self.pid)]
        tree = own + sum(k for k in kids if k is not None) if own is not None else None
        return {"rss_mb": own, "rss_tree_mb": tree, "open_fds": open_fds(self.pid)}
