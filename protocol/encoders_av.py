"""Ogg Opus, AAC (ADTS) and FLAC through PyAV (the ffmpeg libraries bundled in its wheel).

Same shape as the other encoders: `feed(int16 mono) -> bytes`, `finish() -> bytes`, the pieces
concatenated are one file. Streaming hands the muxer a write-only sink, so it writes front to back
and every feed returns what the muxer wrote meanwhile; one-shot gives it a seekable buffer, so a
muxer that patches its header at the end does (FLAC: the total sample count and MD5 in STREAMINFO).
A streamed FLAC therefore says "length unknown", which ffmpeg-based players read and libsndfile
does not.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field

import av
import numpy as np
from av.audio.stream import AudioStream
from av.container import OutputContainer

# An Ogg page every 60 ms of audio (ffmpeg's default is 1 s): a stream then never holds back more than
# that, and libsndfile reads short one-shot files (with 1 s pages it refused some sub-second ones as
# malformed). About 3 Opus packets a page, ~5 kb/s of page headers.
OGG_PAGE_US = 60_000


@dataclass(frozen=True)
class AvFormat:
    container: str  # the ffmpeg muxer
    codec: str  # the ffmpeg encoder
    content_type: str
    bit_rate: int | None = None  # bits/s; None: the codec's own (lossless)
    muxer_options: dict[str, str] = field(default_factory=dict)


AV_FORMATS: dict[str, AvFormat] = {
    "opus": AvFormat("ogg", "libopus", "audio/ogg", 64_000, {"page_duration": str(OGG_PAGE_US)}),
    "aac": AvFormat("adts", "aac", "audio/aac", 96_000),
    "flac": AvFormat("flac", "flac", "audio/flac"),
}


def can_encode(output_format: str) -> bool:
    """Whether this PyAV build has the format's encoder and muxer (a distro's ffmpeg may lack libopus)."""
    spec = AV_FORMATS.get(output_format)
    return spec is not None and spec.codec in av.codecs_available and spec.container in av.formats_available


def missing_part(output_format: str) -> str:
    """What the bundled ffmpeg lacks for `output_format` (for the error message)."""
    spec = AV_FORMATS[output_format]
    if spec.codec not in av.codecs_available:
        return f"the {spec.codec} encoder"
    return f"the {spec.container} muxer"


class _WriteOnlySink:
    """A file object without seek: the muxer then never goes back to rewrite what it wrote."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


class AvEncoder:
    """Opens its muxer and codec at the first `feed` / `finish` (a few ms for FLAC), so that work runs
    where those run, on the server's thread pool, not where the encoder is made."""

    def __init__(self, output_format: str, sample_rate: int, stream: bool) -> None:
        self._spec = AV_FORMATS[output_format]
        self.content_type = self._spec.content_type
        self._rate = sample_rate
        self._sink = _WriteOnlySink() if stream else None
        self._buffer = io.BytesIO()
        self._opened: tuple[OutputContainer, AudioStream] | None = None

    def _open(self) -> tuple[OutputContainer, AudioStream]:
        if self._opened is None:
            target = self._sink if self._sink is not None else self._buffer
            container = av.open(target, "w", format=self._spec.container, options=self._spec.muxer_options)
            stream = container.add_stream(self._spec.codec, rate=self._rate, layout="mono")
            if self._spec.bit_rate is not None:
                stream.bit_rate = self._spec.bit_rate
            container.start_encoding()  # the header now: a file even if no sample ever comes
            self._opened = container, stream
        return self._opened

    def feed(self, samples: np.ndarray) -> bytes:
        self._open()
        if len(samples) == 0:
            return self._take()
        pcm = np.ascontiguousarray(samples, dtype=np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = self._rate
        self._mux(frame)  # PyAV cuts the samples into the codec's frame size, keeping the rest
        return self._take()

    def finish(self) -> bytes:
        container, _ = self._open()
        self._mux(None)  # drain the encoder
        container.close()  # the trailer (and, one-shot, the patched header)
        if self._sink is None:
            return self._buffer.getvalue()
        return self._take()

    def _mux(self, frame: av.AudioFrame | None) -> None:
        container, stream = self._open()
        for packet in stream.encode(frame):
            container.mux(packet)

    def _take(self) -> bytes:
        return self._sink.take() if self._sink is not None else b""
