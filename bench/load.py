"""End-to-end load generator: first-packet latency, RTF, aggregate ×RT and underruns over the real API.

    python -m bench.load --url URL --token T --protocol sse,ws,openai --concurrency 1,4,16 --requests 16 \
        [--rate R] [--json F] [--plot F] [--markdown F] [--compare URL] \
        [--baseline-url URL | --spawn-baseline] [--spawn [--model-dir M]] [--split 1,2] [--overload K]

Closed loop (default): C workers, each sends its next request when its previous one finishes, until
max(N, C) requests are done for the level. Open loop (`--rate R`): Poisson arrivals at R req/s, at most
C in flight; latency counts from the *scheduled* arrival, so client-side queueing is not hidden.
Each request asks for pcm at 24 kHz so audio seconds are exact (bytes / 2 / 24000). TTFP = request
start (connect included) -> first audio byte decoded. Protocols: `sse` / `json` (the PAI HTTP route,
streamed / one response), `ws` (its WebSocket duplex), `openai` (POST /v1/audio/speech, raw pcm
streamed with `stream_format: "audio"`: TTFP is the first body byte). Underruns: bench.load_stats.simulate_playback.
Targets (main, baseline, compare, split-N) never run at once (they share the machine): levels alternate
between them. `--split 1,2` spawns, beside main, a `--role frontend` over 1 and over 2 `--role backend`s (one
shared model) and reports the hop's cost: TTFP p50 and ×RT of each split level against main's.
`--overload K`: after each level, K×C requests at once (C = the level's concurrency: give the server's
--max-inflight): how many are refused and by which status, how fast (request start to the refusal,
p50/p99), and the admitted ones' TTFP against the level just measured (C at once, unloaded).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import shlex
import signal
import sys
import tempfile
import threading
import time
import uuid
import wave
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import requests
import websocket

from bench import texts
from bench.load_stats import (
    LevelStats,
    OverloadStats,
    RequestResult,
    aggregate,
    failed,
    markdown,
    overload_stats,
    request_result,
)
from bench.outputs import write_json
from bench.provenance import commit, machine, now_iso
from bench.servers import build_tiny_model, spawn_server, spawn_split

SAMPLE_RATE = 24000
MODEL = "CosyVoice2-0.5B"
PROTOCOLS = ("sse", "ws", "json", "openai")


# ---------------------------------------------------------------- reference voice


def prompt_wav(seconds: float = 3.0, rate: int = 16000) -> bytes:
    """A deterministic voiced signal: a gliding ~120 Hz harmonic stack with syllable-rate (4 Hz)
    amplitude bursts, so the server's VAD-free feature extraction sees speech-like energy."""
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120.0 + 20.0 * np.sin(2 * np.pi * 0.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 * (1 - np.cos(2 * np.pi * 4.0 * t)) * np.minimum(1.0, np.minimum(t, seconds - t) * 20)
    pcm = (0.25 * voiced * envelope / np.abs(voiced).max() * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


@dataclass(frozen=True)
class Target:
    name: str  # "main", "baseline", "compare", "split-N"
    url: str
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def upload_voice(target: Target) -> str:
    r = requests.post(
        f"{target.url}/api/v1/audio/reference_audio",
        headers=target.auth,
        timeout=120,
        files={"file": ("bench-prompt.wav", prompt_wav(), "audio/wav")},
        data={"text": texts.PROMPT_TEXT},
    )
    r.raise_for_status()
    return str(r.json()["id"])


def delete_voice_request(target: Target, voice_id: str, timeout_s: float = 30) -> requests.Response:
    return requests.delete(
        f"{target.url}/api/v1/audio/reference_audio/{voice_id}", headers=target.auth, timeout=timeout_s
    )


def delete_voice(target: Target, voice_id: str) -> None:
    try:
        delete_voice_request(target, voice_id)
    except requests.RequestException as exc:  # cleanup must not hide the results
        print(f"warning: could not delete voice {voice_id}: {exc}", file=sys.stderr)


# ---------------------------------------------------------------- one request per protocol


class _Timeline:
    """Chunk arrival times and audio seconds, from decoded pcm bytes (odd byte splits carried over)."""

    def __init__(self, origin: float) -> None:
        self.origin = origin
        self.arrivals: list[float] = []
        self.durations: list[float] = []
        self._bytes = 0

    def add(self, pcm: bytes) -> None:
        before = self._bytes // 2
        self._bytes += len(pcm)
        self.arrivals.append(time.perf_counter() - self.origin)
        self.durations.append((self._bytes // 2 - before) / SAMPLE_RATE)

    def result(self) -> RequestResult:
        return request_result(self.arrivals, self.durations, time.perf_counter() - self.origin)


def api_error_code(body: str) -> str:
    """The error code of a body in the API's documented error shape: `{"code", "message", ...}` (PAI
    routes) or `{"error": {"message", "type", "code"}}` (OpenAI routes; `code` may be null, then `type`);
    "" for anything else (an HTML page, a truncated body, a stack trace)."""
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(data, dict):
        return ""
    err = data.get("error")
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        data = {"code": err.get("code") or err.get("type"), "message": err["message"]}
    code, message = data.get("code"), data.get("message")
    return code if isinstance(code, str) and code and isinstance(message, str) else ""


def refused(r: requests.Response, origin: float) -> RequestResult:
    """A non-200 answer: its status and, when the body has the documented error shape, its code."""
    text = r.text
    return failed(
        f"HTTP {r.status_code}: {text[:200]}",
        time.perf_counter() - origin,
        r.status_code,
        api_error_code(text),
    )


def _params(voice_id: str) -> dict[str, Any]:
    return {
        "mode": "fast_replication",
        "reference_audio_id": voice_id,
        "output_format": "pcm",
        "sample_rate": SAMPLE_RATE,
    }


def request_http(
    session: requests.Session,
    target: Target,
    voice_id: str,
    text: str,
    origin: float,
    stream: bool,
    timeout_s: float,
    hang_up: bool = False,
) -> RequestResult:
    """`hang_up`: a listener who leaves: the connection is dropped right after the first audio chunk."""
    body = {"model": MODEL, "stream": stream, "input": {**_params(voice_id), "text": text}}
    line = _Timeline(origin)
    with session.post(
        f"{target.url}/api/v1/audio/speech", headers=target.auth, json=body, stream=stream, timeout=timeout_s
    ) as r:  # leaving the block before the body is read closes the connection (requests does not reuse it)
        if r.status_code != 200:
            return refused(r, origin)
        if not stream:
            line.add(base64.b64decode(r.json()["output"]["audio"]["data"]))
            return line.result()
        for raw in r.iter_lines():
            if not raw.startswith(b"data:"):
                continue
            event = json.loads(raw[5:])
            if event.get("error"):
                code = event["error"].get("code", "") if isinstance(event["error"], dict) else ""
                return failed(
                    f"stream error: {event['error']}", time.perf_counter() - origin, 200, code or ""
                )
            audio = event["output"]["audio"]["data"]
            if audio:
                line.add(base64.b64decode(audio))
                if hang_up:
                    return line.result()
            if event["output"].get("finish_reason") == "stop":
                return line.result()
    return failed("stream ended before its stop event", time.perf_counter() - origin)


def request_openai(
    session: requests.Session, target: Target, voice_id: str, text: str, origin: float, timeout_s: float
) -> RequestResult:
    """The OpenAI-compatible route: raw s16le 24 kHz in a chunked body, each piece timed as it arrives."""
    body = {"model": MODEL, "input": text, "voice": voice_id, "response_format": "pcm", "stream_format": "audio"}
    line = _Timeline(origin)
    with session.post(
        f"{target.url}/v1/audio/speech", headers=target.auth, json=body, stream=True, timeout=timeout_s
    ) as r:
        if r.status_code != 200:
            return refused(r, origin)
        for piece in r.iter_content(chunk_size=None):  # None: each piece as the socket delivers it
            if piece:
                line.add(piece)
    return line.result()


def request_ws(
    target: Target, voice_id: str, text: str, origin: float, timeout_s: float, hang_up: bool = False
) -> RequestResult:
    """The document's duplex flow: run-task, continue-task x2-3 (text split), finish-task. `hang_up`:
    close the connection right after the first audio chunk, the task still running."""
    ws_url = "ws" + target.url[len("http") :] + "/api-ws/v1/audio/speech"
    task_id = str(uuid.uuid4())
    header = {"task_id": task_id, "streaming": "duplex"}
    line = _Timeline(origin)
    try:
        ws = websocket.create_connection(
            ws_url, header=[f"Authorization: Bearer {target.token}"], timeout=timeout_s
        )
    except websocket.WebSocketBadStatusException as exc:  # the upgrade refused: an HTTP answer like any other
        body = exc.resp_body.decode("utf-8", "replace") if isinstance(exc.resp_body, bytes) else ""
        return failed(
            f"upgrade refused: HTTP {exc.status_code}: {body[:200]}",
            time.perf_counter() - origin, exc.status_code, api_error_code(body),
        )  # fmt: skip
    try:
        ws.send(
            json.dumps(
                {
                    "header": {**header, "action": "run-task"},
                    "payload": {
                        "task_group": "audio",
                        "task": "tts",
                        "function": "SpeechSynthesizer",
                        "model": "cosyvoice-v2",
                        "parameters": _params(voice_id),
                        "input": {},
                    },
                }
            )
        )
        while True:
            msg = json.loads(ws.recv())
            event = msg["header"]["event"]
            if event == "task-started":
                pieces = texts.split_pieces(text, 3 if len(text) > 40 else 2)
                for piece in pieces:
                    ws.send(
                        json.dumps(
                            {
                                "header": {**header, "action": "continue-task"},
                                "payload": {"input": {"text": piece}},
                            }
                        )
                    )
                ws.send(json.dumps({"header": {**header, "action": "finish-task"}, "payload": {"input": {}}}))
            elif event == "result-generated":
                line.add(base64.b64decode(msg["payload"]["output"]["audio"]["data"]))
                if hang_up:
                    return line.result()
            elif event == "task-finished":
                return line.result()
            elif event == "task-failed":
                h = msg["header"]
                return failed(
                    f"task-failed {h.get('error_code')}: {h.get('error_message')}",
                    time.perf_counter() - origin,
                    code=str(h.get("error_code") or "") if h.get("error_message") else "",
                )
    finally:
        ws.close()


def one_request(
    protocol: str,
    session: requests.Session,
    target: Target,
    voice_id: str,
    text: str,
    origin: float,
    timeout_s: float,
    hang_up: bool = False,
) -> RequestResult:
    """`hang_up` (sse, ws): the client leaves after the first audio chunk (see request_http)."""
    try:
        if protocol == "ws":
            return request_ws(target, voice_id, text, origin, timeout_s, hang_up)
        if protocol == "openai":
            return request_openai(session, target, voice_id, text, origin, timeout_s)
        return request_http(session, target, voice_id, text, origin, protocol == "sse", timeout_s, hang_up)
    except Exception as exc:  # noqa: BLE001 -- a failed request is a data point, not the end of the run
        return failed(f"{type(exc).__name__}: {exc}"[:300], time.perf_counter() - origin)


# ---------------------------------------------------------------- one level


@dataclass(frozen=True)
class LevelSpec:
    protocol: str
    concurrency: int
    requests: int
    mix: str
    rate: float | None = None
    timeout_s: float = 600.0
    seed: int = 0


class _Progress:
    def __init__(self, label: str, total: int, quiet: bool) -> None:
        self.label, self.total, self.quiet = label, total, quiet
        self.results: list[RequestResult] = []
        self.lock = threading.Lock()
        self.start = time.perf_counter()

    def add(self, r: RequestResult) -> None:
        with self.lock:
            self.results.append(r)
            if not self.quiet:
                done = len(self.results)
                errs = sum(not x.ok for x in self.results)
                ttfp = [x.ttfp_s * 1e3 for x in self.results if x.ok]
                last = f"{ttfp[-1]:.0f}" if ttfp else "-"
                print(
                    f"\r  {self.label}: {done}/{self.total} done, {errs} err, last TTFP {last} ms, "
                    f"{time.perf_counter() - self.start:.1f} s",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )


def run_level(target: Target, voice_id: str, spec: LevelSpec, quiet: bool = False) -> LevelStats:
    total = max(spec.requests, spec.concurrency)  # every worker sends at least one
    progress = _Progress(f"[{target.name} {spec.protocol} C{spec.concurrency}]", total, quiet)
    start = time.perf_counter()
    if spec.rate is None:
        _closed_loop(target, voice_id, spec, total, progress)
    else:
        _open_loop(target, voice_id, spec, total, progress)
    wall = time.perf_counter() - start
    if not quiet:
        print(file=sys.stderr)
    return aggregate(spec.protocol, spec.concurrency, progress.results, wall, spec.rate)


def _closed_loop(target: Target, voice_id: str, spec: LevelSpec, total: int, progress: _Progress) -> None:
    next_index = iter(range(total))
    lock = threading.Lock()

    def worker() -> None:
        with requests.Session() as session:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                text = texts.text_for(spec.mix, i)
                progress.add(
                    one_request(
                        spec.protocol, session, target, voice_id, text, time.perf_counter(), spec.timeout_s
                    )
                )

    _run_threads(worker, spec.concurrency)


def _open_loop(target: Target, voice_id: str, spec: LevelSpec, total: int, progress: _Progress) -> None:
    assert spec.rate is not None and spec.rate > 0
    rng = random.Random(spec.seed)
    t, arrivals = time.perf_counter(), []
    for _ in range(total):
        t += rng.expovariate(spec.rate)
        arrivals.append(t)
    queue = iter(enumerate(arrivals))
    lock = threading.Lock()

    def worker() -> None:
        with requests.Session() as session:
            while True:
                with lock:
                    item = next(queue, None)
                if item is None:
                    return
                i, due = item
                time.sleep(max(0.0, due - time.perf_counter()))
                progress.add(
                    one_request(
                        spec.protocol,
                        session,
                        target,
                        voice_id,
                        texts.text_for(spec.mix, i),
                        due,
                        spec.timeout_s,
                    )
                )

    _run_threads(worker, spec.concurrency)


def _run_threads(fn: Callable[[], None], n: int) -> None:
    threads = [threading.Thread(target=fn, daemon=True, name=f"bench-{k}") for k in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def run_burst(target: Target, voice_id: str, spec: LevelSpec, n: int) -> list[RequestResult]:
    """`n` requests released at once (a barrier), each on its own connection; results in no particular order."""
    results: list[RequestResult] = []
    lock = threading.Lock()
    gate = threading.Barrier(n)

    def one(i: int) -> None:
        with requests.Session() as session:
            text = texts.text_for(spec.mix, i)
            gate.wait()
            r = one_request(spec.protocol, session, target, voice_id, text, time.perf_counter(), spec.timeout_s)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one, args=(i,), daemon=True, name=f"burst-{i}") for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results


def warm_up(target: Target, voice_id: str, protocol: str, count: int, timeout_s: float) -> None:
    """Untimed requests first: first-call costs (allocations, graph capture) stay out of the numbers."""
    with requests.Session() as session:
        for i in range(count):
            text = texts.text_for("short", i)
            one_request(protocol, session, target, voice_id, text, time.perf_counter(), timeout_s)


def sweep(
    plans: dict[Target, list[tuple[str, int]]],
    requests_per_level: int,
    mix: str,
    rate: float | None,
    timeout_s: float,
    warmup: int,
    quiet: bool = False,
    overload: int = 0,
    overloads: dict[str, list[OverloadStats]] | None = None,
) -> dict[str, list[LevelStats]]:
    """Run every target's (protocol, concurrency) levels, interleaved level by level (main, baseline,
    compare, next level, ...) so slow drift of a shared machine hits all targets alike. `overload` K > 0:
    each level is followed by a burst of K×C at once, its OverloadStats appended to `overloads`."""
    voices: dict[Target, str] = {}
    results: dict[str, list[LevelStats]] = {t.name: [] for t in plans}
    try:
        for target, levels in plans.items():
            voices[target] = upload_voice(target)
            warm_up(target, voices[target], levels[0][0], warmup, timeout_s)
        order = list(dict.fromkeys(level for levels in plans.values() for level in levels))
        for proto, conc in order:
            for target, levels in plans.items():
                if (proto, conc) in levels:
                    spec = LevelSpec(proto, conc, requests_per_level, mix, rate, timeout_s, seed=conc)
                    level = run_level(target, voices[target], spec, quiet)
                    results[target.name].append(level)
                    if overload and overloads is not None:
                        burst = run_burst(target, voices[target], spec, overload * conc)
                        row = overload_stats(proto, conc, overload, burst, level)
                        overloads.setdefault(target.name, []).append(row)
    finally:
        for target, voice_id in voices.items():
            delete_voice(target, voice_id)
    return results


# ---------------------------------------------------------------- report


def meta(model: str) -> dict[str, str]:
    return {"date": now_iso(), "machine": machine(), "commit": commit(), "model": model}


# ---------------------------------------------------------------- CLI


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda s: [kind(x) for x in s.split(",") if x]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n")[0])
    p.add_argument("--url", help="server under test (omit with --spawn)")
    p.add_argument("--token", default="bench-token")
    p.add_argument("--protocol", type=_csv(str), default=["sse", "ws"], help="sse,ws,json,openai")
    p.add_argument("--concurrency", type=_csv(int), default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=16, help="requests per level (at least C are sent)")
    p.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second (C caps in-flight)")
    p.add_argument("--texts", default="mixed", choices=sorted(texts.TEXTS))
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests per target before the sweep")
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    p.add_argument("--markdown", type=Path, help="write the table (and meta) as markdown")
    p.add_argument("--compare", help="another server of the same API, swept the same way")
    p.add_argument("--compare-token")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--baseline-url", help="a running server started with --max-batch 1")
    g.add_argument("--spawn-baseline", action="store_true", help="start a --max-batch 1 server for the run")
    p.add_argument("--baseline-token")
    p.add_argument(
        "--baseline-concurrency", type=_csv(int), help="levels for the baseline (default: --concurrency)"
    )
    p.add_argument(
        "--baseline-protocol", type=_csv(str), help="protocols for the baseline (default: --protocol)"
    )
    p.add_argument("--server-max-batch", type=int, help="--max-batch for the spawned server under test")
    p.add_argument("--server-args", default="", help="extra flags for both spawned servers, e.g. '--threads 1'")
    p.add_argument("--spawn", action="store_true", help="start the server under test (tiny model by default)")
    p.add_argument(
        "--split",
        type=_csv(int),
        default=[],
        help="also spawn a frontend over N backends per value (e.g. 1,2), each swept like main: the cost "
        "of the hop, and 1 vs 2 backends",
    )
    p.add_argument("--model-dir", type=Path, help="model for spawned servers (default: tiny random)")
    p.add_argument(
        "--null-engine",
        action="store_true",
        help="spawned servers and backends compute nothing (bench.null_server): the serving path and the "
        "hop alone, without the model's noise",
    )
    p.add_argument(
        "--overload",
        type=int,
        default=0,
        metavar="K",
        help="after each level, K×C requests at once: refusals by status, time to refusal, admitted TTFP vs "
        "the level's (use C = the server's --max-inflight)",
    )
    p.add_argument("--model", help="model label for meta (default: from --model-dir / spawn)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if bool(args.url) == bool(args.spawn):
        p.error("give exactly one of --url and --spawn")
    if bad := [x for x in args.protocol + (args.baseline_protocol or []) if x not in PROTOCOLS]:
        p.error(f"unknown protocol(s) {bad}; choose from {PROTOCOLS}")
    if any(c < 1 for c in args.concurrency) or args.requests < 1:
        p.error("concurrency and requests must be positive")
    if args.rate is not None and args.rate <= 0:
        p.error("--rate must be positive")
    if args.null_engine and not args.spawn:
        p.error("--null-engine is for spawned servers (--spawn)")
    if args.overload < 0 or args.overload == 1:
        p.error("--overload K: K >= 2 times the level's concurrency (0: off)")
    if any(n < 1 for n in args.split):
        p.error("--split counts backends: positive numbers")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    server_args = shlex.split(args.server_args)  # the same engine flags for every spawned engine
    with ExitStack() as stack:
        model_dir = args.model_dir
        module = "bench.null_server" if args.null_engine else "server"
        if model_dir is None and (args.split or args.null_engine):  # one tiny model for all (or its tokenizer)
            model_dir = build_tiny_model(Path(stack.enter_context(tempfile.TemporaryDirectory())) / "tiny")
        targets: list[Target] = []
        if args.spawn:
            srv = stack.enter_context(
                spawn_server(model_dir, max_batch=args.server_max_batch, extra=server_args, module=module)
            )
            targets.append(Target("main", srv.url, srv.token))
        else:
            targets.append(Target("main", args.url.rstrip("/"), args.token))
        if args.spawn_baseline:
            srv = stack.enter_context(spawn_server(model_dir, max_batch=1, extra=server_args, module=module))
            targets.append(Target("baseline", srv.url, srv.token))
        elif args.baseline_url:
            targets.append(
                Target("baseline", args.baseline_url.rstrip("/"), args.baseline_token or args.token)
            )
        if args.compare:
            targets.append(Target("compare", args.compare.rstrip("/"), args.compare_token or args.token))
        for n in args.split:
            srv = stack.enter_context(
                spawn_split(n, model_dir, max_batch=args.server_max_batch, extra=server_args, module=module)
            )
            targets.append(Target(f"split-{n}", srv.url, srv.token))
        plans: dict[Target, list[tuple[str, int]]] = {}
        for target in targets:
            if not args.quiet:
                print(f"== {target.name}: {target.url}", file=sys.stderr)
            base = target.name == "baseline"
            protocols = (args.baseline_protocol if base else None) or args.protocol
            concurrencies = (args.baseline_concurrency if base else None) or args.concurrency
            plans[target] = [(p, c) for p in protocols for c in concurrencies]
        overloads: dict[str, list[OverloadStats]] = {}
        results = sweep(plans, args.requests, args.texts, args.rate, args.timeout, args.warmup, args.quiet,
                        args.overload, overloads)
    model = args.model or (
        "null engine (bench.null_server)"
        if args.null_engine
        else str(args.model_dir) if args.model_dir else ("tiny (random)" if args.spawn else "unknown")
    )
    out = build_json(results, targets, meta(model), args, overloads)
    md = markdown(out, results, overloads)
    print(md)
    if args.json:
        write_json(args.json, out, indent=1, ensure_ascii=False)
    if args.markdown:
        args.markdown.write_text(md + "\n")
    if args.plot:
        from bench.plot import plot  # lazy: matplotlib is a bench extra

        plot(out, args.plot)
    return out


def build_json(
    results: dict[str, list[LevelStats]],
    targets: list[Target],
    meta_: dict[str, str],
    args: argparse.Namespace,
    overloads: dict[str, list[OverloadStats]] | None = None,
) -> dict[str, Any]:
    settings = {
        "requests": args.requests,
        "texts": args.texts,
        "rate": args.rate,
        "sample_rate": SAMPLE_RATE,
        "loop": "open" if args.rate else "closed",
        "server_args": args.server_args,
        "overload": args.overload,
    }
    out: dict[str, Any] = {
        "levels": [lv.to_json() for lv in results["main"]],
        "meta": {**meta_, **settings, "url": targets[0].url},
    }
    for t in targets[1:]:
        out[t.name] = {"url": t.url, "levels": [lv.to_json() for lv in results[t.name]]}
        if t.name == "baseline":
            out[t.name]["max_batch"] = 1
        if t.name.startswith("split-"):
            out[t.name]["backends"] = int(t.name.removeprefix("split-"))
    for name, rows in (overloads or {}).items():
        where = out if name == "main" else out[name]
        where["overload"] = [row.to_json() for row in rows]
    return out


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds the ExitStack: spawned servers stop
    main()
