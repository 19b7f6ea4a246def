"""Pure statistics for the load generator: percentiles, a real-time player, per-level aggregation,
and the markdown table of a run.

No clock, no sockets: every function takes numbers measured elsewhere (bench/load.py), so each is
tested with hand-computed cases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolation percentile (numpy's default): rank p/100 * (n-1) between sorted samples.

    NaN for no samples, so an all-errors level shows as "-" instead of a fake 0.
    """
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile out of range: {p}")
    if not values:
        return math.nan
    xs = sorted(values)
    rank = p / 100.0 * (len(xs) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


@dataclass(frozen=True)
class Playback:
    """What a real-time player experienced: it starts at the first chunk and never skips audio."""

    underruns: int  # times the player ran dry before the next chunk arrived
    stall_s: float  # total seconds it waited, summed over those times


def simulate_playback(
    arrivals_s: Sequence[float], durations_s: Sequence[float], tolerance_s: float = 1e-6
) -> Playback:
    """Chunk i arrives at arrivals_s[i] and holds durations_s[i] seconds of audio.

    The player starts playing the first non-empty chunk when it arrives; each later chunk plays when
    the previous audio ends, or when it arrives if that is later (an underrun: the stall is the gap).
    Empty chunks (a WAV header, the final "stop" event) carry no audio and are skipped. A gap no
    larger than `tolerance_s` is float noise, not a stall.
    """
    if len(arrivals_s) != len(durations_s):
        raise ValueError("arrivals and durations differ in length")
    play_end: float | None = None
    underruns, stall = 0, 0.0
    for arrive, dur in zip(arrivals_s, durations_s):
        if dur <= 0.0:
            continue
        if play_end is None:
            play_end = arrive + dur
            continue
        gap = arrive - play_end
        if gap > tolerance_s:
            underruns += 1
            stall += gap
            play_end = arrive + dur
        else:
            play_end += dur
    return Playback(underruns, stall)


@dataclass(frozen=True)
class RequestResult:
    """One request as the client saw it; times in seconds from the moment it was sent."""

    ok: bool
    ttfp_s: float  # first audio byte decoded (NaN if none arrived)
    e2e_s: float  # last byte received
    audio_s: float  # seconds of audio decoded
    underruns: int = 0
    stall_s: float = 0.0
    error: str = ""
    status: int = 0  # HTTP status of a refusal (200: an error event inside the stream); 0: none / WebSocket
    code: str = ""  # the API's error code when the server answered with its documented error shape

    @property
    def rtf(self) -> float:
        return self.e2e_s / self.audio_s if self.audio_s > 0 else math.nan


def request_result(arrivals_s: Sequence[float], durations_s: Sequence[float], e2e_s: float) -> RequestResult:
    """A finished request from its chunk timeline (arrival, audio seconds) and its end time."""
    ttfp = next((a for a, d in zip(arrivals_s, durations_s) if d > 0), math.nan)
    play = simulate_playback(arrivals_s, durations_s)
    return RequestResult(
        ok=not math.isnan(ttfp),
        ttfp_s=ttfp,
        e2e_s=e2e_s,
        audio_s=float(sum(durations_s)),
        underruns=play.underruns,
        stall_s=play.stall_s,
        error="" if not math.isnan(ttfp) else "NoAudio: no audio in the response",
    )


def failed(error: str, e2e_s: float, status: int = 0, code: str = "") -> RequestResult:
    return RequestResult(
        ok=False, ttfp_s=math.nan, e2e_s=e2e_s, audio_s=0.0, error=error, status=status, code=code
    )


@dataclass(frozen=True)
class LevelStats:
    """One (protocol, concurrency) level; the JSON row of bench/load.py."""

    protocol: str
    concurrency: int
    requests: int
    errors: int
    ttfp_ms: dict[str, float]  # p50, p95, p99
    e2e_ms: dict[str, float]  # p50, p95
    rtf_p50: float  # per-request E2E / audio seconds
    x_realtime: float  # audio seconds of the level / wall seconds of the level
    requests_per_s: float
    underruns: int  # events, summed over the level's streams
    underrun_stall_s: float
    streams_with_underrun: int
    audio_s: float
    wall_s: float
    rate: float | None = None  # open loop: Poisson arrivals per second; None = closed loop
    error_samples: list[str] = field(default_factory=list)  # first few distinct error messages

    def to_json(self) -> dict[str, Any]:
        return {k: _finite(v) for k, v in asdict(self).items()}


def aggregate(
    protocol: str,
    concurrency: int,
    results: Sequence[RequestResult],
    wall_s: float,
    rate: float | None = None,
) -> LevelStats:
    good = [r for r in results if r.ok]
    ttfp = [r.ttfp_s * 1e3 for r in good]
    e2e = [r.e2e_s * 1e3 for r in good]
    audio = sum(r.audio_s for r in good)
    errors = sorted({r.error for r in results if not r.ok})
    return LevelStats(
        protocol=protocol,
        concurrency=concurrency,
        requests=len(results),
        errors=len(results) - len(good),
        ttfp_ms={f"p{p}": percentile(ttfp, p) for p in (50, 95, 99)},
        e2e_ms={f"p{p}": percentile(e2e, p) for p in (50, 95)},
        rtf_p50=percentile([r.rtf for r in good if r.audio_s > 0], 50),
        x_realtime=audio / wall_s if wall_s > 0 else math.nan,
        requests_per_s=len(good) / wall_s if wall_s > 0 else math.nan,
        underruns=sum(r.underruns for r in good),
        underrun_stall_s=sum(r.stall_s for r in good),
        streams_with_underrun=sum(1 for r in good if r.underruns),
        audio_s=audio,
        wall_s=wall_s,
        rate=rate,
        error_samples=errors[:5],
    )


# ---------------------------------------------------------------- overload (--overload K)

def refusal_of(r: RequestResult) -> str | None:
    """What refused a request: "429" / "503" (its HTTP answer, or its WebSocket upgrade's, e.g. past
    --max-connections), "Overloaded" (a WebSocket task-failed); None when it was not refused."""
    if r.ok:
        return None
    if r.status in (429, 503):
        return str(r.status)
    if r.status == 0 and r.code == "Overloaded":
        return "Overloaded"
    return None


@dataclass(frozen=True)
class OverloadStats:
    """K x C requests sent at once against a server admitting C: who was refused, how fast, and what the
    admitted ones' first audio cost against the unloaded level (C at once) of the same run."""

    protocol: str
    concurrency: int  # C, the unloaded level's
    factor: int  # K
    sent: int
    admitted: int  # got audio
    refused: dict[str, int]  # by refusal_of(): "429", "503", "Overloaded"
    other_errors: int  # failed some other way (a timeout, a reset): a refusal that did not come cleanly
    refusal_ms: dict[str, float]  # p50, p99: request start -> the refusal in hand
    admitted_ttfp_ms: dict[str, float]  # p50, p99
    unloaded_ttfp_ms: float  # p50 of the C-at-once level
    ttfp_ratio: float  # admitted p50 / unloaded p50: 2 or less is the target
    error_samples: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {k: _finite(v) for k, v in asdict(self).items()}


def overload_stats(
    protocol: str, concurrency: int, factor: int, results: Sequence[RequestResult], unloaded: LevelStats
) -> OverloadStats:
    admitted = [r for r in results if r.ok]
    refused = [(refusal_of(r), r) for r in results if not r.ok]
    clean = [(kind, r) for kind, r in refused if kind is not None]
    by_kind: dict[str, int] = {}
    for kind, _ in clean:
        by_kind[kind] = by_kind.get(kind, 0) + 1
    refusal = [r.e2e_s * 1e3 for _, r in clean]
    ttfp = [r.ttfp_s * 1e3 for r in admitted]
    p50 = percentile(ttfp, 50)
    return OverloadStats(
        protocol=protocol,
        concurrency=concurrency,
        factor=factor,
        sent=len(results),
        admitted=len(admitted),
        refused=dict(sorted(by_kind.items())),
        other_errors=len(refused) - len(clean),
        refusal_ms={f"p{p}": percentile(refusal, p) for p in (50, 99)},
        admitted_ttfp_ms={f"p{p}": percentile(ttfp, p) for p in (50, 99)},
        unloaded_ttfp_ms=unloaded.ttfp_ms["p50"],
        ttfp_ratio=ratio(p50, unloaded.ttfp_ms["p50"]),
        error_samples=sorted({r.error for kind, r in refused if kind is None})[:5],
    )


def overload_table(rows: Sequence[OverloadStats]) -> str:
    head = "| proto | C | sent | admitted | refused | other errors | refusal p50 | p99 | TTFP p50 | p99 | unloaded | ratio |"
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for o in rows:
        refused = ", ".join(f"{n}× {kind}" for kind, n in o.refused.items()) or "0"
        lines.append(
            f"| {o.protocol} | {o.concurrency} | {o.sent} | {o.admitted} | {refused} | {o.other_errors} "
            f"| {_fmt(o.refusal_ms['p50'], 1)} | {_fmt(o.refusal_ms['p99'], 1)} "
            f"| {_fmt(o.admitted_ttfp_ms['p50'])} | {_fmt(o.admitted_ttfp_ms['p99'])} "
            f"| {_fmt(o.unloaded_ttfp_ms)} | {_times(o.ttfp_ratio)} |"
        )
    return "\n".join(lines)


def ratio(new: float, old: float) -> float:
    """new / old, NaN when either is missing or old is zero."""
    if math.isnan(new) or math.isnan(old) or old == 0:
        return math.nan
    return new / old


def _finite(v: Any) -> Any:
    """JSON has no NaN: missing numbers become null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    return v


# ---------------------------------------------------------------- report (markdown)


def _fmt(v: float | None, digits: int = 0) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _times(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.2f}×"


def table(levels: list[LevelStats], against: dict[str, list[LevelStats]]) -> str:
    """Markdown table; for each other target two ratio columns: ×RT ratio (ours / theirs, > 1 = more
    throughput) and TTFP p50 ratio (theirs / ours, > 1 = we answer sooner); "-" where either level
    has errors or the other target did not run that level."""
    head = [
        "proto",
        "C",
        "req",
        "err",
        "TTFP p50",
        "p95",
        "p99",
        "E2E p50",
        "p95",
        "RTF p50",
        "×RT",
        "req/s",
        "underruns (stall s)",
    ]
    for name in against:
        head += [f"×RT vs {name}", f"TTFP p50 vs {name}"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lv in levels:
        cells = [
            lv.protocol,
            str(lv.concurrency),
            str(lv.requests),
            str(lv.errors),
            _fmt(lv.ttfp_ms["p50"]),
            _fmt(lv.ttfp_ms["p95"]),
            _fmt(lv.ttfp_ms["p99"]),
            _fmt(lv.e2e_ms["p50"]),
            _fmt(lv.e2e_ms["p95"]),
            _fmt(lv.rtf_p50, 3),
            _fmt(lv.x_realtime, 2),
            _fmt(lv.requests_per_s, 2),
            f"{lv.underruns} ({lv.underrun_stall_s:.2f})",
        ]
        for other in against.values():
            match = next(
                (o for o in other if (o.protocol, o.concurrency) == (lv.protocol, lv.concurrency)), None
            )
            if match is None or match.errors or lv.errors:  # a ratio over failed requests means nothing
                cells += ["-", "-"]
                continue
            cells += [
                _times(ratio(lv.x_realtime, match.x_realtime)),
                _times(ratio(match.ttfp_ms["p50"], lv.ttfp_ms["p50"])),
            ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def hop_table(direct: list[LevelStats], split: list[LevelStats]) -> str:
    """The cost of the frontend -> backend hop: each level of a split setup beside the same level of the
    one-process server (`--role all`): TTFP p50 difference in ms, and the ×RT it loses in %."""
    rows = [
        "| proto | C | TTFP p50 all | split | Δ ms | ×RT all | split | ×RT cost |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for lv in split:
        base = next((d for d in direct if (d.protocol, d.concurrency) == (lv.protocol, lv.concurrency)), None)
        if base is None or base.errors or lv.errors:
            continue
        delta = lv.ttfp_ms["p50"] - base.ttfp_ms["p50"]
        cost = 100.0 * (1.0 - lv.x_realtime / base.x_realtime) if base.x_realtime else math.nan
        rows.append(
            f"| {lv.protocol} | {lv.concurrency} | {_fmt(base.ttfp_ms['p50'])} | {_fmt(lv.ttfp_ms['p50'])} "
            f"| {delta:+.1f} | {_fmt(base.x_realtime, 2)} | {_fmt(lv.x_realtime, 2)} | {cost:+.1f} % |"
        )
    return "\n".join(rows)


def markdown(
    out: dict[str, Any],
    results: dict[str, list[LevelStats]],
    overloads: dict[str, list[OverloadStats]] | None = None,
) -> str:
    m = out["meta"]
    against = {k: v for k, v in results.items() if k != "main"}
    parts = [
        (
            f"{m['date']} · {m['machine']} · commit {m['commit']} · model {m['model']} · {m['loop']} loop"
            f"{' at {:.2f} req/s'.format(m['rate']) if m['rate'] else ''} · texts {m['texts']} · pcm {m['sample_rate']} Hz"
        ),
        "",
        "TTFP / E2E in ms; ×RT = audio s / wall s of the level, all streams together.",
        "",
        "### main",
        table(results["main"], against),
    ]
    for name, levels in against.items():
        parts += ["", f"### {name} ({out[name]['url']})", table(levels, {})]
    for name, levels in against.items():
        if name.startswith("split-"):
            backends = out[name]["backends"]
            parts += [
                "",
                f"### the hop: {name} (frontend + {backends} backend{'s' * (backends > 1)}) vs main (--role all)",
                hop_table(results["main"], levels),
            ]
    for name, rows in (overloads or {}).items():
        if rows:
            parts += [
                "",
                f"### overload: {rows[0].factor}× the level's concurrency at once ({name})",
                (
                    "Refusal = request start to the 429/503 in hand, ms; TTFP of the admitted, ms; ratio = "
                    "their TTFP p50 / the unloaded level's (C at once, just before)."
                ),
                "",
                overload_table(rows),
            ]
    return "\n".join(parts)
