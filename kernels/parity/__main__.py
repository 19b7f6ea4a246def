"""`python -m kernels.parity --model-dir DIR --cases DIR`: every reference case, one line each."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from kernels.parity import CaseResult
from kernels.parity.reference import missing_message, reference_dir

# Each section module exposes run(model_dir: Path, cases_dir: Path) -> list[CaseResult]
# and is skipped (reported as FAIL) only if its fixture file is missing.
SECTIONS = ("features", "frontend", "llm", "flow", "hift")


def run_all(model_dir: Path, cases_dir: Path, only: tuple[str, ...] = SECTIONS) -> list[CaseResult]:
    results: list[CaseResult] = []
    for section in only:
        module = importlib.import_module(f"kernels.parity.{section}")
        results.extend(module.run(model_dir, cases_dir))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.parity", description=__doc__)
    ref = reference_dir()
    parser.add_argument("--model-dir", type=Path, default=ref / "tiny",
                        help="the reference tiny model (default: %(default)s)")
    parser.add_argument("--cases", type=Path, default=ref / "cases",
                        help="upstream's outputs on it (default: %(default)s)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    args = parser.parse_args(argv)
    for path in (args.model_dir, args.cases):
        if not path.is_dir():
            parser.error(missing_message(path))
    import torch

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    results = run_all(args.model_dir, args.cases, tuple(s for s in args.only.split(",") if s))
    for r in results:
        status = "PASS" if r.passed else "FAIL"
        extra = f"  ({r.note})" if r.note else ""
        print(f"{status} {r.name:<48} max_abs={r.max_abs:.3e} max_rel={r.max_rel:.3e} tol={r.tolerance:.1e}{extra}")
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 0 if failed == 0 and results else 1


if __name__ == "__main__":
    sys.exit(main())
