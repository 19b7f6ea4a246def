"""The event-loop lag probe (server/loop_lag.py), and its gauge, the admission limits and the heap in /metrics."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import requests

from kernels.runtime.host_memory import heap_stats
from server.loop_lag import LoopLagProbe
from server.metrics import Metrics
from tests.server_helpers import AUTH, running_server


def _gauge(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


async def test_probe_reports_how_long_a_blocking_call_held_the_loop() -> None:
    lags: list[float] = []
    probe = LoopLagProbe(asyncio.get_running_loop(), lags.append, interval_s=0.01)
    probe.start()
    await asyncio.sleep(0.05)
    time.sleep(0.2)  # noqa: ASYNC251 -- the point: a call that blocks the loop; the timer fires ~0.19 s late
    await asyncio.sleep(0.05)
    probe.stop()
    count = len(lags)
    await asyncio.sleep(0.03)
    assert len(lags) == count, "stop() cancels the timer"
    assert max(lags) >= 0.15
    assert min(lags) < 0.05  # the unblocked probes report (near) nothing
    assert all(lag >= 0 for lag in lags)


def test_gauge_is_the_worst_recent_probe_and_limits_render_once_set() -> None:
    m = Metrics()
    text = m.render(None)
    assert _gauge(text, "cosyserve_loop_lag_seconds") == 0.0
    assert _gauge(text, "cosyserve_max_inflight") is None  # unknown until the server starts
    for lag in (0.001, 0.25, 0.002):
        m.loop_lag(lag)
    m.set_limits(8, None)
    text = m.render(None)
    assert _gauge(text, "cosyserve_loop_lag_seconds") == 0.25
    assert _gauge(text, "cosyserve_max_inflight") == 8 and _gauge(text, "cosyserve_max_batch") is None
    for _ in range(50):  # the spike ages out of the window
        m.loop_lag(0.001)
    assert _gauge(m.render(None), "cosyserve_loop_lag_seconds") == 0.001


def test_running_server_exposes_loop_lag_and_its_limits(tmp_path: Path) -> None:
    with running_server(tmp_path, max_inflight=7, max_batch=3) as srv:
        time.sleep(0.3)  # a few probes
        text = requests.get(f"{srv.url}/metrics", headers=AUTH, timeout=5).text
    lag = _gauge(text, "cosyserve_loop_lag_seconds")
    assert lag is not None and 0 <= lag < 1.0
    assert _gauge(text, "cosyserve_max_inflight") == 7 and _gauge(text, "cosyserve_max_batch") == 3
    if heap_stats() is not None:  # glibc: what the RSS is made of, beside it
        in_use = _gauge(text, 'cosyserve_heap_bytes{kind="in_use"}')
        assert in_use is not None and in_use > 1 << 20  # an interpreter with a server in it: megabytes
        assert _gauge(text, 'cosyserve_heap_bytes{kind="free"}') is not None
        trims = _gauge(text, "cosyserve_heap_trims_total")  # the fake engine starts no trimmer: a count, >= 0
        assert trims is not None and trims >= 0 and _gauge(text, "cosyserve_heap_trim_seconds_total") is not None
