"""bench.soak: outcome classification, the verdict, window percentiles and the JSON, without a server;
then real runs against a spawned tiny-model server (a short one, and the 2-minute CI soak)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import soak
from bench.load import api_error_code
from bench.load_stats import RequestResult, failed
from bench.soak_outcomes import DOCUMENTED, HUNG_UP, LOST, OK, classify, is_refusal
from bench.soak_report import (
    FD_TOLERANCE,
    build_json,
    compare_window_s,
    first_and_last,
    ttfp_windows,
    verdict,
    warmup_s,
)
from bench.soak_sampler import descendants, open_fds, parse_metrics, rss_mb
from bench.soak_workers import Record, record


def _ok(ttfp_s: float = 0.2) -> RequestResult:
    return RequestResult(ok=True, ttfp_s=ttfp_s, e2e_s=1.0, audio_s=1.0)


# ---------------------------------------------------------------- classification


@pytest.mark.parametrize("result,hung_up,outcome", [
    (_ok(), False, OK),
    (_ok(), True, HUNG_UP),
    (failed("HTTP 429", 0.01, 429, "Overloaded"), False, DOCUMENTED),
    (failed("HTTP 503", 0.01, 503, "Overloaded"), False, DOCUMENTED),
    (failed("HTTP 404", 0.01, 404, "NotFound"), False, DOCUMENTED),
    (failed("HTTP 507", 0.01, 507, "InsufficientStorage"), False, DOCUMENTED),  # an upload, disk full
    (failed("HTTP 429", 0.01, 429, "rate_limit_exceeded"), False, DOCUMENTED),  # /v1's shape
    (failed("HTTP 503", 0.01, 503, "server_error"), False, DOCUMENTED),  # /v1: queue full, draining
    (failed("task-failed Overloaded", 0.5, 0, "Overloaded"), False, DOCUMENTED),  # WebSocket
    (failed("stream error", 0.5, 200, "InvalidParameter"), False, DOCUMENTED),  # SSE error event
    (failed("HTTP 429 <html>", 0.01, 429, ""), False, LOST),  # a refusal without the documented body
    (failed("HTTP 500", 0.01, 500, "InternalError"), False, LOST),
    (failed("HTTP 500", 0.01, 500, "server_error"), False, LOST),
    (failed("HTTP 502", 0.01, 502, ""), False, LOST),
    (failed("stream error", 0.5, 200, "InternalError"), False, LOST),  # the engine failed mid-stream
    (failed("task-failed Cancelled", 0.5, 0, "Cancelled"), False, LOST),
    (failed("ConnectionError: reset", 0.1), False, LOST),
    (failed("ReadTimeout", 60.0), True, LOST),  # a hang-up that never got its first chunk
    (failed("stream ended before its stop event", 0.5), False, LOST),
])  # fmt: skip
def test_classify(result: RequestResult, hung_up: bool, outcome: str) -> None:
    assert classify(result, hung_up) == outcome


def test_refusals_back_off_and_other_errors_do_not() -> None:
    assert is_refusal(failed("", 0, 429, "Overloaded")) and is_refusal(failed("", 0, 0, "Overloaded"))
    assert not is_refusal(failed("", 0, 404, "NotFound")) and not is_refusal(_ok())


@pytest.mark.parametrize("body,code", [
    ('{"code": "Overloaded", "message": "too many", "request_id": "r"}', "Overloaded"),
    ('{"error": {"message": "slow down", "type": "rate_limit_error", "code": null}}', "rate_limit_error"),
    ('{"error": {"message": "m", "type": "invalid_request_error", "code": "voice_not_found"}}',
     "voice_not_found"),
    ('{"code": "Overloaded"}', ""),  # no message: not the documented shape
    ('{"code": "Overloa', ""),  # cut off
    ("[1, 2]", ""),
    ("<html>502 Bad Gateway</html>", ""),
])  # fmt: skip
def test_api_error_code_reads_both_documented_shapes_only(body: str, code: str) -> None:
    assert api_error_code(body) == code


def test_record_keeps_ttfp_of_audio_and_the_error_of_a_loss() -> None:
    r = record("hang_up", "sse", _ok(0.25), 12.0, hung_up=True)
    assert (r.outcome, r.ttfp_ms, r.start_s, r.error) == (HUNG_UP, 250.0, 12.0, "")
    lost = record("sse", "sse", failed("ConnectionError: reset", 0.1), 3.0)
    assert lost.outcome == LOST and math.isnan(lost.ttfp_ms) and "reset" in lost.error
    refused = record("json", "json", failed("HTTP 429: {...}", 0.01, 429, "Overloaded"), 3.0)
    assert refused.outcome == DOCUMENTED and refused.code == "Overloaded" and refused.error == ""


# ---------------------------------------------------------------- windows and verdict


def test_warmup_and_comparison_windows() -> None:
    assert warmup_s(1800) == 180 and compare_window_s(1800, 180) == 162  # 30 min: 10 % of the 27 measured
    assert compare_window_s(480, 60) == 60  # 8 min: a minute (10 % would be 42 s)
    assert warmup_s(120) == 60 and compare_window_s(120, 60) == 30  # 2 min: a minute, then its halves
    assert warmup_s(30) == 15  # never more than half the run
    assert warmup_s(30, override=5) == 5 and compare_window_s(30, 5) == 12.5


def _flat(value: float, end: int = 120, step: int = 2) -> list[list[float]]:
    return [[t, value] for t in range(0, end + 1, step)]


def test_medians_of_the_first_and_last_window_ignore_one_spike() -> None:
    points = _flat(100.0)
    points[-3][1] = 500.0  # one GC/allocator spike in the last window
    assert first_and_last(points, 60, 120, 30) == (100.0, 100.0)
    assert first_and_last([], 60, 120, 30) is None


def _rss(first: float, last: float) -> dict[str, tuple[float, float]]:
    return {"the server": (first, last)}


def test_verdict_passes_flat_series_and_names_each_broken_limit() -> None:
    assert verdict(_rss(1000, 1040), (30, 30 + FD_TOLERANCE), 0, 0, True) == []  # +4 %, +2 fds
    reasons = verdict(_rss(1000, 1060), (30, 30 + FD_TOLERANCE + 1), 2, 1, True)
    assert len(reasons) == 4
    assert "RSS of the server grew 6.0 %" in reasons[0] and "30 -> 33" in reasons[1]
    assert "2 request(s) lost" in reasons[2] and "probe" in reasons[3]
    assert verdict(_rss(1000, 900), (30, 20), 0, 0, True) == []  # shrinking is fine


def test_verdict_without_a_pid_judges_only_requests() -> None:
    assert verdict({"the server": None}, None, 0, 0, process_known=False) == []
    assert verdict({"the server": None}, None, 1, 0, process_known=False) == [
        "1 request(s) lost (no answer, a 5xx, a malformed or cut-off response)"
    ]
    assert "no RSS/fd samples" in verdict({"the server": None}, None, 0, 0, process_known=True)[0]


def _rec(start_s: float, ttfp_ms: float, outcome: str = OK) -> Record:
    return Record(start_s=start_s, kind="sse", op="sse", outcome=outcome, ttfp_ms=ttfp_ms, e2e_s=1.0)


def test_ttfp_windows_group_by_start_time() -> None:
    records = [_rec(t, 100.0 + t) for t in range(60)] + [_rec(70, 500.0), _rec(80, 700.0)]
    records += [_rec(90, math.nan, DOCUMENTED)]  # no audio: not a TTFP sample
    windows = ttfp_windows(records, 120, 60)
    assert [(w["start_s"], w["end_s"], w["requests"]) for w in windows] == [(0, 60, 60), (60, 120, 2)]
    assert windows[0]["p50"] == pytest.approx(129.5) and windows[1]["p50"] == 600.0
    assert windows[1]["p95"] == pytest.approx(690.0)
    assert len(ttfp_windows(records, 1800, 300)) == 6
    assert ttfp_windows([], 30, 60) == [{"start_s": 0, "end_s": 30, "requests": 0,
                                         "p50": None, "p95": None, "p99": None}]  # fmt: skip


def _samples(rss_growth: float = 0.0, fd_growth: int = 0, end: int = 120) -> list[dict]:
    out = []
    for t in range(0, end + 7, 2):  # a few samples after the end: the last requests finishing
        late = t >= end - 30
        out.append({"t_s": float(t), "rss_mb": 1000.0 * (1 + rss_growth * late), "rss_tree_mb": 1100.0,
                    "open_fds": 40 + fd_growth * late + t % 4, "connections": 10 + t % 4, "loop_lag_ms": 3.0,
                    "health_ms": 2.0, "inflight": 8.0, "sent": t, "ok": t // 2, "documented_error": t // 2,
                    "client_disconnect": 0, "lost": 0})  # fmt: skip
    return out


def test_json_has_the_issue_fields_and_the_verdict() -> None:
    records = [_rec(t, 200.0) for t in range(120)] + [_rec(5, math.nan, DOCUMENTED)]
    meta = {"pid": 123, "workers": 16, "admitted_concurrency": 8}
    out = build_json(records, _samples(), [], 120.0, None, meta)
    assert out["minutes"] == 2 and out["warmup_s"] == 60 and out["pass"] and out["reasons"] == []
    assert {k: out["requests"][k] for k in ("sent", "ok", "documented_errors", "lost")} == {
        "sent": 121, "ok": 120, "documented_errors": 1, "lost": 0}  # fmt: skip
    for key in ("rss_mb", "open_fds", "loop_lag_ms", "fds_less_connections"):
        assert all(len(p) == 2 and p[0] <= 120 for p in out[key]), key  # [seconds, value], not past the end
    assert out["rss_growth_pct_after_warmup"] == 0 and out["fd_growth_after_warmup"] == 0
    assert out["ttfp_ms"]["window_s"] == 60 and len(out["ttfp_ms"]["windows"]) == 2
    assert out["counts"]["columns"][0] == "t_s" and out["limits"]["rss_growth_pct"] == 5
    json.dumps(out, allow_nan=False)  # strict JSON: no NaN


def test_json_fails_on_growth_and_notes_a_missing_pid() -> None:
    out = build_json([], _samples(rss_growth=0.08, fd_growth=5), [], 120.0, None, {"pid": 123})
    assert not out["pass"] and out["rss_growth_pct_after_warmup"] == pytest.approx(8.0)
    assert out["fd_growth_after_warmup"] == 5 and len(out["reasons"]) == 2
    blind = [{**s, "rss_mb": None, "rss_tree_mb": None, "open_fds": None} for s in _samples()]
    out = build_json([], blind, ["60 s /health: ReadTimeout"], 120.0, None, {"pid": None})
    assert out["rss_mb"] == [] and out["rss_growth_pct_after_warmup"] is None
    assert not out["pass"] and "probe" in out["reasons"][0] and "no server pid" in out["notes"][-1]


def test_plot_writes_a_png(tmp_path: Path) -> None:
    from bench.soak_plot import plot

    out = build_json([_rec(t, 200.0) for t in range(120)], _samples(), [], 120.0, None, {"pid": 1})
    plot(out, tmp_path / "soak.png")
    assert (tmp_path / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- sampler pieces


def test_parse_metrics_keeps_labels_and_skips_comments() -> None:
    text = ("# TYPE cosyserve_inflight gauge\ncosyserve_inflight 3\ncosyserve_loop_lag_seconds 0.012500\n"
            'cosyserve_errors_total{code="Overloaded"} 7\n')  # fmt: skip
    assert parse_metrics(text) == {"cosyserve_inflight": 3.0, "cosyserve_loop_lag_seconds": 0.0125,
                                   'cosyserve_errors_total{code="Overloaded"}': 7.0}  # fmt: skip


def test_proc_readers_on_this_process_and_a_child() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in descendants(os.getpid())
        assert (rss_mb(os.getpid()) or 0) > 10 and (open_fds(os.getpid()) or 0) >= 3
    finally:
        child.kill()
        child.wait()
    assert rss_mb(child.pid) is None and open_fds(child.pid) is None  # gone: None, not an exception


def test_cli_rejects_bad_arguments() -> None:
    for argv in (["--json", "x.json"],  # no length
                 ["--minutes", "1", "--json", "x.json", "--pid", "1"],  # a spawned server's pid is known
                 ["--minutes", "1", "--json", "x.json", "--mix", "sse=1,bogus=2"],
                 ["--minutes", "0", "--json", "x.json"]):  # fmt: skip
        with pytest.raises(SystemExit):
            soak.parse_args(argv)
    assert soak.parse_args(["--seconds", "30", "--json", "x", "--mix", "sse=3,ws"]).mix == {"sse": 3, "ws": 1}


# ---------------------------------------------------------------- real runs (tiny model, CPU)


def _check_fields(result: dict) -> None:
    assert {"sent", "ok", "documented_errors", "lost"} <= set(result["requests"])
    n = result["requests"]
    assert n["sent"] == n["ok"] + n["documented_errors"] + n["lost"] + n["client_disconnects"] > 0
    for key in ("rss_mb", "open_fds", "loop_lag_ms", "health_ms"):
        assert result[key] and all(len(p) == 2 for p in result[key]), key
    assert isinstance(result["rss_growth_pct_after_warmup"], float)
    assert result["ttfp_ms"]["windows"] and result["ttfp_ms"]["windows"][0]["p50"] is not None
    assert result["meta"]["workers"] == 2 * result["meta"]["admitted_concurrency"]


@pytest.mark.soak
def test_short_soak_of_a_running_server_by_url_and_pid(tmp_path: Path) -> None:
    """--url/--pid: 20 s against a server started here; too short for a settled RSS (a cold server's heap
    grows for its first minute), so the verdict is only checked to match the exit code."""
    from bench.servers import spawn_server

    with spawn_server(extra=["--max-inflight", "3"], max_batch=3, startup_timeout_s=120) as srv:
        rc = soak.main(["--seconds", "20", "--warmup-s", "8", "--sample-s", "1", "--url", srv.url,
                        "--token", srv.token, "--pid", str(srv.pid), "--json", str(tmp_path / "s.json"),
                        "--quiet"])  # fmt: skip
    result = json.loads((tmp_path / "s.json").read_text())
    _check_fields(result)
    assert result["meta"]["workers"] == 6 and result["meta"]["pid"] == srv.pid
    assert result["requests"]["lost"] == 0, result["requests"]["lost_examples"]
    assert not result["probe_failures"]
    assert rc == (0 if result["pass"] else 1)
    assert all(r.startswith("RSS") for r in result["reasons"]), result["reasons"]
    assert (tmp_path / "s.png").stat().st_size > 10_000


@pytest.mark.soak
def test_two_minute_soak_passes(tmp_path: Path) -> None:
    """The issue's CI run: `python -m bench.soak --minutes 2` (its own tiny-model server): nothing lost,
    no probe failed, fds flat. Its RSS verdict is reported, not judged: RSS moves by hundreds of MiB from
    sample to sample as flow caches are mapped and unmapped (kernels/runtime/host_buffers.py), and a
    2-minute run compares two 30-second medians of that; the 30-minute run's minute-long windows judge it
    (bench/results/2026-12-07-cpu2-soak.md)."""
    start = time.monotonic()
    rc = soak.main(["--minutes", "2", "--json", str(tmp_path / "soak.json"), "--quiet"])
    result = json.loads((tmp_path / "soak.json").read_text())
    _check_fields(result)
    assert result["requests"]["lost"] == 0, result["requests"]["lost_examples"]
    assert not result["probe_failures"], result["probe_failures"]
    assert all(r.startswith("RSS") for r in result["reasons"]), result["reasons"]  # fds did not grow
    assert rc == (0 if result["pass"] else 1)
    assert time.monotonic() - start < 300
