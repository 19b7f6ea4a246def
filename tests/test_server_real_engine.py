"""End to end: the real server, the real `Engine` and `PromptExtractor` on the project's tiny model.

The tiny model has random weights, so its audio is noise, but everything around it is real:
upload -> prompt features -> engine (batching, streaming, speed, cancel) -> encoders -> wire.
Clients are the ones the zh document uses (requests, sseclient-py, websocket-client).
Texts are short: the random LLM rarely samples EOS, so a request runs to its max length
(20 speech tokens per text token, 40 ms of audio each).

One module-scoped server keeps the whole file well under a few minutes on 2 cores
(run with OMP_NUM_THREADS=2).
"""
from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import io
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import soundfile as sf
import websocket
from sseclient import SSEClient

from server.config import ServerConfig
from server.server_thread import ServerThread
from server.wiring import create_app
from tests.server_helpers import DocClient

TOKEN = "real-engine-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "CosyVoice2-0.5B"
WS_PATH = "/api-ws/v1/audio/speech"
TOKEN_S = 0.04  # one 25 Hz speech token = 2 mel frames = 960 samples at 24 kHz
SHORT = "你好。"
PROMPT_TEXT = "希望你以後能夠做得比我還好喲"


# ---- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))  # 2 cores shared: don't oversubscribe
    cfg = ServerConfig(port=0, data_dir=tmp_path_factory.mktemp("real-data"), tokens=(TOKEN,), workers=2,
                       model_dir=tiny_model_dir)
    app = create_app(cfg)  # real Engine + real PromptExtractor (build_engine / build_extractor)
    try:
        with ServerThread(app) as srv:
            yield srv
    finally:
        torch.set_num_threads(threads)


def voiced(seconds: float, rate: int) -> np.ndarray:
    """A voice-like signal: harmonics of a gliding ~120 Hz pitch under a syllable-rate envelope."""
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    wave = sum(np.sin(k * phase) / k for k in range(1, 10))
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)
    return (0.2 * wave * envelope).astype(np.float32)


def wav_file(seconds: float, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, voiced(seconds, rate), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _upload(srv: ServerThread, data: bytes, filename: str) -> dict[str, Any]:
    r = requests.post(f"{srv.url}/api/v1/audio/reference_audio", headers=AUTH,
                      files={"file": (filename, data)}, data={"text": PROMPT_TEXT}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def voices(server: ServerThread) -> dict[str, dict[str, Any]]:
    return {"16k": _upload(server, wav_file(2.5, 16000), "voice16k.wav"),
            "44k": _upload(server, wav_file(2.2, 44100), "voice44k.wav")}


@pytest.fixture(scope="module")
def voice(voices: dict[str, dict[str, Any]]) -> str:
    return voices["16k"]["id"]


# ---- helpers -----------------------------------------------------------------------------------

def _body(voice_id: str, text: str = SHORT, stream: bool = True, **inp: Any) -> dict[str, Any]:
    return {"model": MODEL, "stream": stream,
            "input": {"mode": "fast_replication", "text": text, "reference_audio_id": voice_id, **inp}}


def _decode(audio: bytes, fmt: str, rate: int) -> np.ndarray:
    """The file as float samples; checks the container's rate is the one asked for."""
    if fmt == "pcm":
        assert len(audio) % 2 == 0
        return np.frombuffer(audio, dtype="<i2").astype(np.float32) / 32768.0
    samples, got_rate = sf.read(io.BytesIO(audio), dtype="float32")
    assert got_rate == rate
    return samples


def _sse(srv: ServerThread, body: dict[str, Any]) -> tuple[list[dict[str, Any]], bytes]:
    """The zh document's streaming client: requests + SSEClient, chunks appended in order."""
    with requests.post(f"{srv.url}/api/v1/audio/speech", headers={**AUTH, "Content-Type": "application/json"},
                       json=body, stream=True, timeout=60) as response:
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/event-stream")
        events, audio = [], b""
        for msg in SSEClient(response).events():
            data = json.loads(msg.data)
            assert data["error"] is None, data["error"]
            events.append(data)
            audio += base64.b64decode(data["output"]["audio"]["data"])
    return events, audio


def _llm_tokens(events: list[dict[str, Any]]) -> int:
    return sum(e["metrics"].get("detail", {}).get("llm_tokens", 0) for e in events)


def _metric(srv: ServerThread, name: str) -> float:
    text = requests.get(f"{srv.url}/metrics", headers=AUTH, timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


# ---- reference audio ---------------------------------------------------------------------------

def test_upload_list_and_get(server: ServerThread, voices: dict[str, dict[str, Any]]) -> None:
    listed = requests.get(f"{server.url}/api/v1/audio/reference_audio?limit=10&order=desc", headers=AUTH,
                          timeout=10)
    assert listed.status_code == 200
    by_id = {obj["id"]: obj for obj in listed.json()}
    for v in voices.values():
        assert by_id[v["id"]] == v and v["text"] == PROMPT_TEXT
        got = requests.get(f"{server.url}/api/v1/audio/reference_audio/{v['id']}", headers=AUTH, timeout=10)
        assert got.status_code == 200 and got.json() == v
    assert voices["44k"]["filename"] == "voice44k.wav"


def test_upload_keeps_the_transcript_ids_the_engine_would_derive(server: ServerThread, voice: str) -> None:
    stored = server.app.store.load_prompt(voice)  # what the upload wrote beside the features
    assert stored is not None and stored.text_ids
    without = dataclasses.replace(stored, text_ids=None)
    assert stored.text_ids == server.app.engine.text.transcript_ids(without)  # type: ignore[attr-defined]


def test_an_uploaded_voice_has_its_flow_prefix_before_its_first_stream(server: ServerThread, voice: str) -> None:
    """The upload asks the engine to precompute the voice's streaming-flow prefix in the background
    (server/state.py warm_voice -> kernels/runtime/voice_prefix.py)."""
    from kernels.runtime.voice_prefix import voice_key

    stored = server.app.store.load_prompt(voice)
    assert stored is not None
    prefix = server.app.engine.runner.voice_prefix  # type: ignore[attr-defined]
    key = voice_key(stored.speech_tokens, stored.mel, stored.embedding)
    deadline = time.monotonic() + 30
    while not prefix.holds(key) and time.monotonic() < deadline:  # a background task: poll its outcome
        time.sleep(0.05)
    assert prefix.holds(key)
    assert _metric(server, "cosyserve_engine_voice_prefix_bytes") > 0  # what /metrics shows of it
    assert _metric(server, "cosyserve_engine_voice_prefix_misses_total") >= 1


def test_upload_below_16k_is_400(server: ServerThread) -> None:
    r = requests.post(f"{server.url}/api/v1/audio/reference_audio", headers=AUTH,
                      files={"file": ("voice8k.wav", wav_file(2.0, 8000))}, data={"text": PROMPT_TEXT},
                      timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "InvalidParameter" and "8000 Hz" in r.json()["message"]
    assert "16000 Hz" in r.json()["message"]


# ---- one-shot JSON -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode,fmt,rate,voice_key", [
    ("fast_replication", "wav", 24000, "16k"),
    ("cross_lingual_replication", "mp3", 16000, "44k"),
    ("natural_language_replication", "pcm", 22050, "16k"),
])
def test_non_stream_modes(server: ServerThread, voices: dict[str, dict[str, Any]], mode: str, fmt: str,
                          rate: int, voice_key: str) -> None:
    inp = {"mode": mode, "output_format": fmt, "sample_rate": rate, "bit_rate": "48k"}
    if mode == "natural_language_replication":
        inp["instruct"] = "用四川話說"
    r = requests.post(f"{server.url}/api/v1/audio/speech", headers=AUTH,
                      json=_body(voices[voice_key]["id"], stream=False, **inp), timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()
    audio = base64.b64decode(data["output"]["audio"]["data"])
    assert data["usage"] == len(audio) and data["output"]["finish_reason"] is None
    samples = _decode(audio, fmt, rate)
    seconds = len(samples) / rate
    # > 0 and at most the LLM's length cap for a few text tokens (plus MP3 frame padding)
    assert 0.2 < seconds < 12.0
    if fmt != "mp3":  # exact containers: whole 40 ms tokens, give or take the resampler's rounding
        tokens = seconds / TOKEN_S
        assert abs(tokens - round(tokens)) * TOKEN_S < 0.003
    assert np.isfinite(samples).all() and np.abs(samples).max() > 0


# ---- SSE ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,tolerance_s", [("wav", 0.001), ("pcm", 0.001), ("mp3", 0.08)])
def test_sse_stream_like_the_document(server: ServerThread, voice: str, fmt: str, tolerance_s: float) -> None:
    body = _body(voice, mode="natural_language_replication", instruct="用四川話說", output_format=fmt,
                 sample_rate=24000, bit_rate="48k", volume=2.0, speed=1.0, debug=True)
    events, audio = _sse(server, body)
    assert events[-1]["output"]["finish_reason"] == "stop"
    assert all(e["output"]["finish_reason"] is None for e in events[:-1])
    assert len({e["request_id"] for e in events}) == 1
    assert "first_package_time" in events[0]["metrics"]
    samples = _decode(audio, fmt, 24000)
    speech_len = sum(e["metrics"]["speech_len"] for e in events)
    # MP3 frames carry encoder delay + padding: the decoded file is a frame or two longer
    assert abs(len(samples) / 24000 - speech_len) <= tolerance_s
    assert speech_len > 0.2
    if fmt != "mp3":
        assert abs(speech_len - _llm_tokens(events) * TOKEN_S) < 0.002  # each token's audio, exactly once


def test_speed_stretches_duration(server: ServerThread, voice: str) -> None:
    """The engine time-stretches the mel: seconds per LLM token scale as 1/speed (EOS is random
    with random weights, so compare per token rather than whole files)."""
    per_token = {}
    for speed in (1.0, 2.0):
        events, audio = _sse(server, _body(voice, speed=speed, debug=True))
        per_token[speed] = len(_decode(audio, "wav", 24000)) / 24000 / _llm_tokens(events)
    assert per_token[1.0] == pytest.approx(TOKEN_S, rel=0.02)
    assert per_token[2.0] == pytest.approx(TOKEN_S / 2, rel=0.05)


def test_volume_scales_rms(server: ServerThread, voice: str) -> None:
    rms, peak = {}, {}
    for volume in (1.0, 0.5, 4.0):
        _, audio = _sse(server, _body(voice, volume=volume))
        samples = _decode(audio, "wav", 24000)
        rms[volume] = float(np.sqrt(np.mean(samples**2)))
        peak[volume] = float(np.abs(samples).max())
    # different draws of the random model, so ratios are loose; the level itself is stable
    assert 0.35 < rms[0.5] / rms[1.0] < 0.65
    assert rms[4.0] / rms[1.0] > 2.0
    assert peak[4.0] <= 1.0  # clipped, never wrapped around


# ---- WebSocket ---------------------------------------------------------------------------------

def test_websocket_duplex_like_the_document(server: ServerThread, voice: str) -> None:
    client = DocClient(server.url.replace("http://", "ws://") + WS_PATH, {
        "mode": "fast_replication", "texts": ["你好,", "世界。"], "voice": voice,
        "output_format": "wav", "sample_rate": 24000, "volume": 1.0, "speed": 1.0}, token=TOKEN)
    runner = threading.Thread(target=client.run, daemon=True)
    runner.start()
    runner.join(120)
    assert not runner.is_alive(), "the client never saw task-finished"
    assert not client.errors and client.failed is None, (client.errors, client.failed)
    assert client.events[0] == "task-started" and client.events[-1] == "task-finished"
    assert client.events.count("result-generated") >= 1
    samples = _decode(client.audio, "wav", 24000)
    assert len(samples) > 0
    assert abs(len(samples) / 24000 - client.metrics["speech_len"]) < 0.002
    assert client.metrics["generate_time"] > 0


def _ws_task(ws: websocket.WebSocket, voice: str, texts: list[str], fmt: str) -> tuple[list[str], bytes, float]:
    task_id = str(uuid.uuid4())

    def send(action: str, payload: dict[str, Any]) -> None:
        ws.send(json.dumps({"header": {"action": action, "task_id": task_id, "streaming": "duplex"},
                            "payload": payload}))

    send("run-task", {"task_group": "audio", "task": "tts", "function": "SpeechSynthesizer", "model": MODEL,
                      "parameters": {"mode": "fast_replication", "reference_audio_id": voice, "output_format": fmt,
                                     "sample_rate": 16000}, "input": {}})
    events, audio, speech_len = [], b"", 0.0
    first = json.loads(ws.recv())
    events.append(first["header"]["event"])
    for text in texts:
        send("continue-task", {"input": {"text": text}})
    send("finish-task", {"input": {}})
    while events[-1] not in ("task-finished", "task-failed"):
        msg = json.loads(ws.recv())
        assert msg["header"]["task_id"] == task_id
        events.append(msg["header"]["event"])
        if events[-1] == "result-generated":
            assert msg["payload"]["metrics"]["speech_len"] > 0
            audio += base64.b64decode(msg["payload"]["output"]["audio"]["data"])
            speech_len += msg["payload"]["metrics"]["speech_len"]
    return events, audio, speech_len


def test_websocket_two_tasks_on_one_connection(server: ServerThread, voice: str) -> None:
    ws = websocket.create_connection(server.url.replace("http://", "ws://") + WS_PATH, header=AUTH, timeout=60)
    try:
        for fmt, texts in (("pcm", ["你", "好。"]), ("wav", ["早安。"])):
            events, audio, speech_len = _ws_task(ws, voice, texts, fmt)
            assert events[0] == "task-started" and events[-1] == "task-finished", events
            assert "result-generated" in events
            samples = _decode(audio, fmt, 16000)
            assert abs(len(samples) / 16000 - speech_len) < 0.002
    finally:
        ws.close()


def test_websocket_finish_without_text_fails(server: ServerThread, voice: str) -> None:
    url = server.url.replace("http://", "ws://") + WS_PATH
    ws = websocket.create_connection(url, header=AUTH, timeout=60)
    try:
        events, audio, _ = _ws_task(ws, voice, [], "wav")
    finally:
        ws.close()
    assert events == ["task-started", "task-failed"] and audio == b""  # no audio of an empty text


# ---- load and cancellation ---------------------------------------------------------------------

def test_32_simultaneous_streams(server: ServerThread, voice: str) -> None:
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(_sse, server, _body(voice, text="好。", debug=True)) for _ in range(32)]
        results = [f.result(timeout=150) for f in futures]  # re-raises a client's failure
    batches = []
    for events, audio in results:
        assert events[-1]["output"]["finish_reason"] == "stop"
        samples = _decode(audio, "wav", 24000)
        assert abs(len(samples) / 24000 - sum(e["metrics"]["speech_len"] for e in events)) < 0.002
        assert len(samples) > 0
        batches += [e["metrics"]["detail"]["flow_batch"] for e in events if "detail" in e["metrics"]]
    assert max(batches) > 1  # the engine batched concurrent requests
    assert _metric(server, "cosyserve_inflight") == 0


def test_client_disconnect_frees_the_engine(server: ServerThread, voice: str) -> None:
    response = requests.post(f"{server.url}/api/v1/audio/speech", headers=AUTH,
                             json=_body(voice, text="今天天氣很好,我們一起去公園散步吧。"), stream=True, timeout=60)
    assert response.status_code == 200
    lines = response.iter_lines()  # keep a reference: a dropped iterator closes the socket itself
    assert next(lines).startswith(b"data: ")
    assert _metric(server, "cosyserve_inflight") == 1
    response.close()  # gone mid-stream
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        # the cache is freed when the request's in-flight chunk (stage thread) is back: maybe a bit later
        if (_metric(server, "cosyserve_inflight") == 0 and _metric(server, "cosyserve_engine_running") == 0
                and _metric(server, "cosyserve_engine_flow_cache_bytes") == 0):
            break
        time.sleep(0.1)
    assert _metric(server, "cosyserve_inflight") == 0
    assert _metric(server, "cosyserve_engine_running") == 0
    assert _metric(server, "cosyserve_engine_kv_used_tokens") == 0
    assert _metric(server, "cosyserve_engine_flow_cache_bytes") == 0  # its flow cache reservation is freed
    assert _metric(server, "cosyserve_engine_flow_cache_pool_bytes") > 0
    steps = _metric(server, "cosyserve_engine_steps_total")
    time.sleep(0.3)
    assert _metric(server, "cosyserve_engine_steps_total") == steps  # nothing left running


def test_startup_line_names_url_and_the_auto_chosen_settings(server: ServerThread) -> None:
    from server.wiring import startup_line

    line = startup_line(server.app, server.port)
    assert line.startswith(f"http://127.0.0.1:{server.port} · device cpu, llm fp32, flow fp32, flow steps 10, threads 1 (engine thread only), ")
    for part in ("stage workers", "attention torch SDPA", "flow cache", "max batch 32", "max inflight 256"):
        assert part in line, (part, line)


def test_text_is_prepared_on_the_pool_never_the_engine_or_the_loop(server: ServerThread, voice: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Normalisation and tokenisation run on the server's worker threads: a long text must not stall
    the decode thread (every running stream) nor the event loop (every connection)."""
    from frontend.text_normalize import TextFrontend

    calls: list[tuple[str, str]] = []
    for name in ("normalize", "encode"):
        original = getattr(TextFrontend, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):  # type: ignore[no-untyped-def]
            calls.append((_name, threading.current_thread().name))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(TextFrontend, name, spy)
    events, _ = _sse(server, _body(voice, text="第一句话。第二句话，有数字123。"))
    assert events[-1]["output"]["finish_reason"] == "stop"
    ws = websocket.create_connection(server.url.replace("http://", "ws://") + WS_PATH, header=AUTH, timeout=60)
    try:
        ws_events, _, _ = _ws_task(ws, voice, ["你好，", "世界。"], "pcm")
    finally:
        ws.close()
    assert ws_events[-1] == "task-finished", ws_events
    # normalisation runs in the text child process (the server's default): never in this process's threads
    assert server.app.engine.text.process is not None  # type: ignore[attr-defined]
    assert {n for n, _ in calls} == {"encode"}
    threads = {t for _, t in calls}
    assert threads and all(t.startswith("cosy-work") for t in threads), threads


def test_the_cpu_fast_preset_reaches_the_engine(tiny_model_dir: Path) -> None:
    from server.config import ServerConfig
    from server.wiring import build_engine

    engine = build_engine(ServerConfig(tokens=("x",), preset="cpu-fast", warmup=0), tiny_model_dir)
    try:
        line = engine.describe()
        # the tiny model is small: the preset leaves int8 off there (slower), flow steps apply
        assert "flow steps 5" in line and "int8" not in line, line
    finally:
        engine.shutdown(1.0)
