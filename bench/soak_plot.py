"""Plot a bench.soak JSON: RSS, fds, loop lag, TTFP per window and outcome counts over time.

    python -m bench.soak_plot soak.json soak.png

The warm-up is shaded; the comparison windows the verdict reads are marked on the RSS and fd panels.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt


def _xy(points: list[list[float]]) -> tuple[list[float], list[float]]:
    return [p[0] for p in points], [p[1] for p in points]


def plot(result: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(5, 1, figsize=(10, 13), sharex=True)
    ax_rss, ax_fd, ax_lag, ax_ttfp, ax_n = axes
    warm, end, window = result["warmup_s"], result["duration_s"], result["compare_window_s"]
    for ax in axes:
        ax.axvspan(0, warm, color="0.9", label="warm-up")
        ax.grid(True, alpha=0.3)
    for ax in (ax_rss, ax_fd):
        for lo in (warm, end - window):
            ax.axvspan(lo, lo + window, color="tab:green", alpha=0.08)
    ax_rss.plot(*_xy(result["rss_mb"]), label="server")
    ax_rss.plot(*_xy(result["rss_tree_mb"]), label="server + children", linestyle="--")
    for kind, points in result.get("heap_mb", {}).items():  # what malloc says the RSS is made of
        if points:
            ax_rss.plot(*_xy(points), label=f"heap {kind}", linestyle=":")
    ax_rss.set_ylabel("RSS (MiB)")
    ax_fd.plot(*_xy(result["open_fds"]), label="open fds")
    ax_fd.plot(*_xy(result["fds_less_connections"]), label="open fds - connections")
    ax_fd.set_ylabel("fds")
    ax_lag.plot(*_xy(result["loop_lag_ms"]), label="loop lag (server, worst of ~5 s)")
    ax_lag.plot(*_xy(result["health_ms"]), label="GET /health round trip", alpha=0.7)
    ax_lag.set_ylabel("ms")
    windows = [w for w in result["ttfp_ms"]["windows"] if w["p50"] is not None]
    for key, style in (("p50", "-"), ("p95", "--")):
        xs = [x for w in windows for x in (w["start_s"], w["end_s"])]
        ys = [w[key] for w in windows for _ in range(2)]
        ax_ttfp.plot(xs, ys, linestyle=style, label=f"TTFP {key}")
    ax_ttfp.set_ylabel(f"TTFP (ms) per {result['ttfp_ms']['window_s']:g} s")
    columns, rows = result["counts"]["columns"], result["counts"]["rows"]
    for k, name in enumerate(columns[1:], start=1):
        ax_n.plot([r[0] for r in rows], [r[k] for r in rows], label=name)
    ax_n.set_ylabel("requests (cumulative)")
    ax_n.set_xlabel("seconds since the load began")
    for ax in axes:
        ax.legend(fontsize=7, loc="upper left")
    m = result.get("meta", {})
    verdict = "PASS" if result["pass"] else "FAIL: " + "; ".join(result["reasons"])
    fig.suptitle(
        f"soak {result['minutes']:g} min · {m.get('workers', '?')} workers · {m.get('model', '?')} · "
        f"{m.get('commit', '?')} · {m.get('date', '')}\n{verdict}"[:300],
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m bench.soak_plot soak.json out.png")
    plot(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
