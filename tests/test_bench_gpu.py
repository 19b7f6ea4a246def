"""bench/gpu: summary.md from synthetic result files, and run.sh's deadline plan (--dry-run). No model, no GPU."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu import summary

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _level(proto: str, c: int, ttfp: float, xrt: float, rate: float | None = None, underruns: int = 0) -> dict:
    return {
        "protocol": proto, "concurrency": c, "requests": max(c, 12), "errors": 0,
        "ttfp_ms": {"p50": ttfp, "p95": ttfp * 2, "p99": ttfp * 3}, "e2e_ms": {"p50": 900.0, "p95": 1200.0},
        "rtf_p50": 0.15, "x_realtime": xrt, "requests_per_s": 2.0, "underruns": underruns,
        "underrun_stall_s": 0.0, "streams_with_underrun": min(underruns, 1), "audio_s": 60.0, "wall_s": 5.0,
        "rate": rate, "error_samples": [],
    }


def _engine_run(mode: str, c: int, rate: float, ttfc: float, peak: float | None = 2048.0) -> dict:
    run = {
        "mode": mode, "concurrency": c, "requests": c, "wall_s": 1.5, "speech_seconds": 4.0 * c, "llm_tokens": 100 * c,
        "speech_seconds_per_second": rate, "llm_tokens_per_second": 25 * rate, "llm_stage_tokens_per_second": None,
        "ttfc_ms": {"p50": ttfc, "p95": ttfc * 1.5}, "decode_batch_mean": float(c), "flow_batch_mean": 1.0,
        "vocoder_batch_mean": 1.0, "steps": 100,
        "stage_seconds": {"prefill_s": 0.01, "decode_s": 0.5, "sample_s": 0.1, "flow_s": 0.3, "vocoder_s": 0.2,
                          "step_s": 1.1},
    }
    if peak is not None:
        run["gpu_peak_mb"] = peak
    return run


@pytest.fixture
def results(tmp_path: Path) -> Path:
    out = tmp_path / "h100"
    _write(out / "env.json", {"date": "2026-12-07T10:00:00+00:00", "commit": "abc1234", "python": "3.12.3",
                              "card": "NVIDIA H100 80GB HBM3", "driver": "550.54.15", "gpu_memory": "81559 MiB",
                              "torch": "2.11.0+cu128", "torch_cuda": "12.8", "flash_attn": False, "cpu": "Xeon",
                              "cpu_count": 16, "allow_cpu": False})
    checks = {"install": ("ok", 0, 30), "env": ("ok", 0, 3), "pytest": ("timeout", 124, 90),
              "checkpoint": ("ok", 0, 25), "engine": ("ok", 0, 80), "engine-nographs": ("ok", 0, 40),
              "load": ("timeout", 124, 170), "profile": ("skipped", None, 0)}
    for name, (status, rc, secs) in checks.items():
        _write(out / "checks" / f"{name}.json", {"name": name, "status": status, "rc": rc, "cap_s": 90,
                                                 "budget_s": 90, "seconds": secs, "note": f"{name} note"})
    # pytest cut short: no junit XML, only its -v log
    (out / "checks" / "pytest.log").write_text(
        "tests/test_kernels_gpu.py::test_a PASSED [ 10%]\n"
        "tests/test_kernels_gpu.py::test_b[cuda] FAILED [ 20%]\n"
        "tests/test_kernels_gpu.py::test_c SKIPPED (no flash-attn) [ 30%]\n"
        "PASSED tests/test_kernels_gpu.py::test_a\n"
    )
    _write(out / "checkpoint.json", {"model_dir": "models/random-0.5b", "reused": False, "seconds": 21,
                                     "bytes": 2 * 2**30})
    meta = {"model": "CosyVoice2-0.5B full-size random weights", "tokens_per_request": 100, "cuda_graphs": True,
            "gpu": "NVIDIA H100 80GB HBM3", "gpu_total_mb": 81559}
    _write(out / "engine.json", {"runs": [_engine_run("batched", 1, 20.0, 45.0), _engine_run("sequential", 1, 19.0, 46.0),
                                          _engine_run("batched", 8, 110.0, 60.0, 4096.0)],
                                 "ratios": {}, "meta": meta, "complete": False})
    _write(out / "engine-nographs.json", {"runs": [_engine_run("batched", 1, 8.0, 90.0)], "ratios": {},
                                          "meta": {**meta, "cuda_graphs": False}, "complete": True})
    _write(out / "load-server.json", {"max_batch": 64, "startup_s": 31.5, "healthy": True})
    lmeta = {"model": "CosyVoice2-0.5B full-size random weights", "texts": "medium"}
    _write(out / "load-sse-c4.json", {"levels": [_level("sse", 4, 80.0, 35.0)], "meta": lmeta})
    _write(out / "load-sse-c1.json", {"levels": [_level("sse", 1, 50.0, 10.0)], "meta": lmeta})
    _write(out / "load-sse-c64-r15.json", {"levels": [_level("sse", 64, 120.0, 90.0, rate=15.0, underruns=3)],
                                           "meta": lmeta})
    _write(out / "load-ws-c1.json", {"levels": [_level("ws", 1, 55.0, 9.5)], "meta": lmeta})
    _write(out / "profile.json", {"steps_profiled": 50, "concurrency": 32, "device": "cuda", "cuda_graphs": True,
                                  "overlap_stages": True, "step_ms": {"mean": 7.25, "max": 9.0},
                                  "trace": "trace.json.gz", "trace_mb": 3.1,
                                  "top_ops": [{"name": "flow.estimator", "calls": 50, "cpu_total_ms": 10.0,
                                               "device_total_ms": 120.5}]})
    return out


def test_summary_header_checks_and_anchor_rows(results: Path) -> None:
    text = summary.main([str(results)])
    assert (results / "summary.md").read_text() == text
    assert text.startswith("# GPU run: NVIDIA H100 80GB HBM3, 2026-12-07")
    for fact in ("driver 550.54.15", "torch 2.11.0+cu128", "CUDA 12.8", "Python 3.12.3", "commit abc1234",
                 "made in 21 s (2.00 GiB)", "healthy after 31.5 s"):
        assert fact in text, fact
    # which checks completed, which were cut short
    assert "| pytest | **cut short** (time budget) (rc 124) |" in text
    assert "| profile | skipped (rc None) |" in text
    assert "Completed: install, env, checkpoint, engine, engine-nographs." in text
    assert "Not completed: pytest, load, profile." in text
    # rows in ANCHORS.md's columns, SSE first, then WS, open loop, engine
    anchors = text.split(summary.ANCHOR_HEADER, 1)[1].split("\n\n", 1)[0].strip().splitlines()
    assert all(len(r.split(" | ")) == 7 for r in anchors)
    model, gpu = "CosyVoice2-0.5B full-size random weights", "H100 80GB HBM3"
    assert anchors[0].startswith(f"| cosyserve API | {model} | {gpu} | 1 / 4 | 50 / 80 ms | 10.0 / 35.0 ×RT | SSE")
    assert anchors[1].startswith(f"| cosyserve API | {model} | {gpu} | 1 | 55 ms | 9.5 ×RT | WS")
    assert anchors[2].startswith(f"| cosyserve API, open loop | {model} | {gpu} | 15.0 RPS | p95 240 ms | 90.0 ×RT")
    assert "3 underruns" in anchors[2]
    assert anchors[3].startswith(f"| cosyserve engine (no HTTP) | {model} | {gpu} | 1 / 8 | 45 / 60 ms (first chunk) "
                                 "| 20.0 / 110.0 ×RT |")
    assert "one-at-a-time: C1 19.0 ×RT" in anchors[3] and "peak GPU 4.0 GiB" in anchors[3]
    assert "cut short" in anchors[3]
    assert "CUDA graphs off" in anchors[4] and "8.0 ×RT" in anchors[4]


def test_pytest_counts_from_a_cut_short_log(results: Path) -> None:
    summary.main([str(results)])
    counts = json.loads((results / "pytest.json").read_text())
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["total"]) == (1, 1, 1, 3)
    assert counts["failures"] == ["tests/test_kernels_gpu.py::test_b[cuda]"] and counts["complete"] is False
    assert "FAILED tests/test_kernels_gpu.py::test_b[cuda]" in (results / "summary.md").read_text()


def test_pytest_counts_from_junit(tmp_path: Path) -> None:
    (tmp_path / "pytest.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite tests="4" failures="1" errors="0" skipped="1" time="12.5">'
        '<testcase classname="tests.test_kernels_gpu" name="test_a"/>'
        '<testcase classname="tests.test_kernels_gpu" name="test_b"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_kernels_gpu" name="test_c"><skipped message="needs a CUDA GPU"/></testcase>'
        '<testcase classname="tests.test_kernels_gpu" name="test_d"/></testsuite></testsuites>'
    )
    counts = summary.pytest_result(tmp_path)
    assert counts is not None
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["total"]) == (2, 1, 1, 4)
    assert counts["failures"] == ["tests.test_kernels_gpu::test_b"] and counts["skip_reasons"] == ["needs a CUDA GPU"]


def test_summary_of_an_empty_dir_says_nothing_ran(tmp_path: Path) -> None:
    text = summary.main([str(tmp_path)])
    assert "| (no results) |" in text and text.count("not run") >= 4


PLAN_LINE = re.compile(r"^(\S+)\s+start\s+(\d+) s\s+budget\s+(\d+) s \(cap (\d+)\)$")


def _plan(tmp_path: Path, **env: str) -> tuple[list[tuple[str, int, int, int]], list[str], str]:
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    done = subprocess.run(
        ["bash", str(REPO / "bench/gpu/run.sh"), "--dry-run", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, "PYTHON": sys.executable, **env},
    )
    planned, skipped = [], []
    for line in done.stdout.splitlines():
        if m := PLAN_LINE.match(line):
            planned.append((m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))))
        elif " skipped: " in line:
            skipped.append(line.split()[0])
    return planned, skipped, done.stdout


def test_dry_run_plan_fits_the_deadline_in_order_of_value(tmp_path: Path) -> None:
    planned, _, out = _plan(tmp_path, ALLOW_CPU="0", DEADLINE_S="520", RESERVE_S="15")
    names = [p[0] for p in planned]
    order = ["env", "pytest", "checkpoint", "engine", "engine-nographs", "load", "profile"]
    assert names == [n for n in order if n in names] and names[:4] == order[:4]
    for (_, start, budget, cap), nxt in zip(planned, planned[1:] + [None]):
        assert budget <= cap
        if nxt is not None:
            assert nxt[1] == start + budget  # worst case: each check uses its whole budget
    last = planned[-1]
    assert last[1] + last[2] <= 520 - 15  # the summary's reserve is left
    assert "summary" in out and "deadline 520 s" in out


def test_dry_run_short_deadline_cuts_the_least_valuable_checks(tmp_path: Path) -> None:
    planned, skipped, _ = _plan(tmp_path, ALLOW_CPU="0", DEADLINE_S="300", RESERVE_S="15")
    assert [p[0] for p in planned][:3] == ["env", "pytest", "checkpoint"]
    assert "profile" in skipped and "load" in skipped
    assert planned[-1][1] + planned[-1][2] <= 285
    assert planned[-1][2] < planned[-1][3]  # the last one gets what is left, less than its cap


def test_dry_run_caps_override(tmp_path: Path) -> None:
    planned, _, _ = _plan(tmp_path, ALLOW_CPU="1", CAPS_S="10 10 10 10 10 10 40 20", DEADLINE_S="520")
    assert {p[0]: p[3] for p in planned}["load"] == 40
