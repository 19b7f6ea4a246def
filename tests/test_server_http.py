"""Real clients (requests, sseclient-py) against the server on a loopback port, with a fake engine."""
from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile as sf
from sseclient import SSEClient

from tests.fakes import AMPLITUDE, SAMPLES_PER_CHAR, FakeEngine
from tests.server_helpers import (
    AUTH,
    assert_ms_times,
    mp3_bytes,
    pcm_bytes,
    running_server,
    speech_body,
    upload,
    wav_bytes,
)

TEXT = "hello world, this is a test"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with running_server(tmp_path_factory.mktemp("data"), FakeEngine(chunk_chars=6)) as srv:
        yield srv


@pytest.fixture(scope="module")
def voice(server) -> str:
    r = upload(requests, server.url)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _speak(server, voice: str, **inp) -> tuple[bytes, dict]:
    r = requests.post(f"{server.url}/api/v1/audio/speech", headers=AUTH, json=speech_body(voice, **inp),
                      timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    audio = base64.b64decode(body["output"]["audio"]["data"])
    assert body["usage"] == len(audio) and body["output"]["finish_reason"] is None
    return audio, body


def _stream(server, voice: str, text: str = TEXT, **inp) -> list[dict]:
    r = requests.post(f"{server.url}/api/v1/audio/speech", headers=AUTH,
                      json=speech_body(voice, text=text, stream=True, **inp), stream=True, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return [json.loads(m.data) for m in SSEClient(r).events()]


def test_health_needs_no_token_and_reveals_nothing(server) -> None:
    r = requests.get(f"{server.url}/health", timeout=5)
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_head_of_the_probes_answers_without_a_body_on_a_connection_that_stays_open(server) -> None:
    with requests.Session() as s:
        for path in ("/health", "/ready", "/health"):
            r = s.head(f"{server.url}{path}", timeout=5)
            assert r.status_code == 200 and r.content == b"" and int(r.headers["content-length"]) > 0
        assert s.get(f"{server.url}/health", timeout=5).json() == {"status": "ok"}


@pytest.mark.parametrize("data,filename,extra", [
    (wav_bytes(1.0, 16000), "a.wav", {}),
    (mp3_bytes(1.0, 24000), "b.mp3", {}),
    (pcm_bytes(1.0, 22050), "c.pcm", {"sample_rate": "22050"}),
])
def test_upload_formats_get_and_delete(server, data: bytes, filename: str, extra: dict) -> None:
    r = upload(requests, server.url, data, filename, text="transcript", extra=extra)
    assert r.status_code == 200, r.text
    obj = r.json()
    assert set(obj) == {"id", "filename", "bytes", "created_at", "text"}
    assert obj["filename"] == filename and obj["bytes"] == len(data) and obj["text"] == "transcript"
    assert abs(obj["created_at"] - time.time()) < 60
    got = requests.get(f"{server.url}/api/v1/audio/reference_audio/{obj['id']}", headers=AUTH, timeout=5)
    assert got.json() == obj
    r = requests.delete(f"{server.url}/api/v1/audio/reference_audio/{obj['id']}", headers=AUTH, timeout=5)
    assert r.json() == {"code": "OK", "message": f"reference audio: {obj['id']} deleted.", "data": {}}
    again = requests.get(f"{server.url}/api/v1/audio/reference_audio/{obj['id']}", headers=AUTH, timeout=5)
    assert again.status_code == 404 and again.json()["code"] == "NotFound"


def test_an_upload_asks_the_engine_to_precompute_the_voice(tmp_path: Path) -> None:
    engine = FakeEngine()
    with running_server(tmp_path, engine) as srv:
        r = upload(requests, srv.url, text="transcript")
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 10
        while not engine.warmed and time.monotonic() < deadline:  # a background task: poll its outcome
            time.sleep(0.01)
    assert len(engine.warmed) == 1 and engine.warmed[0].text == "transcript"


def test_list_limit_and_order(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        ids = [upload(requests, srv.url, text=f"t{i}").json()["id"] for i in range(3)]
        url = f"{srv.url}/api/v1/audio/reference_audio"
        desc = requests.get(url, headers=AUTH, timeout=5).json()
        asc = requests.get(url, headers=AUTH, params={"order": "asc"}, timeout=5).json()
        assert sorted(o["id"] for o in desc) == sorted(ids)
        assert [o["id"] for o in asc] == ids  # upload order, even within one second
        assert [o["id"] for o in desc] == ids[::-1]
        two = requests.get(url, headers=AUTH, params={"limit": 2, "order": "desc"}, timeout=5).json()
        assert [o["id"] for o in two] == [o["id"] for o in desc[:2]]


@pytest.mark.parametrize("fmt,rate", [("wav", 24000), ("wav", 16000), ("pcm", 8000), ("mp3", 24000),
                                      ("mp3", 44100)])
def test_non_stream_decodes_at_asked_rate(server, voice: str, fmt: str, rate: int) -> None:
    audio, _ = _speak(server, voice, output_format=fmt, sample_rate=rate)
    expected_s = len(TEXT) * SAMPLES_PER_CHAR / 24000
    if fmt == "pcm":
        n, sr = len(audio) // 2, rate
    else:
        data, sr = sf.read(io.BytesIO(audio), dtype="float32")
        n = len(data)
    assert sr == rate
    tolerance = 0.08 if fmt == "mp3" else 0.01  # mp3 adds encoder delay/padding frames
    assert abs(n / sr - expected_s) < tolerance


def test_stream_events_and_duration_matches_speech_len(server, voice: str) -> None:
    events = _stream(server, voice, output_format="wav", sample_rate=16000, debug=True)
    assert len(events) >= 3
    assert all(e["error"] is None and e["request_id"] == events[0]["request_id"] for e in events)
    assert [e["output"]["finish_reason"] for e in events] == [None] * (len(events) - 1) + ["stop"]
    first = events[0]["metrics"]
    assert "first_package_time" in first and first["speech_len"] > 0 and "detail" in first
    for e in events:
        m = e["metrics"]
        assert {"speech_len", "server_cost_time", "generate_time", "rtf"} <= set(m)
        assert_ms_times(m)
    audio = b"".join(base64.b64decode(e["output"]["audio"]["data"]) for e in events)
    # streaming WAV header has unknown sizes: read the PCM after the 44-byte header
    assert audio[:4] == b"RIFF" and audio[36:40] == b"data"
    n = (len(audio) - 44) // 2
    total_speech_len = sum(e["metrics"]["speech_len"] for e in events)
    assert abs(n / 16000 - total_speech_len) < 0.001  # whole ms per chunk, yet no rounding error piles up


def test_stream_mp3_concatenates_to_valid_file(server, voice: str) -> None:
    events = _stream(server, voice, output_format="mp3", bit_rate="384k")
    audio = b"".join(base64.b64decode(e["output"]["audio"]["data"]) for e in events)
    data, sr = sf.read(io.BytesIO(audio), dtype="float32")
    assert sr == 24000 and len(data) > 0.9 * len(TEXT) * SAMPLES_PER_CHAR


def test_speed_two_halves_duration(server, voice: str) -> None:
    slow, _ = _speak(server, voice, output_format="pcm", speed=1.0)
    fast, _ = _speak(server, voice, output_format="pcm", speed=2.0)
    assert abs(len(fast) / len(slow) - 0.5) < 0.01


def test_volume_scales_rms(server, voice: str) -> None:
    def rms(b: bytes) -> float:
        x = np.frombuffer(b, "<i2").astype(np.float64) / 32767
        return float(np.sqrt(np.mean(x * x)))
    base = rms(_speak(server, voice, output_format="pcm", volume=1.0)[0])
    quiet = rms(_speak(server, voice, output_format="pcm", volume=0.5)[0])
    loud = rms(_speak(server, voice, output_format="pcm", volume=3.0)[0])  # 1.5x amplitude: clips
    assert abs(base - AMPLITUDE / np.sqrt(2)) < 0.01
    assert abs(quiet / base - 0.5) < 0.01
    assert base * 1.3 < loud <= 1.0  # clipped, never wrapped around


def test_32_simultaneous_sse_streams_complete(server, voice: str) -> None:
    results: list[int] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            events = _stream(server, voice, text="simultaneous streams")
            assert events[-1]["output"]["finish_reason"] == "stop"
            results.append(len(events))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(results) == 32


def _metric(server, name: str) -> float:
    text = requests.get(f"{server.url}/metrics", headers=AUTH, timeout=5).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_disconnect_mid_stream_frees_engine_job(tmp_path: Path) -> None:
    engine = FakeEngine(delay_s=0.05, chunk_chars=2)
    with running_server(tmp_path, engine) as srv:
        vid = upload(requests, srv.url).json()["id"]
        body = json.dumps(speech_body(vid, text="x" * 400, stream=True)).encode()
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.sendall(b"POST /api/v1/audio/speech HTTP/1.1\r\nHost: x\r\nAuthorization: " +
                     AUTH["Authorization"].encode() + b"\r\nContent-Type: application/json\r\n" +
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        got = b""
        while b"data: " not in got:
            got += sock.recv(65536)
        assert _metric(srv, "cosyserve_inflight") == 1 and engine.running == 1
        sock.close()
        deadline = time.time() + 5
        while time.time() < deadline and (engine.running or _metric(srv, "cosyserve_inflight")):
            time.sleep(0.02)
        assert engine.running == 0 and _metric(srv, "cosyserve_inflight") == 0
        assert len(engine.jobs) == 1


def test_error_after_stream_began_is_an_error_event(tmp_path: Path) -> None:
    with running_server(tmp_path, FakeEngine(chunk_chars=4, fail_after_chunks=2)) as srv:
        vid = upload(requests, srv.url).json()["id"]
        events = _stream(srv, vid)
        assert events[-1]["output"]["finish_reason"] == "error"
        assert events[-1]["error"]["code"] == "InternalError"
        assert all(e["error"] is None for e in events[:-1]) and len(events) == 3


def test_overload_answers_503_with_retry_after(tmp_path: Path) -> None:
    with running_server(tmp_path, FakeEngine(admit=False)) as srv:
        vid = upload(requests, srv.url).json()["id"]
        r = requests.post(f"{srv.url}/api/v1/audio/speech", headers=AUTH, json=speech_body(vid), timeout=5)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["code"] == "Overloaded"


def test_store_survives_restart(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        obj = upload(requests, srv.url).json()
    with running_server(tmp_path) as srv:
        assert requests.get(f"{srv.url}/api/v1/audio/reference_audio/{obj['id']}", headers=AUTH,
                            timeout=5).json() == obj
        audio, _ = _speak(srv, obj["id"], output_format="pcm")  # features loaded back from disk
        assert len(audio) > 0


def test_delete_while_synthesis_runs_finishes(tmp_path: Path) -> None:
    with running_server(tmp_path, FakeEngine(delay_s=0.02, chunk_chars=4)) as srv:
        vid = upload(requests, srv.url).json()["id"]
        r = requests.post(f"{srv.url}/api/v1/audio/speech", headers=AUTH,
                          json=speech_body(vid, stream=True), stream=True, timeout=10)
        events = SSEClient(r).events()
        next(events)
        assert requests.delete(f"{srv.url}/api/v1/audio/reference_audio/{vid}", headers=AUTH,
                               timeout=5).status_code == 200
        rest = [json.loads(e.data) for e in events]
        assert rest[-1]["output"]["finish_reason"] == "stop"


def test_graceful_drain_cancels_work_past_deadline(tmp_path: Path) -> None:
    engine = FakeEngine(delay_s=0.05, chunk_chars=1)
    with running_server(tmp_path, engine, shutdown_deadline_s=0.3) as srv:
        vid = upload(requests, srv.url).json()["id"]
        r = requests.post(f"{srv.url}/api/v1/audio/speech", headers=AUTH,
                          json=speech_body(vid, text="y" * 200, stream=True), stream=True, timeout=10)
        events = SSEClient(r).events()
        next(events)
        start = time.monotonic()
        srv.stop()
        assert time.monotonic() - start < 3
        deadline = time.time() + 2  # the fake job thread notices its cancel within one step
        while engine.running and time.time() < deadline:
            time.sleep(0.02)
        assert engine.running == 0
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{srv.url}/health", timeout=2)
