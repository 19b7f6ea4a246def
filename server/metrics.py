"""Server metrics, rendered as Prometheus text at GET /metrics.

Plain counters/histograms updated on the event loop only (no locks needed); engine
numbers come from `EngineProtocol.stats()` at scrape time.
"""
from __future__ import annotations

import bisect
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from kernels.runtime.host_memory import TRIM_COUNTS, heap_stats
from scheduler.jobs import EngineStats
from server.backend_pool import Backend

_LATENCY_BUCKETS_S = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
_RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)
_LOOP_LAG_PROBES = 50  # the gauge is the worst of the last 50 probes (~5 s at server.loop_lag's 0.1 s)
# Why the server ended a client's connection itself (slow or abusive clients, too many connections).
CUT_REASONS = ("header_timeout", "body_timeout", "stalled_write", "max_connections", "ws_ping_flood")


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def render(self, name: str) -> list[str]:
        lines, running = [f"# TYPE {name} histogram"], 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            lines.append(f'{name}_bucket{{le="{bound:g}"}} {running}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.n}')
        lines += [f"{name}_sum {self.total:.6f}", f"{name}_count {self.n}"]
        return lines


class Metrics:
    """Changed only through its methods (handlers say what happened; the counting stays here)."""

    def __init__(self) -> None:
        self._requests: Counter[tuple[str, int]] = Counter()  # (route, status)
        self._ws_tasks: Counter[str] = Counter()  # WebSocket tasks by outcome (no HTTP status of their own)
        self._errors: Counter[str] = Counter()  # by error code
        self._inflight = 0  # synthesis jobs (HTTP + WS) currently submitted to the engine
        self._connections = 0
        self._first_packet_s = Histogram(_LATENCY_BUCKETS_S)
        self._rtf = Histogram(_RTF_BUCKETS)
        # --role backend (server/backend.py): internal jobs
        self._llm_tokens = 0
        self._backend_jobs: Counter[str] = Counter()  # by outcome
        # Recent event-loop lags (server.loop_lag); the worst one, so a scrape every few seconds sees a stall.
        self._loop_lags: deque[float] = deque(maxlen=_LOOP_LAG_PROBES)
        self._max_inflight: int | None = None  # admission limits, set once the server starts
        self._max_batch: int | None = None
        self._cuts: Counter[str] = Counter()  # connections ended by the server, by reason (CUT_REASONS)
        self._pending_peak = 0  # most engine chunks one stream ever had waiting for its writer

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def connections(self) -> int:
        return self._connections

    def request_done(self, route: str, status: int) -> None:
        self._requests[(route, status)] += 1

    def ws_task_done(self, outcome: str) -> None:
        """outcome: "finished", "failed" (task-failed sent) or "cancelled" (client gone, shutdown)."""
        self._ws_tasks[outcome] += 1

    def error(self, code: str) -> None:
        self._errors[str(code)] += 1  # the label is the code's text, enum member or plain string

    def connection_opened(self) -> None:
        self._connections += 1

    def connection_closed(self) -> None:
        self._connections -= 1

    def job_started(self) -> None:
        self._inflight += 1

    def job_ended(self) -> None:
        self._inflight -= 1

    def connection_cut(self, reason: str) -> None:
        """The server ended a connection on a client's behaviour: one of CUT_REASONS."""
        self._cuts[reason] += 1

    def cuts(self, reason: str) -> int:
        return self._cuts[reason]

    def pending_chunks(self, n: int) -> None:
        """A stream's writer took a chunk with `n` more still queued behind it (slow readers queue audio)."""
        self._pending_peak = max(self._pending_peak, n)

    @property
    def pending_peak(self) -> int:
        return self._pending_peak

    def first_packet(self, seconds: float) -> None:
        self._first_packet_s.observe(seconds)

    def synthesis_done(self, rtf: float) -> None:
        self._rtf.observe(rtf)

    def llm_tokens(self, n: int) -> None:
        """A backend sent a chunk covering `n` LLM speech tokens."""
        self._llm_tokens += n

    def backend_job_done(self, outcome: str) -> None:
        """outcome: "finished", "failed", "cancelled" (socket closed, cancel) or "refused" (draining, full)."""
        self._backend_jobs[outcome] += 1

    def loop_lag(self, seconds: float) -> None:
        """One probe of server.loop_lag.LoopLagProbe: its timer ran `seconds` late."""
        self._loop_lags.append(seconds)

    def set_limits(self, max_inflight: int, max_batch: int | None) -> None:
        """The admission limits (--max-inflight, and --max-batch where this process decodes), exposed so a
        load tool can size itself from /metrics (bench.soak runs at 2x the admitted concurrency)."""
        self._max_inflight, self._max_batch = max_inflight, max_batch

    def render_backend(self, stats: EngineStats, max_batch: int) -> str:
        """A backend's /metrics: what an autoscaler reads (KEDA: the queue depth), then the engine's gauges."""
        occupancy = stats.last_decode_batch / max_batch if max_batch > 0 else 0.0
        lines = []
        for name, kind, value, text in (
            ("cosyserve_backend_queue_depth", "gauge", stats.waiting, "jobs waiting for a decode slot"),
            ("cosyserve_backend_running_jobs", "gauge", stats.running, "jobs in the engine's batch"),
            ("cosyserve_backend_batch_occupancy", "gauge", f"{occupancy:.4f}", "last decode batch / max batch"),
            ("cosyserve_backend_llm_tokens_total", "counter", self._llm_tokens,
             "LLM speech tokens streamed (rate() is tokens/s)"),
        ):
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        name = "cosyserve_backend_job_outcomes_total"
        lines += [f"# HELP {name} internal jobs ended, by outcome", f"# TYPE {name} counter"]
        for outcome in ("finished", "failed", "cancelled", "refused"):
            lines.append(f'{name}{{outcome="{outcome}"}} {self._backend_jobs[outcome]}')
        lines += _engine_lines(stats)
        lines += _heap_lines()
        return "\n".join(lines) + "\n"

    def render(self, stats: EngineStats | None, backends: Sequence[Backend] = ()) -> str:
        """`backends`: a frontend's backend table (server/backend_pool.py), whose counters it keeps."""
        lines = ["# TYPE cosyserve_requests_total counter"]
        for (route, status), n in sorted(self._requests.items()):
            lines.append(f'cosyserve_requests_total{{route="{route}",status="{status}"}} {n}')
        lines.append("# TYPE cosyserve_ws_tasks_total counter")
        for outcome, n in sorted(self._ws_tasks.items()):
            lines.append(f'cosyserve_ws_tasks_total{{outcome="{outcome}"}} {n}')
        lines.append("# TYPE cosyserve_errors_total counter")
        for code, n in sorted(self._errors.items()):
            lines.append(f'cosyserve_errors_total{{code="{code}"}} {n}')
        lines += ["# TYPE cosyserve_inflight gauge", f"cosyserve_inflight {self._inflight}",
                  "# TYPE cosyserve_connections gauge", f"cosyserve_connections {self._connections}"]
        name = "cosyserve_connections_cut_total"
        lines += [f"# HELP {name} connections the server ended itself (slow or abusive clients), by reason",
                  f"# TYPE {name} counter"]
        lines += [f'{name}{{reason="{reason}"}} {self._cuts[reason]}' for reason in CUT_REASONS]
        name = "cosyserve_stream_pending_chunks_peak"
        lines += [f"# HELP {name} most engine chunks one stream had queued behind a slow writer",
                  f"# TYPE {name} gauge", f"{name} {self._pending_peak}"]
        lines += self._first_packet_s.render("cosyserve_first_packet_seconds")
        lines += self._rtf.render("cosyserve_rtf")
        lines += self._loop_and_limit_lines()
        lines += _heap_lines()
        if stats is not None:
            lines += _engine_lines(stats)
        if backends:
            lines += _backend_lines(backends)
        return "\n".join(lines) + "\n"

    def _loop_and_limit_lines(self) -> list[str]:
        lag = max(self._loop_lags, default=0.0)
        lines = ["# HELP cosyserve_loop_lag_seconds event-loop lag: the worst of the recent timer probes",
                 "# TYPE cosyserve_loop_lag_seconds gauge", f"cosyserve_loop_lag_seconds {lag:.6f}"]
        for name, value, text in (
            ("cosyserve_max_inflight", self._max_inflight, "synthesis jobs admitted at once (429 past it)"),
            ("cosyserve_max_batch", self._max_batch, "requests decoding at once in this process"),
        ):
            if value is not None:
                lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name} {value}"]
        return lines


def _heap_lines() -> list[str]:
    """The process heap as glibc sees it (kernels/runtime/host_memory.heap_stats): RSS that grows with
    `free` is memory malloc keeps for reuse, not a leak; growth in `in_use` is."""
    heap = heap_stats()
    if heap is None:
        return []
    name = "cosyserve_heap_bytes"
    return [f"# HELP {name} the malloc heap: in_use (live), free (kept for reuse), mmapped (large blocks)",
            f"# TYPE {name} gauge", *(f'{name}{{kind="{kind}"}} {value}' for kind, value in heap.items()),
            "# HELP cosyserve_heap_trims_total free heap pages given back to the kernel (kernels/runtime/heap_trim)",
            "# TYPE cosyserve_heap_trims_total counter", f"cosyserve_heap_trims_total {TRIM_COUNTS.trims}",
            "# TYPE cosyserve_heap_trim_seconds_total counter",
            f"cosyserve_heap_trim_seconds_total {TRIM_COUNTS.seconds:.6f}"]


def _engine_lines(s: EngineStats) -> list[str]:
    gauges = {
        "running": s.running, "waiting": s.waiting, "kv_used_tokens": s.kv_used_tokens,
        "kv_total_tokens": s.kv_total_tokens, "decode_batch": s.last_decode_batch,
        "flow_batch": s.last_flow_batch, "vocoder_batch": s.last_vocoder_batch,
        "flow_cache_bytes": s.flow_cache_bytes, "flow_cache_pool_bytes": s.flow_cache_pool_bytes,
    }
    lines = []
    for key, value in gauges.items():
        lines += [f"# TYPE cosyserve_engine_{key} gauge", f"cosyserve_engine_{key} {value}"]
    lines += ["# TYPE cosyserve_engine_steps_total counter", f"cosyserve_engine_steps_total {s.steps}"]
    lines += ["# HELP cosyserve_engine_flow_advances_total flow calls run ahead of the chunk that emits their frames",
              "# TYPE cosyserve_engine_flow_advances_total counter",
              f"cosyserve_engine_flow_advances_total {s.flow_advances}"]
    for key, value in (("voice_prefix_hits", s.voice_prefix_hits), ("voice_prefix_misses", s.voice_prefix_misses)):
        lines += [f"# TYPE cosyserve_engine_{key}_total counter", f"cosyserve_engine_{key}_total {value}"]
    lines += ["# TYPE cosyserve_engine_voice_prefix_bytes gauge", f"cosyserve_engine_voice_prefix_bytes {s.voice_prefix_bytes}"]
    return lines


_BACKEND_SERIES = (  # (name, type, Backend attribute, help)
    ("cosyserve_backend_inflight", "gauge", "inflight", "this frontend's jobs on the backend now"),
    ("cosyserve_backend_jobs_total", "counter", "jobs", "jobs sent to the backend (retries included)"),
    ("cosyserve_backend_failures_total", "counter", "failed", "refused, reset or busy (503) attempts"),
    ("cosyserve_backend_retries_total", "counter", "retries", "jobs retried elsewhere after failing here"),
    ("cosyserve_backend_ejections_total", "counter", "ejections", "times the backend was ejected"),
    ("cosyserve_backend_chunks_total", "counter", "chunks", "audio chunks received from the backend"),
)


def _backend_lines(backends: Sequence[Backend]) -> list[str]:
    lines = []
    for name, kind, attr, text in _BACKEND_SERIES:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        lines += [f'{name}{{backend="{b.key}"}} {getattr(b, attr)}' for b in backends]
    lines.append("# TYPE cosyserve_backend_up gauge")
    lines += [f'cosyserve_backend_up{{backend="{b.key}"}} {int(b.usable)}' for b in backends]
    return lines
