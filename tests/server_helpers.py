"""Shared pieces for tests/test_server_*.py: a running server with fakes, audio files, requests."""
from __future__ import annotations

import base64
import io
import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lameenc
import numpy as np
import soundfile as sf
import websocket

from server.config import ServerConfig
from server.server_thread import ServerThread
from server.wiring import create_app
from tests.fakes import FakeEngine, FakeExtractor

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "CosyVoice2-0.5B"


@contextmanager
def running_server(data_dir: Path, engine: FakeEngine | None = None, extractor: FakeExtractor | None = None,
                   **overrides: Any) -> Iterator[ServerThread]:
    cfg = ServerConfig(port=0, data_dir=data_dir, tokens=(TOKEN, "second-token"), workers=2, **overrides)
    app = create_app(cfg, engine=engine or FakeEngine(), extract_prompt=extractor or FakeExtractor())
    with ServerThread(app) as srv:
        yield srv


def tone(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def wav_bytes(seconds: float = 1.0, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, tone(seconds, rate), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def pcm_bytes(seconds: float = 1.0, rate: int = 16000) -> bytes:
    return (tone(seconds, rate) * 32767).astype("<i2").tobytes()


def mp3_bytes(seconds: float = 1.0, rate: int = 24000) -> bytes:
    enc = lameenc.Encoder()
    enc.set_bit_rate(64)
    enc.set_in_sample_rate(rate)
    enc.set_channels(1)
    enc.set_quality(7)
    pcm = (tone(seconds, rate) * 32767).astype("<i2").tobytes()
    return bytes(enc.encode(pcm)) + bytes(enc.flush())


def speech_body(voice_id: str, text: str = "hello world, this is a test", stream: bool = False,
                **inp: Any) -> dict[str, Any]:
    return {"model": MODEL, "stream": stream,
            "input": {"mode": "fast_replication", "text": text, "reference_audio_id": voice_id, **inp}}


def upload(requests_mod: Any, url: str, data: bytes | None = None, filename: str = "ref.wav",
           text: str = "希望你以後能夠做得比我還好喲", extra: dict[str, str] | None = None) -> Any:
    return requests_mod.post(f"{url}/api/v1/audio/reference_audio", headers=AUTH,
                             files={"file": (filename, data if data is not None else wav_bytes())},
                             data={"text": text, **(extra or {})}, timeout=10)


def assert_ms_times(metrics: dict[str, Any]) -> None:
    """Every time in a chunk's metrics is a float with at most 3 decimals (no float noise)."""
    times = {k: v for k, v in metrics.items() if k in ("speech_len", "server_cost_time", "generate_time",
                                                        "first_package_time")}
    times |= {k: v for k, v in metrics.get("detail", {}).items() if k.endswith("_s")}
    assert {"speech_len", "server_cost_time", "generate_time"} <= set(times)
    for key, value in times.items():
        assert isinstance(value, float) and value == round(value, 3), (key, value)


# ---- WebSocket duplex messages and the document's client --------------------------------------

def run_task(task_id: str, voice: str, **params: Any) -> str:
    parameters = {"mode": "fast_replication", "reference_audio_id": voice, "output_format": "wav",
                  "sample_rate": 24000, "bit_rate": "192k", "volume": 1.0, "instruct": "", "speed": 1.0,
                  "debug": True, **params}
    return json.dumps({"header": {"action": "run-task", "task_id": task_id, "streaming": "duplex"},
                       "payload": {"task_group": "audio", "task": "tts", "function": "SpeechSynthesizer",
                                   "model": "cosyvoice-v2", "parameters": parameters, "input": {}}})


def continue_task(task_id: str, text: str) -> str:
    return json.dumps({"header": {"action": "continue-task", "task_id": task_id, "streaming": "duplex"},
                       "payload": {"input": {"text": text}}})


def finish_task(task_id: str) -> str:
    return json.dumps({"header": {"action": "finish-task", "task_id": task_id, "streaming": "duplex"},
                       "payload": {"input": {}}})


class DocClient:
    """The document's TTSClient flow (WebSocketApp, callbacks, metrics arithmetic), trimmed."""

    def __init__(self, url: str, params: dict[str, Any], token: str = TOKEN) -> None:
        self.url, self.params, self.token = url, params, token
        self.task_id = str(uuid.uuid4())
        self.chunk_metrics: list[dict[str, Any]] = []
        self.audio = b""
        self.events: list[str] = []
        self.metrics: dict[str, Any] = {}
        self.errors: list[Any] = []
        self.failed: dict[str, Any] | None = None  # the task-failed message, if any

    def on_open(self, ws: websocket.WebSocketApp) -> None:
        p = {k: v for k, v in self.params.items() if k != "texts"}
        ws.send(run_task(self.task_id, **p))

    def on_message(self, ws: websocket.WebSocketApp, message: str) -> None:
        msg = json.loads(message)
        event = msg["header"]["event"]
        self.events.append(event)
        if event == "task-started":
            for text in self.params["texts"]:
                ws.send(continue_task(self.task_id, text))
            ws.send(finish_task(self.task_id))
            self.last = time.time()
        elif event == "result-generated":
            m = msg["payload"]["metrics"]
            now = time.time()
            m["client_cost_time"], self.last = now - self.last, now
            self.audio += base64.b64decode(msg["payload"]["output"]["audio"]["data"])
            m["client_rtf"] = m["client_cost_time"] / m["speech_len"]
            self.chunk_metrics.append(m)
        elif event in ("task-finished", "task-failed"):
            if event == "task-finished":
                cm = self.chunk_metrics
                self.metrics = {"server_first_package_time": cm[0]["server_cost_time"],
                                "server_rtf": sum(m["server_cost_time"] for m in cm) / sum(m["speech_len"] for m in cm),
                                "generate_time": sum(m["generate_time"] for m in cm),
                                "speech_len": sum(m["speech_len"] for m in cm)}
            else:
                self.failed = msg
            ws.close()

    def on_error(self, ws: websocket.WebSocketApp, error: Any) -> None:
        self.errors.append(error)

    def run(self) -> None:
        app = websocket.WebSocketApp(self.url, header={"Authorization": f"Bearer {self.token}"},
                                     on_open=self.on_open, on_message=self.on_message, on_error=self.on_error)
        app.run_forever()
