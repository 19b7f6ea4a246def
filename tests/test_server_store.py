"""Voice store round trip / restart, auth and config parsing (no sockets). Crashes at every point of an
upload or delete: tests/test_server_store_crashes.py; a full disk: tests/test_server_store_disk_full.py."""
from __future__ import annotations

import dataclasses
import functools
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from scheduler.jobs import VoicePrompt
from server.auth import token_ok
from server.config import ServerConfig, load_config
from server.store import VoiceStore
from server.voices import VoiceCache, with_text_ids
from tests.fakes import FakeEngine, FakeExtractor, descending_ids

PROMPT = FakeExtractor()(np.zeros(16000, np.float32), 16000, "hi")


def test_add_get_list_delete_and_restart(tmp_path: Path) -> None:
    store = VoiceStore(tmp_path)
    a = store.add("a.wav", b"A" * 10, "one", PROMPT)
    b = store.add("../../etc/passwd", b"B" * 5, "two", PROMPT)
    assert store.get(a.id) == a and b.filename == "../../etc/passwd"
    assert not any("passwd" in p.name for p in (tmp_path / "voices").iterdir())  # name never used on disk
    store.close()
    store = VoiceStore(tmp_path)  # restart
    assert {r.id for r in store.list(10, "desc")} == {a.id, b.id}
    loaded = store.load_prompt(a.id)
    assert loaded is not None and np.array_equal(loaded.speech_tokens, PROMPT.speech_tokens)
    assert loaded.text == "hi" and loaded.mel.shape == PROMPT.mel.shape
    assert store.delete(a.id) and not store.delete(a.id)
    assert store.get(a.id) is None and store.load_prompt(a.id) is None
    assert sorted(p.name.split(".")[0] for p in (tmp_path / "voices").iterdir()) == [b.id, b.id]


def test_same_second_uploads_list_in_upload_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("server.store.uuid", descending_ids())  # id order is the reverse of upload order
    times = iter([1000.25, 1000.5, 1000.75])
    store = VoiceStore(tmp_path, clock=lambda: next(times))
    recs = [store.add(f"{i}.wav", b"x", str(i), PROMPT) for i in range(3)]
    assert {r.created_at for r in recs} == {1000}
    assert store.list(10, "asc") == recs and store.list(10, "desc") == recs[::-1]
    assert store.list(1, "desc") == recs[-1:]
    store.close()
    assert VoiceStore(tmp_path).list(10, "asc") == recs  # the precise time is stored, not recomputed


def test_database_without_created_us_is_migrated(tmp_path: Path) -> None:
    """A database written before sub-second times: its rows keep their second order, new ones follow."""
    db = sqlite3.connect(str(tmp_path / "voices.sqlite3"))
    db.execute("CREATE TABLE voices (id TEXT PRIMARY KEY, filename TEXT NOT NULL, bytes INTEGER NOT NULL, "
               "created_at INTEGER NOT NULL, text TEXT NOT NULL, audio_ext TEXT NOT NULL)")
    db.executemany("INSERT INTO voices VALUES (?,?,?,?,?,?)", [("b", "b.wav", 1, 500, "old b", ".wav"),
                                                               ("a", "a.wav", 2, 500, "old a", ".wav"),
                                                               ("c", "c.wav", 3, 400, "old c", ".wav")])
    db.commit()
    db.close()
    store = VoiceStore(tmp_path, clock=lambda: 600.5)
    assert [r.id for r in store.list(10, "asc")] == ["c", "a", "b"]
    assert store.get("a").to_json() == {"id": "a", "filename": "a.wav", "bytes": 2, "created_at": 500,
                                        "text": "old a"}
    new = store.add("n.wav", b"n", "new", PROMPT)
    assert new.created_at == 600 and [r.id for r in store.list(2, "desc")] == [new.id, "b"]
    store.close()
    assert [r.id for r in VoiceStore(tmp_path).list(10, "asc")] == ["c", "a", "b", new.id]  # migrates once


def test_a_row_whose_files_went_missing_is_reported_not_dropped(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """Files removed by hand (or a folder mounted wrong): the start-up says so, and keeps the rows."""
    store = VoiceStore(tmp_path)
    voice = store.add("a.wav", b"A", "a", PROMPT)
    store.close()
    (tmp_path / "voices" / f"{voice.id}.npz").unlink()
    with caplog.at_level("ERROR"):
        store = VoiceStore(tmp_path)
    assert voice.id in caplog.text and "lack their files" in caplog.text
    assert store.get(voice.id) == voice and store.load_prompt(voice.id) is None  # a 404 at synthesis, no 500


@pytest.mark.parametrize("header,ok", [
    ("Bearer t1", True), ("bearer t2", True), ("Bearer  t1 ", True), ("Bearer t3", False),
    ("Basic t1", False), ("t1", False), (None, False), ("", False), ("Bearer ", False),
])
def test_token_check(header: str | None, ok: bool) -> None:
    assert token_ok(header, ("t1", "t2")) is ok


def test_config_flags_over_env(tmp_path: Path) -> None:
    env = {"COSYSERVE_PORT": "9000", "COSYSERVE_TOKENS": "e1,e2", "COSYSERVE_IDLE_TIMEOUT_S": "5.5",
           "COSYSERVE_DATA_DIR": str(tmp_path)}
    cfg = load_config(["--port", "9100", "--token", "x"], env)
    assert cfg.port == 9100 and cfg.tokens == ("x",) and cfg.idle_timeout_s == 5.5 and cfg.data_dir == tmp_path
    assert load_config([], env).tokens == ("e1", "e2")
    with pytest.raises(SystemExit):
        load_config([], {})
    with pytest.raises(ValueError):
        ServerConfig(port=70000)


def test_cpu_engine_flags(tmp_path: Path) -> None:
    cfg = load_config(["--token", "x", "--threads", "1", "--stage-workers", "2"], {"COSYSERVE_DATA_DIR": str(tmp_path)})
    assert (cfg.threads, cfg.stage_workers) == (1, 2)
    assert load_config(["--token", "x"], {"COSYSERVE_THREADS": "3"}).threads == 3
    with pytest.raises(ValueError, match="threads"):
        ServerConfig(threads=-1)


def test_dtype_flags() -> None:
    cfg = load_config(["--token", "x", "--flow-dtype", "bf16", "--llm-dtype", "fp32"], {})
    assert (cfg.flow_dtype, cfg.llm_dtype) == ("bf16", "fp32")
    assert load_config(["--token", "x"], {}).flow_dtype == "auto"  # chosen at start-up from the CPU
    assert load_config(["--token", "x", "--flow-cache-mb", "0"], {}).flow_cache_mb == 0
    assert load_config(["--token", "x", "--voice-prefix-mb", "0"], {}).voice_prefix_mb == 0
    with pytest.raises(ValueError, match="voice_prefix_mb"):
        ServerConfig(voice_prefix_mb=-1)
    with pytest.raises(ValueError, match="flow_cache_mb"):
        ServerConfig(flow_cache_mb=-2)
    with pytest.raises(ValueError, match="flow_dtype"):
        ServerConfig(flow_dtype="int8")


# ---------------------------------------------------------------- transcript ids kept with the features

def _write_old_features(store_dir: Path, voice_id: str, prompt: VoicePrompt) -> None:
    """The features file exactly as servers wrote it before the transcript ids were kept."""
    np.savez(store_dir / "voices" / f"{voice_id}.npz", speech_tokens=prompt.speech_tokens,
             embedding=prompt.embedding, mel=prompt.mel, text=np.array(prompt.text))


def test_transcript_ids_are_stored_with_the_features(tmp_path: Path) -> None:
    store = VoiceStore(tmp_path)
    kept = store.add("a.wav", b"A", "hi", dataclasses.replace(PROMPT, text_ids=(5, 6, 151643)))
    empty = store.add("b.wav", b"B", "hi", dataclasses.replace(PROMPT, text_ids=()))
    none = store.add("c.wav", b"C", "hi", PROMPT)
    store.close()
    store = VoiceStore(tmp_path)  # restart
    loaded = store.load_prompt(kept.id)
    assert loaded is not None and loaded.text_ids == (5, 6, 151643) and loaded.text == "hi"
    assert np.array_equal(loaded.speech_tokens, PROMPT.speech_tokens)
    assert store.load_prompt(empty.id).text_ids == ()  # type: ignore[union-attr]  # () is not "missing"
    assert store.load_prompt(none.id).text_ids is None  # type: ignore[union-attr]


def test_a_voice_stored_without_ids_gets_them_once_when_loaded(tmp_path: Path) -> None:
    store = VoiceStore(tmp_path)
    old = store.add("a.wav", b"A", "hi", PROMPT)
    _write_old_features(tmp_path, old.id, PROMPT)
    assert store.load_prompt(old.id).text_ids is None  # type: ignore[union-attr]  # still loadable
    engine = FakeEngine()
    cache = VoiceCache(store, 4, functools.partial(with_text_ids, engine))
    first = cache.get(old.id)
    assert first is not None and first.text_ids == tuple(map(ord, "hi"))
    assert cache.get(old.id) is first and engine.transcripts_encoded == ["hi"]  # cached: computed once
    assert np.array_equal(first.mel, PROMPT.mel) and first.text == "hi"


def test_upload_keeps_the_ids_and_synthesis_never_recomputes_them(tmp_path: Path) -> None:
    import requests

    from tests.server_helpers import AUTH, running_server, speech_body, upload

    def speak(url: str, voice_id: str) -> None:
        r = requests.post(f"{url}/api/v1/audio/speech", headers=AUTH, json=speech_body(voice_id), timeout=10)
        assert r.status_code == 200, r.text

    engine = FakeEngine()
    with running_server(tmp_path, engine) as srv:
        voice_id = upload(requests, srv.url, text="transcript").json()["id"]
        assert engine.transcripts_encoded == ["transcript"]  # at upload, with the features
        speak(srv.url, voice_id)
        speak(srv.url, voice_id)
        assert engine.transcripts_encoded == ["transcript"]
    store = VoiceStore(tmp_path)
    stored = store.load_prompt(voice_id)
    store.close()
    assert stored is not None and stored.text_ids == tuple(map(ord, "transcript"))

    # The upgrade path: the same voice as an older server stored it (no ids) after a restart.
    _write_old_features(tmp_path, voice_id, stored)
    engine = FakeEngine()
    with running_server(tmp_path, engine) as srv:
        speak(srv.url, voice_id)
        speak(srv.url, voice_id)
        assert engine.transcripts_encoded == ["transcript"]  # once, when the voice was loaded
