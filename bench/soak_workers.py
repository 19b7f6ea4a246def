"""The soak's clients: worker threads that each loop over a weighted mix of what real clients do.

Kinds (weights from MIX, or --mix): `sse`, `ws` (duplex), `json` (non-stream), `openai` (/v1 audio
stream), `voice` (upload a voice; the worker's next `voice` deletes it, and meanwhile its syntheses use
it), `hang_up` (SSE or WebSocket, closed right after the first audio chunk). The requests themselves are
bench/load.py's; every one becomes a Record with its outcome (bench.soak_outcomes).
"""
from __future__ import annotations

import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import requests

from bench import texts
from bench.load import Target, delete_voice_request, one_request, refused, upload_voice
from bench.load_stats import RequestResult, failed
from bench.soak_outcomes import HUNG_UP, LOST, OK, OUTCOMES, classify, is_refusal

MIX: dict[str, float] = {"sse": 30, "ws": 20, "json": 10, "openai": 10, "voice": 10, "hang_up": 20}
# A keep-alive connection idle this long is dropped before reuse: the server closes idle ones after
# --idle-timeout-s (default 30), and a request sent just as that close arrives dies with no answer: the
# keep-alive race of every HTTP client, not a lost request of the server's.
_FRESH_SESSION_AFTER_S = 10.0


@dataclass(frozen=True)
class Record:
    start_s: float  # since the load began
    kind: str  # a MIX key; `voice` records say upload or delete in `op`
    op: str  # the protocol, or "upload" / "delete"
    outcome: str  # bench.soak_outcomes.OUTCOMES
    ttfp_ms: float  # NaN without audio
    e2e_s: float
    code: str = ""
    error: str = ""


class Tally:
    """Every Record of the run, appended from the worker threads; counts read by the sampler."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.records: list[Record] = []
        self._counts: Counter[str] = Counter()

    def add(self, record: Record) -> None:
        with self._lock:
            self.records.append(record)
            self._counts[record.outcome] += 1

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"sent": sum(self._counts.values()), **{o: self._counts[o] for o in OUTCOMES}}


@dataclass(frozen=True)
class WorkerPlan:
    target: Target
    shared_voice: str  # uploaded once for the run
    origin: float  # perf_counter() when the load began
    deadline: float  # perf_counter() after which no new request starts
    mix: dict[str, float]
    text_mix: str = "short"
    timeout_s: float = 60.0
    backoff_s: float = 1.0  # after a 429/503: the server's default Retry-After


def run_workers(plan: WorkerPlan, count: int, tally: Tally, seed: int = 0) -> None:
    """`count` workers until the deadline; returns when the last request has ended."""
    stop = threading.Event()
    threads = [
        threading.Thread(target=_worker, args=(plan, k, tally, random.Random(seed * 1000 + k), stop),
                         daemon=True, name=f"soak-{k}")
        for k in range(count)
    ]  # fmt: skip
    for th in threads:
        th.start()
    try:
        for th in threads:
            th.join()
    finally:
        stop.set()


def _worker(plan: WorkerPlan, index: int, tally: Tally, rng: random.Random, stop: threading.Event) -> None:
    kinds, weights = list(plan.mix), list(plan.mix.values())
    own_voice: str | None = None
    session, session_used, n = requests.Session(), time.perf_counter(), index
    try:
        while time.perf_counter() < plan.deadline and not stop.is_set():
            if time.perf_counter() - session_used > _FRESH_SESSION_AFTER_S:
                session.close()
                session = requests.Session()
            kind = rng.choices(kinds, weights)[0]
            start = time.perf_counter()
            if kind == "voice":
                op, result, own_voice = _voice_step(plan.target, own_voice, start)
            else:
                op = rng.choice(("sse", "ws")) if kind == "hang_up" else kind
                text = texts.text_for(plan.text_mix, n)
                result = one_request(op, session, plan.target, own_voice or plan.shared_voice, text, start,
                                     plan.timeout_s, hang_up=kind == "hang_up")  # fmt: skip
                n += 1
                if op != "ws":  # WebSocket and voice requests open connections of their own
                    session_used = time.perf_counter()
            tally.add(record(kind, op, result, start - plan.origin, hung_up=kind == "hang_up"))
            if is_refusal(result):
                stop.wait(plan.backoff_s)
    finally:
        session.close()
        if own_voice is not None:  # leave the store as we found it; the delete counts like any other
            start = time.perf_counter()
            result = delete_result(plan.target, own_voice, start)
            tally.add(record("voice", "delete", result, start - plan.origin))


def _voice_step(target: Target, own: str | None, start: float) -> tuple[str, RequestResult, str | None]:
    """Upload when the worker holds no voice of its own, else delete the one it holds."""
    if own is None:
        result, voice = _upload(target, start)
        return "upload", result, voice
    result = delete_result(target, own, start)
    return "delete", result, None if result.ok or result.status == 404 else own


def _upload(target: Target, start: float) -> tuple[RequestResult, str | None]:
    return _answered(lambda: upload_voice(target), start)


def delete_result(target: Target, voice_id: str, start: float) -> RequestResult:
    """DELETE a voice, as a result to count (ok, refused, or an exception)."""

    def delete() -> None:
        r = delete_voice_request(target, voice_id)
        if r.status_code != 200:
            raise _Refused(r)

    return _answered(delete, start)[0]


class _Refused(Exception):
    def __init__(self, response: requests.Response) -> None:
        self.response = response


def _answered(call: Callable[[], str | None], start: float) -> tuple[RequestResult, str | None]:
    """A call that answers nothing to time (no audio): ok, refused (its status and code), or an exception."""
    try:
        value = call()
    except requests.HTTPError as exc:  # upload_voice's raise_for_status
        if exc.response is None:
            return failed(f"HTTPError: {exc}", time.perf_counter() - start), None
        return refused(exc.response, start), None
    except _Refused as exc:
        return refused(exc.response, start), None
    except Exception as exc:  # noqa: BLE001 -- reset, timeout, malformed body: a data point
        return failed(f"{type(exc).__name__}: {exc}"[:300], time.perf_counter() - start), None
    done = time.perf_counter() - start
    return RequestResult(ok=True, ttfp_s=math.nan, e2e_s=done, audio_s=0.0), value


def record(kind: str, op: str, result: RequestResult, start_s: float, hung_up: bool = False) -> Record:
    outcome = classify(result, hung_up)
    ttfp_ms = result.ttfp_s * 1e3 if outcome in (OK, HUNG_UP) else math.nan
    return Record(start_s=start_s, kind=kind, op=op, outcome=outcome, ttfp_ms=ttfp_ms, e2e_s=result.e2e_s,
                  code=result.code, error=result.error if outcome == LOST else "")  # fmt: skip
