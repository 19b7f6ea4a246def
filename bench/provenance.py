"""Where a benchmark number came from: date, machine, commit (shared by every bench script)."""
from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_quiet(cmd: list[str]) -> str:
    """stdout of a short helper command, or "" when it is missing or fails."""
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=10, cwd=REPO)
        return done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_names() -> str:
    return run_quiet(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]).replace("\n", ", ")


def machine() -> str:
    gpu = gpu_names()
    return f"{cpu_name()} x{os.cpu_count()}" + (f", GPU {gpu}" if gpu else "")


def commit(*paths: str) -> str:
    """Short HEAD, with -dirty when tracked files (under `paths`, if given) have uncommitted changes."""
    head = run_quiet(["git", "rev-parse", "--short", "HEAD"]) or "unknown"
    if run_quiet(["git", "status", "--porcelain", "--untracked-files=no", "--", *paths]):
        head += "-dirty"
    return head


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
