"""Shared pieces for tests/test_server_*.py: a running server with fakes, audio files, requests."""
from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lameenc
import numpy as np
import soundfile as sf

from server.app import ServerThread, create_app
from server.config import ServerConfig
from tests.fakes import FakeEngine, FakeExtractor

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "CosyVoice2-0.5B"


@contextmanager
def running_server(data_dir: Path, engine: FakeEngine | None = None, **overrides: Any) -> Iterator[ServerThread]:
    cfg = ServerConfig(port=0, data_dir=data_dir, tokens=(TOKEN, "second-token"), workers=2, **overrides)
    app = create_app(cfg, engine=engine or FakeEngine(), extract_prompt=FakeExtractor())
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
