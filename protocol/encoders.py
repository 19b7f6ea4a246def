"""Audio output: 24 kHz float32 PCM -> resample -> volume -> s16 -> wav / pcm / mp3 bytes
(and opus / aac / flac through `protocol.encoders_av`).

Encoders take int16 mono samples; `OutputPipeline` takes the engine's float32 and does the rest.
Both have the shape `feed(x) -> bytes`, `finish() -> bytes`: the concatenation of every
returned piece is one valid file of the asked format.
"""
from __future__ import annotations

import struct
from typing import Protocol

import lameenc
import numpy as np
import soxr

from protocol.encoders_av import AV_FORMATS, AvEncoder

ENGINE_SAMPLE_RATE = 24000
WAV_UNKNOWN_SIZE = 0xFFFFFFFF  # streaming WAV: sizes unknown, readers take "until EOF"
MP3_MAX_KBPS = 320
MP3_QUALITY = 2  # LAME 0 best .. 9 worst; 2 is LAME's "high quality" preset, fast enough here


class Encoder(Protocol):
    content_type: str

    def feed(self, samples: np.ndarray) -> bytes: ...
    def finish(self) -> bytes: ...


def wav_header(sample_rate: int, data_bytes: int | None) -> bytes:
    """44-byte PCM s16 mono WAV header; `data_bytes=None` writes the streaming 0xFFFFFFFF sizes."""
    if data_bytes is None:
        riff_size = data_size = WAV_UNKNOWN_SIZE
    else:
        riff_size, data_size = 36 + data_bytes, data_bytes
    byte_rate = sample_rate * 2
    return (b"RIFF" + struct.pack("<I", riff_size) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, byte_rate, 2, 16)
            + b"data" + struct.pack("<I", data_size))


def _s16_bytes(samples: np.ndarray) -> bytes:
    return np.ascontiguousarray(samples, dtype="<i2").tobytes()


class PcmEncoder:
    content_type = "audio/pcm"

    def feed(self, samples: np.ndarray) -> bytes:
        return _s16_bytes(samples)

    def finish(self) -> bytes:
        return b""


class WavEncoder:
    """stream=True: header first with unknown sizes; stream=False: buffer, exact header at finish."""

    content_type = "audio/wav"

    def __init__(self, sample_rate: int, stream: bool) -> None:
        self._sample_rate = sample_rate
        self._stream = stream
        self._header_sent = False
        self._buffer: list[bytes] = []

    def feed(self, samples: np.ndarray) -> bytes:
        data = _s16_bytes(samples)
        if not self._stream:
            self._buffer.append(data)
            return b""
        if self._header_sent:
            return data
        self._header_sent = True
        return wav_header(self._sample_rate, None) + data

    def finish(self) -> bytes:
        if self._stream:
            return b"" if self._header_sent else wav_header(self._sample_rate, None)
        data = b"".join(self._buffer)
        self._buffer.clear()
        return wav_header(self._sample_rate, len(data)) + data


class Mp3Encoder:
    content_type = "audio/mpeg"

    def __init__(self, sample_rate: int, bit_rate_kbps: int) -> None:
        self._lame = lameenc.Encoder()
        self._lame.set_channels(1)
        self._lame.set_in_sample_rate(sample_rate)
        # Pin the output rate: at low bit rates LAME would otherwise resample (48 kHz @ 16k -> 16 kHz),
        # and the client asked for this rate. LAME raises the bit rate to the format's minimum instead.
        self._lame.set_out_sample_rate(sample_rate)
        self._lame.set_bit_rate(min(bit_rate_kbps, MP3_MAX_KBPS))  # LAME clamps per MPEG version
        self._lame.set_quality(MP3_QUALITY)

    def feed(self, samples: np.ndarray) -> bytes:
        if len(samples) == 0:
            return b""
        return bytes(self._lame.encode(_s16_bytes(samples)))

    def finish(self) -> bytes:
        return bytes(self._lame.flush())


def make_encoder(output_format: str, sample_rate: int, bit_rate_kbps: int, stream: bool) -> Encoder:
    if output_format == "wav":
        return WavEncoder(sample_rate, stream)
    if output_format == "pcm":
        return PcmEncoder()
    if output_format == "mp3":
        return Mp3Encoder(sample_rate, bit_rate_kbps)
    if output_format in AV_FORMATS:
        return AvEncoder(output_format, sample_rate, stream)
    raise ValueError(f"unknown output format {output_format!r}")


def float_to_s16(pcm: np.ndarray, gain: float = 1.0) -> np.ndarray:
    """Gain, clip to [-1, 1] (loud never wraps around), scale to int16."""
    x = np.asarray(pcm, dtype=np.float32)
    if gain != 1.0:
        x = x * np.float32(gain)
    return np.round(np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)


class OutputPipeline:
    """Engine float32 @ 24 kHz -> asked rate (streaming soxr) -> volume -> s16 -> encoder."""

    def __init__(self, output_format: str, sample_rate: int, bit_rate_kbps: int = 192,
                 volume: float = 1.0, stream: bool = True, in_rate: int = ENGINE_SAMPLE_RATE) -> None:
        self.sample_rate = sample_rate
        self._volume = volume
        self._encoder = make_encoder(output_format, sample_rate, bit_rate_kbps, stream)
        self._resampler = (None if sample_rate == in_rate
                           else soxr.ResampleStream(in_rate, sample_rate, 1, dtype="float32"))
        self.samples_out = 0  # samples handed to the encoder, at `sample_rate`

    @property
    def content_type(self) -> str:
        return self._encoder.content_type

    def _resample(self, pcm: np.ndarray, last: bool) -> np.ndarray:
        if self._resampler is None:
            return pcm
        return self._resampler.resample_chunk(pcm, last=last)

    def _encode(self, pcm: np.ndarray) -> bytes:
        samples = float_to_s16(pcm, self._volume)
        self.samples_out += len(samples)
        return self._encoder.feed(samples)

    def feed(self, pcm: np.ndarray) -> bytes:
        x = np.ascontiguousarray(pcm, dtype=np.float32).reshape(-1)
        return self._encode(self._resample(x, last=False))

    def finish(self) -> bytes:
        tail = b""
        if self._resampler is not None:
            tail = self._encode(self._resample(np.zeros(0, dtype=np.float32), last=True))
        return tail + self._encoder.finish()
