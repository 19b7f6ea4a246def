"""Reference-audio store: a data folder (audio + prompt features) and SQLite metadata.

Visibility is the database row. An upload writes the audio and the features under temporary names,
fsyncs them, renames them into place, fsyncs the folder, and only then commits the row
(server/durable_files.py); a crash at any point leaves either nothing visible or a complete voice, and a
failure (disk full: 507) removes what the upload had written before it propagates. Delete removes the
row first, then the files; a synthesis already holding the in-memory VoicePrompt is unaffected. What a
crash leaves behind (temporary files, files without a row) is removed by the start-up sweep, which logs
each name. tests/test_server_store_crashes.py kills a process at every point of both paths (server/crash_points.py).
Rows keep the upload time in microseconds (`created_us`, added to older databases
at start-up) so listings follow upload order within a second.
Blocking (fsync, SQLite): call from a worker thread, not the event loop.
"""
from __future__ import annotations

import io
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, astuple, dataclass
from pathlib import Path

import numpy as np

from scheduler.jobs import VoicePrompt
from server import crash_points
from server.durable_files import TMP_PREFIX, fsync_dir, write_atomic

log = logging.getLogger(__name__)


def prompt_to_npz(prompt: VoicePrompt) -> bytes:
    """A voice's prompt features as .npz bytes (the file both stores keep beside the audio): speech tokens,
    embedding, mel, the transcript and its token ids (`text_ids`, int32; absent when not computed)."""
    feats = io.BytesIO()
    arrays = {"speech_tokens": prompt.speech_tokens, "embedding": prompt.embedding, "mel": prompt.mel,
              "text": np.array(prompt.text)}
    if prompt.text_ids is not None:
        arrays["text_ids"] = np.asarray(prompt.text_ids, dtype=np.int32)
    np.savez(feats, **arrays)
    return feats.getvalue()


def prompt_from_npz(source: str | os.PathLike[str] | io.BytesIO) -> VoicePrompt:
    """Inverse of `prompt_to_npz` (a path or an in-memory file). Files written before the transcript ids
    were kept have no `text_ids`: the voice loads with None (the voice cache then computes them)."""
    with np.load(source) as z:
        text_ids = tuple(int(i) for i in z["text_ids"]) if "text_ids" in z.files else None
        return VoicePrompt(speech_tokens=z["speech_tokens"].astype(np.int32),
                           embedding=z["embedding"].astype(np.float32),
                           mel=z["mel"].astype(np.float32), text=str(z["text"]), text_ids=text_ids)


_SCHEMA = """CREATE TABLE IF NOT EXISTS voices (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL, text TEXT NOT NULL, audio_ext TEXT NOT NULL, created_us INTEGER)"""
_COLUMNS = "id, filename, bytes, created_at, text, created_us"  # VoiceRecord's fields, in order


@dataclass(frozen=True)
class VoiceRecord:
    id: str
    filename: str
    bytes: int
    created_at: int  # the API's whole seconds
    text: str
    created_us: int  # upload time in microseconds: the listing order (two uploads in one second)

    def to_json(self) -> dict[str, object]:
        """The API's reference audio object (created_us stays inside the server)."""
        obj = asdict(self)
        del obj["created_us"]
        return obj

    def order_key(self) -> tuple[int, str]:
        return self.created_us, self.id


def now_us(clock: Callable[[], float]) -> tuple[int, int]:
    """(created_at, created_us) of an upload now; created_at is derived so both orders agree."""
    us = round(clock() * 1_000_000)
    return us // 1_000_000, us


class VoiceStore:
    def __init__(self, data_dir: Path, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._dir = Path(data_dir) / "voices"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(Path(data_dir) / "voices.sqlite3"), check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)
        self._migrate()
        self._sweep()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- queries -------------------------------------------------------------------------------
    def get(self, voice_id: str) -> VoiceRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM voices WHERE id=?", (voice_id,)).fetchone()
        return VoiceRecord(*row) if row else None

    def list(self, limit: int, order: str) -> list[VoiceRecord]:
        direction = "ASC" if order == "asc" else "DESC"  # never interpolate user text
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM voices "
                f"ORDER BY created_us {direction}, id {direction} LIMIT ?", (limit,)).fetchall()
        return [VoiceRecord(*r) for r in rows]

    def load_prompt(self, voice_id: str) -> VoicePrompt | None:
        if self.get(voice_id) is None:
            return None
        try:
            return prompt_from_npz(self._dir / f"{voice_id}.npz")
        except FileNotFoundError:  # deleted between the row check and the read
            return None

    # -- mutations -----------------------------------------------------------------------------
    def add(self, filename: str, audio: bytes, text: str, prompt: VoicePrompt) -> VoiceRecord:
        voice_id = str(uuid.uuid4())
        ext = _safe_ext(filename)
        files = (self._dir / f"{voice_id}{ext}", self._dir / f"{voice_id}.npz")
        try:
            write_atomic(files[0], audio, "audio")
            write_atomic(files[1], prompt_to_npz(prompt), "features")
            fsync_dir(self._dir)
            crash_points.reached("folder synced")
            created_at, created_us = now_us(self._clock)
            record = VoiceRecord(voice_id, filename, len(audio), created_at, text, created_us)
            with self._lock:  # the commit point: the voice exists from here on
                self._db.execute(f"INSERT INTO voices ({_COLUMNS}, audio_ext) VALUES (?,?,?,?,?,?,?)",
                                 (*astuple(record), ext))
        except BaseException:
            for path in files:  # a failed upload (disk full, ...) leaves nothing for the sweep
                path.unlink(missing_ok=True)
            raise
        crash_points.reached("row committed")
        return record

    def delete(self, voice_id: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT audio_ext FROM voices WHERE id=?", (voice_id,)).fetchone()
            if row is None:
                return False
            self._db.execute("DELETE FROM voices WHERE id=?", (voice_id,))  # gone from here on
        crash_points.reached("row deleted")
        for path, label in ((self._dir / f"{voice_id}{row[0]}", "audio"),
                            (self._dir / f"{voice_id}.npz", "features")):
            path.unlink(missing_ok=True)
            crash_points.reached(f"{label} removed")
        return True

    def _migrate(self) -> None:
        """Databases from before created_us: add the column; their rows keep whole-second times."""
        with self._lock:
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(voices)")}
            if "created_us" not in columns:
                self._db.execute("ALTER TABLE voices ADD COLUMN created_us INTEGER")
            self._db.execute("UPDATE voices SET created_us = created_at * 1000000 WHERE created_us IS NULL")

    def _sweep(self) -> None:
        """Remove what unfinished uploads and deletes left (temporary files, files without a row: a crash
        before the commit or after the row's delete), logging each; report rows whose files are missing
        (never written so by this store: the folder was changed by hand), without dropping them."""
        with self._lock:
            rows = dict(self._db.execute("SELECT id, audio_ext FROM voices").fetchall())
        removed = []
        for path in sorted(p for p in self._dir.iterdir() if p.is_file()):
            if path.name.startswith(TMP_PREFIX) or path.name.split(".", 1)[0] not in rows:
                path.unlink(missing_ok=True)
                removed.append(path.name)
        if removed:
            fsync_dir(self._dir)
            log.warning("store sweep: removed %d leftover file(s) of unfinished uploads or deletes: %s",
                        len(removed), ", ".join(removed))
        missing = [i for i, ext in rows.items()
                   if not (self._dir / f"{i}{ext}").is_file() or not (self._dir / f"{i}.npz").is_file()]
        if missing:
            log.error("store: %d voice(s) have a row but lack their files in %s: %s",
                      len(missing), self._dir, ", ".join(sorted(missing)))


def _safe_ext(filename: str) -> str:
    """Storage never uses the client's name, only a whitelisted extension."""
    ext = os.path.splitext(filename)[1].lower()
    return ext if ext in (".wav", ".mp3", ".pcm") else ".bin"
