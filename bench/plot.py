"""Plot a bench.load JSON: TTFP p50/p95 and aggregate ×RT against concurrency.

    python -m bench.plot results.json out.png

One line per (server, protocol): solid = p50, dashed = p95 on the left panel; ×RT on the right.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt

_COLORS = {"main": "tab:blue", "baseline": "tab:gray", "compare": "tab:orange"}
_MARKERS = {"sse": "o", "ws": "s", "json": "^"}


def series(
    levels: list[dict[str, Any]], protocol: str, key: str, sub: str | None = None
) -> tuple[list[int], list[float]]:
    rows = sorted((lv for lv in levels if lv["protocol"] == protocol), key=lambda lv: lv["concurrency"])
    xs, ys = [], []
    for lv in rows:
        v = lv[key][sub] if sub else lv[key]
        if v is not None:
            xs.append(lv["concurrency"])
            ys.append(float(v))
    return xs, ys


def plot(result: dict[str, Any], path: Path) -> None:
    servers = {"main": result["levels"]}
    servers.update({k: result[k]["levels"] for k in ("baseline", "compare") if k in result})
    fig, (ax_t, ax_x) = plt.subplots(1, 2, figsize=(12, 4.8))
    for name, levels in servers.items():
        for proto in sorted({lv["protocol"] for lv in levels}):
            style = {"color": _COLORS.get(name, "black"), "marker": _MARKERS.get(proto, "x")}
            label = f"{name} {proto}"
            ax_t.plot(*series(levels, proto, "ttfp_ms", "p50"), linestyle="-", label=f"{label} p50", **style)
            ax_t.plot(
                *series(levels, proto, "ttfp_ms", "p95"),
                linestyle="--",
                alpha=0.6,
                label=f"{label} p95",
                **style,
            )
            ax_x.plot(*series(levels, proto, "x_realtime"), linestyle="-", label=label, **style)
    for ax, title, ylabel in (
        (ax_t, "first-packet latency", "TTFP (ms)"),
        (ax_x, "aggregate throughput", "× real time (audio s / wall s)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams (C)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax_t.set_yscale("log")
    m = result.get("meta", {})
    fig.suptitle(
        f"{m.get('model', '?')} · {m.get('machine', '?')} · {m.get('commit', '?')} · {m.get('date', '')}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m bench.plot results.json out.png")
    plot(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
