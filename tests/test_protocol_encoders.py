from __future__ import annotations

import base64
import io
import json
import struct

import numpy as np
import pytest
import soundfile as sf

from protocol.encoders import OutputPipeline, PcmEncoder, WavEncoder, float_to_s16, wav_header
from protocol.sse import chunk_metrics, speech_body, speech_chunk_event, speech_error_event, sse_event


def tone(n: int = 24000, amp: float = 0.5, rate: int = 24000) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * 440 * np.arange(n) / rate)).astype(np.float32)


def run(pipe: OutputPipeline, x: np.ndarray, pieces: int = 5) -> bytes:
    return b"".join(pipe.feed(c) for c in np.array_split(x, pieces)) + pipe.finish()


def test_wav_header_golden_bytes() -> None:
    assert wav_header(24000, 4) == (b"RIFF" + struct.pack("<I", 40) + b"WAVEfmt "
                                    + bytes.fromhex("10000000 0100 0100 c05d0000 80bb0000 0200 1000")
                                    + b"data" + struct.pack("<I", 4))
    assert wav_header(16000, None)[4:8] == b"\xff\xff\xff\xff"
    assert wav_header(16000, None)[40:44] == b"\xff\xff\xff\xff"


def test_streaming_wav_header_first_then_samples() -> None:
    enc = WavEncoder(24000, stream=True)
    first = enc.feed(np.array([1, -2], dtype=np.int16))
    assert first == wav_header(24000, None) + b"\x01\x00\xfe\xff"
    assert enc.feed(np.array([3], dtype=np.int16)) == b"\x03\x00"
    assert enc.finish() == b""


def test_nonstream_wav_has_exact_sizes() -> None:
    enc = WavEncoder(8000, stream=False)
    assert enc.feed(np.array([1, 2], dtype=np.int16)) == b""
    assert enc.feed(np.array([3], dtype=np.int16)) == b""
    assert enc.finish() == wav_header(8000, 6) + b"\x01\x00\x02\x00\x03\x00"


def test_empty_stream_wav_still_a_header() -> None:
    assert WavEncoder(24000, stream=True).finish() == wav_header(24000, None)


def test_pcm_golden() -> None:
    assert PcmEncoder().feed(np.array([0, 1, -1, 32767, -32768], dtype=np.int16)) == \
        bytes.fromhex("0000 0100 ffff ff7f 0080")


def test_float_to_s16_clips_instead_of_wrapping() -> None:
    out = float_to_s16(np.array([0.5, -0.5, 0.9, -0.9, 1.2], dtype=np.float32), gain=3.0)
    assert out.tolist() == [32767, -32767, 32767, -32767, 32767]
    assert float_to_s16(np.array([0.5], dtype=np.float32)).tolist() == [16384]


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 24000, 44100, 48000])
@pytest.mark.parametrize("stream", [True, False])
def test_wav_pipeline_decodes_at_rate(rate: int, stream: bool) -> None:
    x = tone()
    audio, sr = sf.read(io.BytesIO(run(OutputPipeline("wav", rate, stream=stream), x)), dtype="float32")
    assert sr == rate
    assert abs(len(audio) - len(x) * rate / 24000) <= 2


def test_pcm_pipeline_resampled_length() -> None:
    pipe = OutputPipeline("pcm", 16000)
    out = run(pipe, tone(48000), pieces=13)
    assert abs(len(out) // 2 - 32000) <= 2 and pipe.samples_out == len(out) // 2


def test_pcm_passthrough_at_24k_is_exact() -> None:
    x = tone(100)
    assert run(OutputPipeline("pcm", 24000), x) == float_to_s16(x).tobytes()


@pytest.mark.parametrize("rate,kbps", [(24000, 48), (32000, 192), (8000, 320), (48000, 16)])
def test_mp3_decodes_back(rate: int, kbps: int) -> None:
    data = run(OutputPipeline("mp3", rate, kbps), tone(48000))
    audio, sr = sf.read(io.BytesIO(data), dtype="float32")
    assert sr == rate
    assert len(audio) >= 2 * rate * 0.95  # encoder padding adds, never drops


def test_volume_scales_rms() -> None:
    x = tone(24000, amp=0.2)

    def rms(vol: float) -> float:
        pcm = np.frombuffer(run(OutputPipeline("pcm", 24000, volume=vol), x), dtype="<i2")
        return float(np.sqrt(np.mean((pcm / 32767.0) ** 2)))

    assert rms(0.5) / rms(1.0) == pytest.approx(0.5, rel=1e-3)
    assert rms(3.0) / rms(1.0) == pytest.approx(3.0, rel=1e-3)  # 0.6 peak: no clipping yet
    loud = np.frombuffer(run(OutputPipeline("pcm", 24000, volume=3.0), tone(24000, amp=0.9)), dtype="<i2")
    assert loud.max() == 32767 and loud.min() == -32767  # clipped, never wrapped


def test_sse_framing() -> None:
    assert sse_event({"a": "中"}) == 'data: {"a":"中"}\n\n'.encode()
    m = chunk_metrics(0.5, 0.25, 0.2, first_package_time_s=0.25)
    assert m == {"speech_len": 0.5, "server_cost_time": 0.25, "generate_time": 0.2, "rtf": 0.5,
                 "first_package_time": 0.25}
    ev = speech_chunk_event("r", "a", base64.b64encode(b"x").decode(), None, m)
    assert ev.startswith(b"data: ") and ev.endswith(b"\n\n") and ev.count(b"\n") == 2
    obj = json.loads(ev[6:])
    assert obj == {"request_id": "r", "output": {"finish_reason": None, "audio": {"id": "a", "data": "eA=="}},
                   "error": None, "metrics": m}
    err = json.loads(speech_error_event("r", "a", "InternalError", "boom")[6:])
    assert err["output"]["finish_reason"] == "error" and err["error"] == {"code": "InternalError", "message": "boom"}


def test_metrics_times_to_the_millisecond() -> None:
    m = chunk_metrics(0.1 + 0.2, 0.9119999999999777, 0.30000000000000004, first_package_time_s=1 / 3,
                      detail={"llm_s": 0.1 + 0.2, "llm_tokens": 7, "flow_batch": 2})
    assert m == {"speech_len": 0.3, "server_cost_time": 0.912, "generate_time": 0.3, "rtf": 3.04,
                 "first_package_time": 0.333, "detail": {"llm_s": 0.3, "llm_tokens": 7, "flow_batch": 2}}
    assert b'"server_cost_time":0.912,' in sse_event(m)  # no float noise on the wire
    assert isinstance(chunk_metrics(1, 0, 0)["generate_time"], float)  # numbers keep the contract's type


def test_non_stream_body() -> None:
    obj = json.loads(speech_body("r", "a", "eA==", 1))
    assert obj == {"request_id": "r", "output": {"finish_reason": None, "audio": {"id": "a", "data": "eA=="}},
                   "usage": 1}
