"""Run every atheris harness for a time budget: `python -m tests.fuzz --seconds 10 [TARGET ...]`.

Each harness runs in its own subprocess under libFuzzer (`-max_total_time`), first over its committed
seed corpus (tests/fuzz/corpus/<target>/: valid inputs and the reproducer of every bug fixed), then on
inputs of its own. New interesting inputs go to a scratch directory (`--corpus-out` keeps them). Exits 1
if any harness crashed or hung, printing each reproducer's path and the command that replays it.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CORPUS = HERE / "corpus"
# target -> longest input libFuzzer makes (bytes): enough for a few requests / frames / messages
MAX_LEN = {"http": 2048, "multipart": 2048, "ws": 1024, "ws_tasks": 1024, "json_schema": 1024, "sse": 512}
TARGETS = tuple(MAX_LEN)
HANG_S = 5  # one input taking longer is a hang: libFuzzer writes it as a timeout-* reproducer
START_S = 60  # a harness's own start (imports, instrumentation) beyond its budget before the runner kills it
UNIT_WRITTEN = re.compile(r"Test unit written to (\S+)")
PROGRESS = re.compile(r"#\d+\s")  # libFuzzer's NEW / REDUCE / pulse lines


def libfuzzer_args(target: str, args: argparse.Namespace, scratch: Path) -> list[str]:
    flags = [f"-max_total_time={args.seconds}", f"-timeout={HANG_S}", f"-max_len={MAX_LEN[target]}",
             f"-seed={args.seed}", "-rss_limit_mb=2048", f"-artifact_prefix={args.artifacts}/{target}-"]
    if args.runs:
        flags.append(f"-runs={args.runs}")
    dictionary = CORPUS / f"{target}.dict"
    if dictionary.exists():
        flags.append(f"-dict={dictionary}")
    out = Path(args.corpus_out) / target if args.corpus_out else scratch / target
    out.mkdir(parents=True, exist_ok=True)
    return [*flags, str(out), str(CORPUS / target)]  # libFuzzer writes new inputs to the first directory


def run_one(target: str, args: argparse.Namespace, scratch: Path) -> tuple[str, int, str]:
    cmd = [sys.executable, "-m", f"tests.fuzz.fuzz_{target}", *libfuzzer_args(target, args, scratch)]
    try:
        done = subprocess.run(cmd, check=False, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace", timeout=args.seconds + START_S)
        return target, done.returncode, done.stdout
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        return target, -9, out + f"\n(killed: still running {args.seconds + START_S} s after its start)"


def report(target: str, rc: int, output: str) -> bool:
    """One line per harness; on a failure the tail of its output and how to replay the reproducer."""
    stats = re.findall(r"Done (\d+) runs in (\d+) second", output)
    if rc == 0:
        runs = f"{stats[-1][0]} inputs in {stats[-1][1]} s" if stats else "done"
        print(f"ok    {target:<12} {runs}")
        return True
    print(f"FAIL  {target:<12} exit {rc}")
    lines = [line for line in output.strip().splitlines() if not PROGRESS.match(line)]
    print("\n".join("      " + line for line in lines[-40:]))
    for path in UNIT_WRITTEN.findall(output):
        print(f"      reproducer: {path}\n      replay:     python -m tests.fuzz.fuzz_{target} {path}")
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", metavar="TARGET",
                        help=f"harnesses to run (default: all of {', '.join(TARGETS)})")
    parser.add_argument("--seconds", type=int, default=10, help="fuzzing time per harness (default 10)")
    parser.add_argument("--runs", type=int, default=0, help="also stop a harness after this many inputs")
    parser.add_argument("--seed", type=int, default=1, help="libFuzzer's seed (default 1: reproducible runs)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="harnesses at once")
    parser.add_argument("--artifacts", default=str(ROOT / "fuzz-artifacts"),
                        help="where reproducers go (default: ./fuzz-artifacts)")
    parser.add_argument("--corpus-out", help="keep the inputs found here (default: a scratch directory)")
    args = parser.parse_args(argv)
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown target(s) {', '.join(sorted(unknown))}; choose from {', '.join(TARGETS)}")
    args.artifacts = str(Path(args.artifacts).resolve())
    Path(args.artifacts).mkdir(parents=True, exist_ok=True)
    targets = args.targets or list(TARGETS)
    with tempfile.TemporaryDirectory(prefix="cosyserve-fuzz-") as scratch, \
            ThreadPoolExecutor(max_workers=max(1, min(args.jobs, len(targets)))) as pool:
        results = list(pool.map(lambda t: run_one(t, args, Path(scratch)), targets))
    ok = [report(*result) for result in results]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
