"""`python -m bench.env_pair`: one `bench.engine` command under two process environments, A B B A ...

Some settings live in the environment and are read once, when a library loads (libgomp's
OMP_WAIT_POLICY / GOMP_SPINCOUNT), so one process cannot measure both sides the way `bench.engine
--baseline` does. This runs the same `bench.engine` arguments in child processes, alternating the two
environments (pairing keeps the ratio fair while the VM's speed drifts), merges each side's runs and
reports A as "batched" and B as "baseline", with the A / B ratios, in bench.engine's own tables.

    python -m bench.env_pair --env-a OMP_WAIT_POLICY=ACTIVE,GOMP_SPINCOUNT=10000 \\
        --env-b OMP_WAIT_POLICY=PASSIVE --pairs 2 --markdown out.md -- --model-dir M --concurrency 1,8 ...
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.engine import markdown, merge_runs, ratios
from bench.outputs import write_results


def parse_env(spec: str) -> dict[str, str]:
    """`K=V,K2=V2` -> {K: V, K2: V2}; `K=` unsets K in the child (empty value)."""
    out = {}
    for part in filter(None, spec.split(",")):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"{part!r}: expected KEY=VALUE")
        out[key] = value
    return out


def child_env(overrides: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in overrides.items():
        if value:
            env[key] = value
        else:
            env.pop(key, None)
    return env


def run_side(engine_args: list[str], overrides: dict[str, str], out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.engine", *engine_args, "--repeats", "1", "--json", str(out)]
    subprocess.run(cmd, env=child_env(overrides), check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def pair_order(pairs: int) -> list[str]:
    """A B, B A, A B ...: each side goes first as often as the other."""
    return [side for i in range(pairs) for side in (("a", "b") if i % 2 == 0 else ("b", "a"))]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env-a", type=parse_env, required=True, help="the measured side, K=V,...")
    p.add_argument("--env-b", type=parse_env, required=True, help="the baseline side, K=V,... (K= unsets K)")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("engine_args", nargs=argparse.REMAINDER, help="-- then bench.engine's arguments")
    args = p.parse_args(argv)
    engine_args = [a for a in args.engine_args if a != "--"]
    if any(a in ("--repeats", "--json", "--markdown", "--baseline") for a in engine_args):
        p.error("bench.engine's --repeats/--json/--markdown/--baseline are this tool's to set")
    sides: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i, side in enumerate(pair_order(args.pairs)):
            env = args.env_a if side == "a" else args.env_b
            result = run_side(engine_args, env, Path(tmp) / f"{i}.json")
            sides[side].append(result)
            for run in result["runs"]:
                print(f"{side} C{run['concurrency']}: {run['speech_seconds_per_second']:.2f} speech s/s, TTFC p50 "
                      f"{run['ttfc_ms']['p50']} ms", file=sys.stderr)
    runs = []
    levels = sorted({r["concurrency"] for r in sides["a"][0]["runs"] if r["mode"] == "batched"})
    for side, mode in (("a", "batched"), ("b", "baseline")):
        for c in levels:
            merged = merge_runs([r for res in sides[side] for r in res["runs"]
                                 if r["mode"] == "batched" and r["concurrency"] == c])
            runs.append({**merged, "mode": mode})
    meta = {**sides["a"][0]["meta"], "repeats": args.pairs}
    result = {"runs": runs, "ratios": {}, "baseline": {"env": args.env_b, "measured env": args.env_a},
              "ratios_vs_baseline": ratios(runs, "baseline"), "meta": meta, "complete": True}
    text = markdown(result)
    print(text)
    write_results(result, text, args.json, args.markdown)
    return result


if __name__ == "__main__":
    main()
