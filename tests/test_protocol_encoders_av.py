"""Opus (Ogg), AAC (ADTS) and FLAC through PyAV: each decodes back to the tone it was fed, streamed
output arrives while feeding, and the one-shot FLAC carries its exact length."""
from __future__ import annotations

import io

import av
import numpy as np
import pytest
import soundfile as sf

from protocol.encoders import OutputPipeline, make_encoder
from protocol.encoders_av import AV_FORMATS, can_encode

RATE = 24000
FREQ_HZ = 440.0
CONTENT_TYPES = {"opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac"}


def tone(seconds: float) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * FREQ_HZ * np.arange(int(seconds * RATE)) / RATE)).astype(np.float32)


def decode(data: bytes) -> tuple[np.ndarray, int]:
    """Any of the three with ffmpeg's decoders (libsndfile reads no ADTS)."""
    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_ndarray().reshape(-1) for f in container.decode(audio=0)]
        rate = container.streams.audio[0].rate
    return np.concatenate(frames).astype(np.float32), rate


def peak_hz(audio: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.argmax(spectrum) * rate / len(audio))


def encode(fmt: str, stream: bool, pcm: np.ndarray, pieces: int = 5) -> tuple[list[bytes], bytes]:
    pipe = OutputPipeline(fmt, RATE, stream=stream)
    fed = [pipe.feed(part) for part in np.array_split(pcm, pieces)]
    return fed, pipe.finish()


@pytest.mark.parametrize("fmt", sorted(AV_FORMATS))
def test_this_build_can_encode_every_format(fmt: str) -> None:
    assert can_encode(fmt)
    assert make_encoder(fmt, RATE, 128, stream=True).content_type == CONTENT_TYPES[fmt]


def test_formats_outside_pyav_are_not_its_to_encode() -> None:
    assert not can_encode("mp3") and not can_encode("ogg")


@pytest.mark.parametrize("fmt", sorted(AV_FORMATS))
@pytest.mark.parametrize("stream", [True, False])
def test_decodes_back_to_the_tone_and_its_length(fmt: str, stream: bool) -> None:
    fed, tail = encode(fmt, stream, tone(1.0))
    audio, rate = decode(b"".join(fed) + tail)
    assert abs(len(audio) / rate - 1.0) < 0.1  # AAC adds its priming frame and padding (~70 ms)
    assert abs(peak_hz(audio, rate) - FREQ_HZ) < 3


@pytest.mark.parametrize("fmt", sorted(AV_FORMATS))
def test_streamed_bytes_arrive_while_feeding(fmt: str) -> None:
    fed, _ = encode(fmt, True, tone(1.0), pieces=5)  # 200 ms a piece
    assert all(fed[1:]), [len(b) for b in fed]  # the encoder's delay may hold back the first piece only


@pytest.mark.parametrize("fmt", sorted(AV_FORMATS))
def test_one_shot_returns_everything_at_finish(fmt: str) -> None:
    fed, tail = encode(fmt, False, tone(0.5))
    assert fed == [b""] * 5 and tail


@pytest.mark.parametrize("fmt", ["flac", "opus"])
@pytest.mark.parametrize("seconds", [0.3, 0.75, 2.5])
def test_one_shot_flac_and_ogg_opus_have_their_exact_length_for_libsndfile(fmt: str, seconds: float) -> None:
    _, data = encode(fmt, False, tone(seconds))
    info = sf.info(io.BytesIO(data))
    assert (info.samplerate, info.frames) == (RATE, int(seconds * RATE))


@pytest.mark.parametrize("fmt", ["flac", "opus"])
def test_nothing_fed_still_makes_a_header(fmt: str) -> None:
    pipe = OutputPipeline(fmt, RATE, stream=True)
    data = pipe.feed(np.zeros(0, np.float32)) + pipe.finish()
    assert data[:4] == (b"fLaC" if fmt == "flac" else b"OggS")
