"""kill -9 at every point of an upload and of a delete, then a restart: every voice is whole or absent.

A child process (tests/store_crash_child.py) runs one store operation and SIGKILLs itself at its k-th crash
point, for k = 1, 2, ... until the operation completes, so every point is covered (and a new point in the
store is covered without touching this file; the lists below say which points there are). After each kill
the store is opened again, as the server does at start-up (the sweep), and must hold:
- every listed voice loadable, its audio the size it was uploaded with; a voice that existed before the
  crash (the bystander) untouched; the voice being written present exactly when the crash came after its
  commit point (the row / meta.json), the voice being deleted absent exactly when it came after the delete's;
- no file or object other than those of the listed voices, and the sweep's log naming what it removed;
- the database's `PRAGMA integrity_check` ok; the store still taking uploads and deletes.
"""
from __future__ import annotations

import itertools
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pytest
import requests

from server.paths import REFERENCE as REF
from server.store import VoiceRecord, VoiceStore
from tests.fake_server import serving_process
from tests.fakes import FakeExtractor
from tests.server_helpers import AUTH, TOKEN, speech_body, upload, wav_bytes
from tests.store_crash_child import AUDIO, TEXT

PROMPT = FakeExtractor()(np.zeros(16000, np.float32), 16000, TEXT)
BYSTANDER_AUDIO = b"B" * 5000
REPO = Path(__file__).resolve().parents[1]

LOCAL_UPLOAD = ["audio half written", "audio synced", "audio renamed", "features half written",
                "features synced", "features renamed", "folder synced", "row committed"]
LOCAL_DELETE = ["row deleted", "audio removed", "features removed"]
S3_UPLOAD = ["audio put", "features put", "meta put"]
S3_DELETE = ["meta deleted", "audio deleted", "features deleted"]


class Kind(Protocol):
    commit_point: str  # after this point of an upload the voice exists
    delete_point: str  # after this point of a delete it is gone

    def fresh(self) -> dict[str, Any]: ...  # a new, empty store; the child's arguments for it
    def open(self) -> Any: ...  # the store as the writer uses it (no sweep)
    def restart(self) -> Any: ...  # the store as a restarted server opens it (the sweep)
    def contents(self) -> set[str]: ...  # every file / object the store holds
    def files_of(self, records: list[VoiceRecord]) -> set[str]: ...
    def audio_size(self, record: VoiceRecord) -> int: ...
    def check_database(self) -> None: ...


class Local:
    commit_point, delete_point = "row committed", "row deleted"

    def __init__(self, root: Path) -> None:
        self.root, self.n, self.dir = root, 0, root

    def fresh(self) -> dict[str, Any]:
        self.n += 1
        self.dir = self.root / f"crash-{self.n}"
        return {"store": "local", "data_dir": str(self.dir)}

    def open(self) -> VoiceStore:
        return VoiceStore(self.dir)

    restart = open  # the sweep runs in every VoiceStore's constructor

    def contents(self) -> set[str]:
        return {p.name for p in (self.dir / "voices").iterdir()}

    def files_of(self, records: list[VoiceRecord]) -> set[str]:
        return {f"{r.id}{ext}" for r in records for ext in (".wav", ".npz")}

    def audio_size(self, record: VoiceRecord) -> int:
        return (self.dir / "voices" / f"{record.id}.wav").stat().st_size

    def check_database(self) -> None:
        db = sqlite3.connect(str(self.dir / "voices.sqlite3"))
        try:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        finally:
            db.close()


class S3:
    commit_point, delete_point = "meta put", "meta deleted"

    def __init__(self, endpoint: str) -> None:
        from server.store_s3 import make_client
        from tests.s3_server import new_prefix, settings
        self.endpoint, self.prefix, self._new_prefix = endpoint, "", new_prefix
        self.client = make_client(settings(endpoint, ""))  # one for the whole test: making one is slow

    def fresh(self) -> dict[str, Any]:
        self.prefix = self._new_prefix()
        return {"store": "s3", "endpoint": self.endpoint, "prefix": self.prefix}

    def open(self, **kw: Any) -> Any:
        from tests.s3_server import store
        return store(self.endpoint, self.prefix, client=self.client, **{"sweep_grace_s": None,
                                                                        "sweep_every_s": None, **kw})

    def restart(self) -> Any:
        """In production the sweep spares leftovers younger than the grace period (another replica may be
        mid-upload): first such a start-up, which must not show them; then one past the grace period."""
        young = {r.id for r in self.open(sweep_grace_s=3600.0).list(100, "asc")}
        swept = self.open(sweep_grace_s=0.0)
        assert {r.id for r in swept.list(100, "asc")} == young
        return swept

    def contents(self) -> set[str]:
        from tests.s3_server import BUCKET
        objects = self.client.list_objects_v2(Bucket=BUCKET, Prefix=self.prefix + "/").get("Contents", ())
        return {o["Key"][len(self.prefix) + 1:] for o in objects}

    def files_of(self, records: list[VoiceRecord]) -> set[str]:
        names = ("audio.wav", "features.npz", "meta.json")
        return {f"voices/{r.id}/{name}" for r in records for name in names}

    def audio_size(self, record: VoiceRecord) -> int:
        from tests.s3_server import BUCKET
        head = self.client.head_object(Bucket=BUCKET, Key=f"{self.prefix}/voices/{record.id}/audio.wav")
        return int(head["ContentLength"])

    def check_database(self) -> None:
        pass  # the bucket is the database; its objects were checked one by one


def _run_child(args: dict[str, Any]) -> str:
    """The point the child died at, or "done"."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "tests.store_crash_child", json.dumps(args)], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode == -signal.SIGKILL:
        return proc.stdout.strip()
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr[-3000:]
    return "done"


def _crash_at_every_point(kind: Kind, op: str, caplog: pytest.LogCaptureFixture) -> list[str]:
    points: list[str] = []
    for k in itertools.count(1):
        args = kind.fresh()
        seeded = kind.open()
        bystander = seeded.add("b.wav", BYSTANDER_AUDIO, "bystander", PROMPT)
        target = seeded.add("ref.wav", AUDIO, TEXT, PROMPT) if op == "delete" else None
        seeded.close()
        died_at = _run_child({**args, "op": op, "kill_at": k, "voice_id": target.id if target else ""})
        if died_at == "done":
            return points
        points.append(died_at)
        left = kind.contents()
        caplog.clear()
        with caplog.at_level("WARNING"):
            store = kind.restart()
        listed = store.list(100, "asc")
        ids = [r.id for r in listed]
        if op == "add":  # whole or absent: present from its commit point on, never in between
            assert len(listed) == (2 if kind.commit_point in points else 1), (died_at, listed)
        else:
            assert target is not None and (target.id in ids) == (kind.delete_point not in points), died_at
        assert bystander in listed, died_at  # what was there before the crash is never lost
        for record in listed:
            loaded = store.load_prompt(record.id)
            assert loaded is not None and loaded.text == PROMPT.text, died_at
            assert np.array_equal(loaded.mel, PROMPT.mel)
            assert np.array_equal(loaded.speech_tokens, PROMPT.speech_tokens)
            assert kind.audio_size(record) == record.bytes, died_at
        assert kind.contents() == kind.files_of(listed), died_at  # no orphans
        for leftover in left - kind.files_of(listed):
            assert leftover in caplog.text, (died_at, leftover)  # the sweep says what it removed
        kind.check_database()
        extra = store.add("x.wav", b"x", "after the crash", PROMPT)  # and the store goes on working
        assert store.load_prompt(extra.id) is not None and store.delete(extra.id)
        store.close()
    raise AssertionError("unreachable")


@pytest.mark.parametrize("op,points", [("add", LOCAL_UPLOAD), ("delete", LOCAL_DELETE)])
def test_local_store_survives_a_kill_at_every_point(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                    op: str, points: list[str]) -> None:
    assert _crash_at_every_point(Local(tmp_path), op, caplog) == points


@pytest.mark.parametrize("op,points", [("add", S3_UPLOAD), ("delete", S3_DELETE)])
def test_s3_store_survives_a_kill_at_every_point(s3_endpoint: str, caplog: pytest.LogCaptureFixture,
                                                 op: str, points: list[str]) -> None:
    assert _crash_at_every_point(S3(s3_endpoint), op, caplog) == points


# ---- kill -9 at random times against a serving process under upload/delete traffic ----------------------

class Traffic:
    """Two clients uploading (one of them also deleting) until the server dies; what the server
    acknowledged, across rounds, is what must never be lost (nor come back, for a delete)."""

    def __init__(self) -> None:
        self.acked: dict[str, int] = {}  # voice id -> the uploaded size
        self.deleted: set[str] = set()
        self.maybe_deleted: set[str] = set()  # a delete the kill cut off: either outcome is right
        self.failures: list[str] = []  # any answer but 200 (the store never refuses these requests)
        self._lock = threading.Lock()

    def run(self, url: str, seed: int) -> tuple[threading.Event, list[threading.Thread]]:
        first_ack = threading.Event()
        threads = [threading.Thread(target=self._client, args=(url, random.Random(seed * 10 + n), n == 1,
                                                               first_ack), daemon=True) for n in range(2)]
        for t in threads:
            t.start()
        return first_ack, threads

    def _client(self, url: str, rng: random.Random, deletes: bool, first_ack: threading.Event) -> None:
        session = requests.Session()
        voice_id = ""
        while True:
            try:
                with self._lock:
                    alive = sorted(set(self.acked) - self.deleted - self.maybe_deleted)
                if deletes and alive and rng.random() < 0.3:
                    voice_id = rng.choice(alive)
                    r = session.delete(f"{url}{REF}/{voice_id}", headers=AUTH, timeout=10)
                    if r.status_code == 200:
                        with self._lock:
                            self.deleted.add(voice_id)
                    voice_id = ""
                    continue
                data = wav_bytes(rng.uniform(0.5, 3.0))
                r = upload(session, url, data=data)
                if r.status_code == 200:
                    with self._lock:
                        self.acked[r.json()["id"]] = len(data)
                    first_ack.set()
                else:
                    self.failures.append(r.text)
            except requests.RequestException:  # the server was killed
                if voice_id:
                    with self._lock:
                        self.maybe_deleted.add(voice_id)
                return


def _random_kills(kind: Kind, flags: list[str], env: dict[str, str], seeds: list[int], data: Path) -> None:
    traffic = Traffic()
    kept: list[VoiceRecord] = []
    for seed in seeds:
        with serving_process(data, "--token", TOKEN, "--workers", "2", *flags, env=env) as srv:
            listed = requests.get(f"{srv.url}{REF}?limit=100000&order=asc", headers=AUTH, timeout=10).json()
            assert [v["id"] for v in listed] == [r.id for r in kept]  # the restart serves what was kept
            if kept:
                r = requests.post(f"{srv.url}/api/v1/audio/speech", headers=AUTH,
                                  json=speech_body(kept[-1].id), timeout=10)
                assert r.status_code == 200, r.text
            first_ack, clients = traffic.run(srv.url, seed)
            assert first_ack.wait(30), srv.log.read_text()[-2000:]
            time.sleep(random.Random(seed).uniform(0.0, 0.6))
            srv.kill()
            for t in clients:
                t.join(15)
        store = kind.restart()
        kept = store.list(100_000, "asc")
        ids = {r.id for r in kept}
        assert not traffic.failures, traffic.failures[:3]
        assert set(traffic.acked) - traffic.deleted - traffic.maybe_deleted <= ids, seed  # acknowledged: kept
        assert not ids & traffic.deleted, seed  # acknowledged deletes stay deleted
        landed = ids - set(traffic.acked)
        assert len(landed) <= 2, seed  # besides the acknowledged: the uploads in flight (one a client)
        traffic.acked.update({r.id: r.bytes for r in kept if r.id in landed})  # kept from now on
        for record in kept:
            assert store.load_prompt(record.id) is not None, seed
            assert kind.audio_size(record) == record.bytes == traffic.acked.get(record.id, record.bytes)
        assert kind.contents() == kind.files_of(kept), seed
        kind.check_database()
        store.close()


def test_local_store_survives_random_kills_of_the_server(tmp_path: Path) -> None:
    kind = Local(tmp_path)
    kind.dir = tmp_path / "data"
    _random_kills(kind, [], {}, [1, 2, 3], kind.dir)


def test_s3_store_survives_random_kills_of_the_server(tmp_path: Path, s3_endpoint: str) -> None:
    from tests.s3_server import ACCESS, SECRET, server_options
    kind = S3(s3_endpoint)
    kind.fresh()
    opts = server_options(s3_endpoint, kind.prefix)
    flags = ["--store", "s3", "--s3-endpoint", s3_endpoint, "--s3-bucket", opts["s3_bucket"], "--s3-prefix",
             kind.prefix, "--s3-region", "us-east-1", "--s3-addressing-style", "path"]
    env = {"COSYSERVE_S3_ACCESS_KEY": ACCESS, "COSYSERVE_S3_SECRET_KEY": SECRET}
    _random_kills(kind, flags, env, [4, 5], tmp_path / "data")
