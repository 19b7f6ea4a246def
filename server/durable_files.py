"""Crash-safe file writes: a temporary name, fsync, an atomic rename, then the folder's fsync.

A reader sees the old state or the whole new file, never a part of it; a failure (disk full, a file size
limit) removes the temporary file before it propagates, so nothing half-written stays behind. A crash can
still leave a temporary file: its name starts with TMP_PREFIX, and the store's start-up sweep removes it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from server import crash_points

TMP_PREFIX = ".tmp-"


def write_bytes(f: BinaryIO, data: bytes) -> None:
    """Every byte of a stored file goes through here (one seam: the disk-full tests fill it at any byte)."""
    f.write(data)


def write_atomic(final: Path, data: bytes, label: str) -> None:
    """`final` holds `data` once this returns (durably, after `fsync_dir` of its folder); `label` names
    the file in the crash points ("<label> synced", "<label> renamed")."""
    tmp = final.with_name(TMP_PREFIX + final.name)
    try:
        with open(tmp, "wb") as f:
            write_bytes(f, data)
            f.flush()
            os.fsync(f.fileno())
        crash_points.reached(f"{label} synced")
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    crash_points.reached(f"{label} renamed")


def fsync_dir(path: Path) -> None:
    """Makes the renames and unlinks in `path` durable (a rename lives in the folder, not the file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
