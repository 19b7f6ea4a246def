"""RESULTS_DIR/summary.md from the JSON files of a bench/gpu/run.sh run (standard library only).

    python bench/gpu/summary.py RESULTS_DIR      (or: python -m bench.gpu.summary RESULTS_DIR)

Reads env.json, checks/*.json, checkpoint.json, pytest.xml (or, cut short, the pytest log),
engine.json, engine-nographs.json, load-server.json, load-*.json, profile.json: whatever exists.
Writes pytest.json (counts + failures) and summary.md: where (card, driver, torch, CUDA, Python,
commit, date), which checks completed or were cut short, rows in the columns of ANCHORS.md
(system | model | GPU | C | TTFP p50 | throughput | note) ready to paste, then the details.
"""

from __future__ import annotations

import json
import math
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ANCHOR_HEADER = "| system | model | GPU | C | TTFP p50 | throughput | note |\n| --- | --- | --- | --- | --- | --- | --- |"
CHECK_ORDER = ("install", "env", "pytest", "checkpoint", "engine", "engine-nographs", "load", "profile")


def load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def num(v: Any, digits: int = 0) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


def short_gpu(env: dict[str, Any]) -> str:
    card = env.get("card") or env.get("torch_device") or "CPU"
    return str(card).removeprefix("NVIDIA ").strip() or "CPU"


# ---------------------------------------------------------------- pytest


PYTEST_LINE = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")


def pytest_result(out: Path) -> dict[str, Any] | None:
    """Counts from the junit XML; when the run was cut short (no XML), from the -v lines of its log."""
    xml = out / "pytest.xml"
    if xml.exists():
        try:
            root = ET.parse(xml).getroot()
        except ET.ParseError:
            root = None
        if root is not None:
            suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
            counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
            failed = [
                f"{case.get('classname')}::{case.get('name')}"
                for case in root.iter("testcase")
                if case.find("failure") is not None or case.find("error") is not None
            ]
            skip_reasons = sorted({(s.get("message") or "")[:120] for s in root.iter("skipped")})
            passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
            return {"source": "junit", "passed": passed, "failed": counts["failures"], "errors": counts["errors"],
                    "skipped": counts["skipped"], "total": counts["tests"],
                    "seconds": sum(float(s.get("time", 0)) for s in suites),
                    "failures": failed, "skip_reasons": skip_reasons[:5], "complete": True}
    log = out / "checks" / "pytest.log"
    if not log.exists():
        return None
    status: dict[str, str] = {}
    for line in log.read_text(errors="replace").splitlines():
        m = PYTEST_LINE.match(line)
        if m:
            status[m.group(1)] = m.group(2)
    values = list(status.values())
    return {"source": "log (cut short: no junit XML)", "passed": values.count("PASSED"),
            "failed": values.count("FAILED"), "errors": values.count("ERROR"), "skipped": values.count("SKIPPED"),
            "total": len(values), "seconds": None,
            "failures": [k for k, v in status.items() if v in ("FAILED", "ERROR")], "skip_reasons": [],
            "complete": False}


# ---------------------------------------------------------------- rows


def graphs(meta: dict[str, Any]) -> str:
    if "gpu" not in meta:
        return "CPU (no CUDA graphs)"
    return f"CUDA graphs {'on' if meta.get('cuda_graphs') else 'off'}"


def engine_rows(eng: dict[str, Any], label: str, model: str, gpu: str) -> list[str]:
    batched = [r for r in eng.get("runs", []) if r["mode"] == "batched"]
    seq = [r for r in eng.get("runs", []) if r["mode"] == "sequential"]
    if not batched:
        return []
    m = eng.get("meta", {})
    cs = " / ".join(str(r["concurrency"]) for r in batched)
    ttfc = " / ".join(num(r["ttfc_ms"]["p50"]) for r in batched) + " ms (first chunk)"
    rate = " / ".join(num(r["speech_seconds_per_second"], 1) for r in batched) + " ×RT"
    notes = [f"{m.get('tokens_per_request', '?')} fixed tokens/request", graphs(m)]
    if seq:
        notes.append("one-at-a-time: " + ", ".join(
            f"C{r['concurrency']} {num(r['speech_seconds_per_second'], 1)} ×RT" for r in seq))
    peaks = [r["gpu_peak_mb"] for r in batched if r.get("gpu_peak_mb") is not None]
    if peaks:
        notes.append(f"peak GPU {num(max(peaks) / 1024, 1)} GiB")
    if not eng.get("complete", True):
        notes.append("cut short")
    return [f"| {label} | {model} | {gpu} | {cs} | {ttfc} | {rate} | {'; '.join(notes)} |"]


def load_levels(out: Path) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(file stem, level, meta) of every load-*.json, SSE first, then open loop, then WS, by C."""
    rows = []
    for path in sorted(out.glob("load-*.json")):
        if path.name == "load-server.json":
            continue
        data = load_json(path)
        if not data:
            continue
        for lv in data.get("levels", []):
            rows.append((path.stem, lv, data.get("meta", {})))
    order = {"sse": 0, "ws": 2, "json": 3}
    return sorted(rows, key=lambda t: (order.get(t[1]["protocol"], 4) if t[1].get("rate") is None else 1,
                                       t[1]["concurrency"], t[1].get("rate") or 0))


def load_rows(levels: list[tuple[str, dict[str, Any], dict[str, Any]]], model: str, gpu: str,
              server: dict[str, Any] | None) -> list[str]:
    rows = []
    texts = levels[0][2].get("texts", "?") if levels else "?"
    batch = f"--max-batch {server['max_batch']}" if server and server.get("max_batch") else ""
    for proto in ("sse", "ws", "json"):
        closed = [lv for _, lv, _ in levels if lv["protocol"] == proto and lv.get("rate") is None]
        if not closed:
            continue
        cs = " / ".join(str(lv["concurrency"]) for lv in closed)
        ttfp = " / ".join(num(lv["ttfp_ms"]["p50"]) for lv in closed) + " ms"
        rate = " / ".join(num(lv["x_realtime"], 1) for lv in closed) + " ×RT"
        under = " / ".join(str(lv["underruns"]) for lv in closed)
        errors = sum(lv["errors"] for lv in closed)
        note = f"{proto.upper()} closed loop, {texts} texts, {batch}; underruns {under}" + (
            f"; {errors} errors" if errors else "")
        rows.append(f"| cosyserve API | {model} | {gpu} | {cs} | {ttfp} | {rate} | {note} |")
    for _, lv, _ in levels:
        if lv.get("rate") is None:
            continue
        note = (f"{lv['protocol'].upper()} open loop (Poisson), at most {lv['concurrency']} in flight, {texts} texts; "
                f"p50 {num(lv['ttfp_ms']['p50'])} ms; {lv['underruns']} underruns"
                + (f"; {lv['errors']} errors" if lv["errors"] else ""))
        rows.append(f"| cosyserve API, open loop | {model} | {gpu} | {num(lv['rate'], 1)} RPS | "
                    f"p95 {num(lv['ttfp_ms']['p95'])} ms | {num(lv['x_realtime'], 1)} ×RT at {num(lv['rate'], 1)} RPS | {note} |")
    return rows


# ---------------------------------------------------------------- details


def engine_detail(eng: dict[str, Any], title: str) -> list[str]:
    lines = [f"### {title}", "",
             ("| C | mode | req | wall s | speech s/s | LLM tok/s | TTFC p50 / p95 ms | decode B | "
             "prefill / decode / sample / flow / vocoder s | peak GPU MiB |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in eng.get("runs", []):
        s = r.get("stage_seconds", {})
        stages = " / ".join(num(s.get(k), 2) for k in ("prefill_s", "decode_s", "sample_s", "flow_s", "vocoder_s"))
        lines.append(
            f"| {r['concurrency']} | {r['mode']} | {r['requests']} | {num(r['wall_s'], 1)} | "
            f"{num(r['speech_seconds_per_second'], 2)} | {num(r['llm_tokens_per_second'], 0)} | "
            f"{num(r['ttfc_ms']['p50'])} / {num(r['ttfc_ms']['p95'])} | {num(r['decode_batch_mean'], 1)} | "
            f"{stages} | {num(r.get('gpu_peak_mb'))} |")
    if not eng.get("complete", True):
        lines.append("\n(cut short: the levels above are the ones that finished)")
    return lines + [""]


def load_detail(levels: list[tuple[str, dict[str, Any], dict[str, Any]]]) -> list[str]:
    lines = [("| protocol | C | rate/s | req | err | TTFP p50 / p95 / p99 ms | E2E p50 ms | RTF p50 | ×RT | "
             "underruns (streams) |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for _, lv, _ in levels:
        t = lv["ttfp_ms"]
        lines.append(
            f"| {lv['protocol']} | {lv['concurrency']} | {num(lv.get('rate'), 1)} | {lv['requests']} | {lv['errors']} | "
            f"{num(t['p50'])} / {num(t['p95'])} / {num(t['p99'])} | {num(lv['e2e_ms']['p50'])} | "
            f"{num(lv['rtf_p50'], 3)} | {num(lv['x_realtime'], 1)} | {lv['underruns']} ({lv['streams_with_underrun']}) |")
    return lines + [""]


def summarize(out: Path) -> str:
    env = load_json(out / "env.json") or {}
    checks = {p.stem: load_json(p) for p in (out / "checks").glob("*.json")} if (out / "checks").is_dir() else {}
    ckpt = load_json(out / "checkpoint.json")
    eng = load_json(out / "engine.json")
    nog = load_json(out / "engine-nographs.json")
    server = load_json(out / "load-server.json")
    prof = load_json(out / "profile.json")
    tests = pytest_result(out)
    if tests is not None:
        (out / "pytest.json").write_text(json.dumps(tests, indent=1) + "\n")
    levels = load_levels(out)

    gpu = short_gpu(env)
    model = next((m.get("model") for m in ([(eng or {}).get("meta", {})] + [lv[2] for lv in levels]) if m.get("model")),
                 "CosyVoice2-0.5B random weights")
    commit = env.get("commit", "unknown")
    date = env.get("date", "?")
    md = [f"# GPU run: {env.get('card', 'unknown card')}, {date[:10]}", ""]
    md += [
        f"- card: {env.get('card', '?')} (driver {env.get('driver', '-')}, {env.get('gpu_memory') or num(env.get('torch_device_mb')) + ' MiB'})",
        (f"- torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda') or '-'}, flash-attn {env.get('flash_attn', '-')}), "
        f"Python {env.get('python', '?')}, CPU {env.get('cpu', '?')} x{env.get('cpu_count', '?')}"),
        f"- commit {commit}, date {date}" + (" — ALLOW_CPU: a CPU proof run, not GPU numbers" if env.get("allow_cpu") else ""),
        f"- model: {model}",
    ]
    if env.get("missing_modules"):
        md.append(f"- **missing Python modules**: {', '.join(env['missing_modules'])}")
    if ckpt:
        made = "reused" if ckpt.get("reused") else f"made in {ckpt.get('seconds')} s ({num((ckpt.get('bytes') or 0) / 2**30, 2)} GiB)"
        md.append(f"- checkpoint {ckpt.get('model_dir')}: {made}")
    if server:
        md.append(f"- server: --max-batch {server.get('max_batch')}, healthy after {server.get('startup_s')} s")

    md += ["", "## Checks", "", "| check | status | seconds | budget s (cap) | note |", "| --- | --- | --- | --- | --- |"]
    for name in sorted(checks, key=lambda n: (CHECK_ORDER.index(n) if n in CHECK_ORDER else 99, n)):
        c = checks[name] or {}
        status = c.get("status", "?")
        mark = {"ok": "completed", "timeout": "**cut short** (time budget)", "failed": "**failed**"}.get(status, status)
        md.append(f"| {name} | {mark} (rc {c.get('rc')}) | {c.get('seconds')} | {c.get('budget_s')} ({c.get('cap_s')}) | {c.get('note', '')} |")
    done = [n for n, c in checks.items() if (c or {}).get("status") == "ok"]
    cut = [n for n, c in checks.items() if (c or {}).get("status") != "ok"]
    md += ["", (f"Completed: {', '.join(sorted(done, key=_order)) or 'none'}. "
               f"Not completed: {', '.join(sorted(cut, key=_order)) or 'none'}."), ""]

    md += ["## In the columns of ANCHORS.md (paste into bench/results/ and the README)", "", ANCHOR_HEADER]
    rows = load_rows(levels, model, gpu, server)
    if eng:
        rows += engine_rows(eng, "cosyserve engine (no HTTP)", model, gpu)
    if nog:
        rows += engine_rows(nog, "cosyserve engine (no HTTP), CUDA graphs off", model, gpu)
    md += rows or ["| (no results) | | | | | | |"]
    md += ["", (f"commit {commit}; TTFP = request sent -> first audio byte; engine rows: time to first chunk, "
               "speech-seconds per second; ×RT = audio seconds per wall second, all streams together."), ""]

    md += ["## Correctness (tests/test_kernels_gpu.py)", ""]
    if tests:
        md.append(f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                  f"{tests['skipped']} skipped of {tests['total']} (from {tests['source']})")
        md += [f"- FAILED {f}" for f in tests["failures"]]
        md += [f"- skipped: {r}" for r in tests["skip_reasons"]]
    else:
        md.append("not run")
    md.append("")

    md += ["## Engine alone (bench.engine)", ""]
    if eng:
        md += engine_detail(eng, graphs(eng.get("meta", {})))
    if nog:
        md += engine_detail(nog, graphs(nog.get("meta", {})))
    if not eng and not nog:
        md += ["not run", ""]

    md += ["## API under load (bench.load)", ""]
    md += load_detail(levels) if levels else ["not run", ""]

    md += ["## Profile", ""]
    if prof:
        md.append(f"{prof['steps_profiled']} LLM steps at C{prof['concurrency']} ({prof['device']}, CUDA graphs "
                  f"{prof['cuda_graphs']}, overlapped stages {prof['overlap_stages']}): mean step "
                  f"{num(prof['step_ms']['mean'], 2)} ms, max {num(prof['step_ms']['max'], 2)} ms; trace "
                  f"{prof.get('trace') or 'dropped (too large)'} ({prof.get('trace_mb')} MB); table: profile.txt")
        md += ["", "| op | calls | CPU total ms | device total ms |", "| --- | --- | --- | --- |"]
        md += [f"| {o['name'][:60]} | {o['calls']} | {num(o['cpu_total_ms'], 1)} | {num(o['device_total_ms'], 1)} |"
               for o in prof.get("top_ops", [])[:10]]
    else:
        md.append("not run")
    text = "\n".join(md) + "\n"
    (out / "summary.md").write_text(text)
    return text


def _order(name: str) -> int:
    return CHECK_ORDER.index(name) if name in CHECK_ORDER else 99


def main(argv: list[str] | None = None) -> str:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python bench/gpu/summary.py RESULTS_DIR")
    text = summarize(Path(args[0]))
    print(text)
    return text


if __name__ == "__main__":
    main()
