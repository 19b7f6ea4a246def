"""The child process of tests/test_server_store_crashes.py: one store operation that SIGKILLs itself at its k-th
crash point (server/crash_points.py, plus the middle of every file write).

`python -m tests.store_crash_child '<json>'` with {"store": "local", "data_dir": D} or {"store": "s3",
"endpoint": URL, "prefix": P}, and "op": "add" | "delete", "voice_id" (delete), "kill_at": k. Just before
dying it prints the point's name; an operation that ends before its k-th point prints "done" (exit 0).
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, BinaryIO

from server import crash_points, durable_files
from tests.fakes import FakeExtractor

AUDIO = bytes(range(256)) * 64  # 16 KiB: what the store keeps is opaque to it
TEXT = "crash test"


def prompt() -> Any:
    import numpy as np
    return FakeExtractor()(np.zeros(16000, np.float32), 16000, TEXT)


def open_store(args: dict[str, Any]) -> Any:
    if args["store"] == "local":
        from server.store import VoiceStore
        return VoiceStore(Path(args["data_dir"]))
    from tests.s3_server import store
    return store(args["endpoint"], args["prefix"], sweep_grace_s=None, sweep_every_s=None)


def arm(kill_at: int) -> None:
    """Count the points as they pass; at the k-th, say which and die as `kill -9` would."""
    passed = 0

    def reached(point: str) -> None:
        nonlocal passed
        passed += 1
        if passed == kill_at:
            print(point, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    write_bytes = durable_files.write_bytes

    def write_in_halves(f: BinaryIO, data: bytes) -> None:
        half = len(data) // 2
        write_bytes(f, data[:half])
        f.flush()  # in the kernel now: a real half-written file survives the kill
        reached(("features" if f.name.endswith(".npz") else "audio") + " half written")
        write_bytes(f, data[half:])

    crash_points.reached = reached
    durable_files.write_bytes = write_in_halves


def main() -> None:
    args = json.loads(sys.argv[1])
    store = open_store(args)
    arm(args["kill_at"])
    if args["op"] == "add":
        store.add("ref.wav", AUDIO, TEXT, prompt())
    else:
        assert store.delete(args["voice_id"])
    print("done", flush=True)


if __name__ == "__main__":
    main()
