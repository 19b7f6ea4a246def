"""A full store during an upload: 507 InsufficientStorage with a clear message, nothing half-written, and
the server goes on serving (an upload that fits succeeds, synthesis works).

Three honest ways to fill it, none needing root or a mount:
- the one seam every stored byte goes through (server/durable_files.write_bytes) raising ENOSPC after any
  number of bytes, as a full disk does; SQLite's own "database or disk is full" (PRAGMA max_page_count);
- the kernel itself: a server process with RLIMIT_FSIZE (SIGXFSZ ignored), whose writes past the limit
  fail with EFBIG;
- an S3 service answering 507 XMinioStorageFull.
"""
from __future__ import annotations

import errno
import sqlite3
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pytest
import requests

from server import durable_files
from server.paths import REFERENCE as REF
from server.storage_errors import is_out_of_space
from server.store import VoiceStore, prompt_to_npz
from tests.fake_server import serving_process
from tests.fakes import FakeExtractor
from tests.server_helpers import AUTH, TOKEN, mp3_bytes, running_server, speech_body, upload, wav_bytes

PROMPT = FakeExtractor()(np.zeros(16000, np.float32), 16000, "hi")
AUDIO = bytes(range(256)) * 40
WRITE_BYTES = durable_files.write_bytes  # the real one (the tests replace it)


class FullDisk:
    """Stands in for `durable_files.write_bytes`: takes `free` bytes in all, then fails as a full disk does
    (the bytes that fitted are written, the rest is refused with ENOSPC)."""

    def __init__(self, free: int) -> None:
        self.free = free

    def __call__(self, f: BinaryIO, data: bytes) -> None:
        fits = data[:self.free]
        WRITE_BYTES(f, fits)
        self.free -= len(fits)
        if len(fits) < len(data):
            raise OSError(errno.ENOSPC, "No space left on device")


def _files(data_dir: Path) -> set[str]:
    return {p.name for p in (data_dir / "voices").iterdir()}


def _integrity_ok(data_dir: Path) -> bool:
    db = sqlite3.connect(str(data_dir / "voices.sqlite3"))
    try:
        return db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        db.close()


def _metric(url: str, line_start: str) -> float:
    text = requests.get(f"{url}/metrics", headers=AUTH, timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start))


def test_the_disk_filling_at_any_byte_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = VoiceStore(tmp_path)
    kept = store.add("kept.wav", b"K" * 100, "kept", PROMPT)
    before = _files(tmp_path)
    total = len(AUDIO) + len(prompt_to_npz(PROMPT))
    edges = {0, 1, len(AUDIO) - 1, len(AUDIO), len(AUDIO) + 1, total - 1}
    for free in sorted(edges | set(range(0, total, 997))):
        monkeypatch.setattr(durable_files, "write_bytes", FullDisk(free))
        with pytest.raises(OSError) as failed:
            store.add("a.wav", AUDIO, "t", PROMPT)
        assert failed.value.errno == errno.ENOSPC and is_out_of_space(failed.value)
        assert _files(tmp_path) == before, free  # no temp file, no renamed audio left behind
        assert store.list(10, "asc") == [kept], free
    monkeypatch.setattr(durable_files, "write_bytes", FullDisk(total))  # exactly enough: it fits
    added = store.add("a.wav", AUDIO, "t", PROMPT)
    assert store.load_prompt(added.id) is not None and store.list(10, "asc") == [kept, added]
    store.close()
    assert _integrity_ok(tmp_path)
    assert [r.id for r in VoiceStore(tmp_path).list(10, "asc")] == [kept.id, added.id]


def test_a_failing_fsync_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Some filesystems (NFS, delayed allocation) report the full disk only at fsync."""
    store = VoiceStore(tmp_path)

    def fsync(fd: int) -> None:
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(durable_files.os, "fsync", fsync)
    with pytest.raises(OSError) as failed:
        store.add("a.wav", AUDIO, "t", PROMPT)
    assert is_out_of_space(failed.value) and _files(tmp_path) == set() and store.list(10, "asc") == []


def _fill_database(store: VoiceStore) -> None:
    """SQLite itself full: no page more than it has now (its "database or disk is full", SQLITE_FULL)."""
    with store._lock:
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count = {pages}")


def test_a_full_database_leaves_nothing(tmp_path: Path) -> None:
    store = VoiceStore(tmp_path)
    _fill_database(store)
    with pytest.raises(sqlite3.OperationalError) as failed:
        store.add("a.wav", AUDIO, "a transcript longer than the page that is left " * 100, PROMPT)
    assert is_out_of_space(failed.value)
    assert _files(tmp_path) == set() and store.list(10, "asc") == []  # the audio and features went again


def test_full_disk_is_507_and_the_server_keeps_serving(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    with running_server(tmp_path) as srv:
        kept = upload(requests, srv.url).json()
        monkeypatch.setattr(durable_files, "write_bytes", FullDisk(3000))
        r = upload(requests, srv.url)
        assert r.status_code == 507, r.text
        body = r.json()
        assert body["code"] == "InsufficientStorage" and set(body) == {"code", "message", "request_id"}
        assert "insufficient storage" in body["message"] and "not stored" in body["message"]
        monkeypatch.undo()
        _fill_database(srv.app.store)  # the files fit now, the database row does not
        r = upload(requests, srv.url, text="长" * 4000)  # 12 kB: pages the database may not grow by
        assert r.status_code == 507 and r.json()["code"] == "InsufficientStorage", r.text
        with srv.app.store._lock:
            srv.app.store._db.execute("PRAGMA max_page_count = 1073741823")  # space freed
        listed = requests.get(f"{srv.url}{REF}", headers=AUTH, timeout=5).json()
        assert listed == [kept] and len(_files(tmp_path)) == 2  # only the kept voice's two files
        fits = upload(requests, srv.url)
        assert fits.status_code == 200, fits.text
        speech = requests.post(f"{srv.url}/api/v1/audio/speech", headers=AUTH,
                               json=speech_body(fits.json()["id"]), timeout=10)
        assert speech.status_code == 200 and speech.json()["output"]["audio"]["data"]
        assert _metric(srv.url, 'cosyserve_errors_total{code="InsufficientStorage"}') == 2
        assert _metric(srv.url, 'cosyserve_requests_total{route="reference_audio",status="507"}') == 2
    assert _integrity_ok(tmp_path)


def test_a_file_size_limit_in_the_kernel_is_507_too(tmp_path: Path) -> None:
    """The real kernel refusing writes (RLIMIT_FSIZE: EFBIG) in a real server process: a too-large audio
    fails at its own file, a long MP3 (small audio, large features) at the features; nothing stays."""
    data = tmp_path / "data"
    with serving_process(data, "--token", TOKEN, fsize_limit=256 * 1024) as srv:
        for body, name in ((wav_bytes(10.0), "big.wav"), (mp3_bytes(25.0), "long.mp3")):
            r = upload(requests, srv.url, data=body, filename=name)
            assert r.status_code == 507 and r.json()["code"] == "InsufficientStorage", r.text
            assert _files(data) == set(), name
        fits = upload(requests, srv.url, data=wav_bytes(1.0))
        assert fits.status_code == 200, fits.text
        voice: dict[str, Any] = fits.json()
        speech = requests.post(f"{srv.url}/api/v1/audio/speech", headers=AUTH, json=speech_body(voice["id"]),
                               timeout=10)
        assert speech.status_code == 200, speech.text
        assert requests.get(f"{srv.url}{REF}", headers=AUTH, timeout=5).json() == [voice]
    assert _files(data) == {f"{voice['id']}.wav", f"{voice['id']}.npz"} and _integrity_ok(data)
    assert srv.log.read_text().count("File too large") == 2  # EFBIG, from the kernel; the operator sees why


def test_a_full_bucket_is_507_and_leaves_no_object(tmp_path: Path, s3_endpoint: str) -> None:
    from botocore.exceptions import ClientError

    from tests.s3_server import keys, new_prefix, server_options
    prefix = new_prefix()
    with running_server(tmp_path, **server_options(s3_endpoint, prefix)) as srv:
        store = srv.app.store
        put = store._put

        def full_after_the_audio(key: str, data: bytes, content_type: str) -> None:
            if not key.split("/")[-1].startswith("audio"):
                raise ClientError({"Error": {"Code": "XMinioStorageFull", "Message": "Storage backend has "
                                             "reached its minimum free drive threshold."},
                                   "ResponseMetadata": {"HTTPStatusCode": 507}}, "PutObject")
            put(key, data, content_type)

        store._put = full_after_the_audio
        r = upload(requests, srv.url)
        assert r.status_code == 507 and r.json()["code"] == "InsufficientStorage", r.text
        assert keys(s3_endpoint, prefix) == []  # the audio it had put was deleted again
        store._put = put
        fits = upload(requests, srv.url)
        assert fits.status_code == 200, fits.text
        speech = requests.post(f"{srv.url}/api/v1/audio/speech", headers=AUTH,
                               json=speech_body(fits.json()["id"]), timeout=10)
        assert speech.status_code == 200, speech.text
        assert len(keys(s3_endpoint, prefix)) == 3


@pytest.mark.parametrize("exc,full", [
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
    (OSError(errno.EFBIG, "File too large"), True),
    (OSError(errno.EACCES, "Permission denied"), False),
    (FileNotFoundError(errno.ENOENT, "gone"), False),
    (ValueError("no"), False),
    (sqlite3.OperationalError("database is locked"), False),
])
def test_what_counts_as_out_of_space(exc: BaseException, full: bool) -> None:
    assert is_out_of_space(exc) is full
