"""Uploaded reference audio -> float32 mono samples, validated (decodable, >= 16 kHz, 0.5 .. 30 s).

WAV and MP3 (and anything else libsndfile reads) go through soundfile from memory. Raw PCM
(signed 16-bit little-endian mono) has no header: it is recognised by its file name
(.pcm / .raw) or, failing a decode, by an explicit `sample_rate` form field.
"""
from __future__ import annotations

import io

import numpy as np
import soundfile as sf

from protocol.errors import InvalidParameter

MIN_DURATION_S = 0.5
MAX_DURATION_S = 30.0
DEFAULT_PCM_SAMPLE_RATE = 16000
PCM_RATE_RANGE = (8000, 48000)
PCM_EXTENSIONS = (".pcm", ".raw")
# The speech tokenizer's rate (frontend.prompt.MIN_INPUT_SR). Lower rates are refused, not
# resampled up, as upstream does: the missing upper band would shape the voice's features.
MIN_SAMPLE_RATE = 16000


def parse_pcm_sample_rate(value: str | None) -> int | None:
    """The optional `sample_rate` form field of an upload (None if absent)."""
    if value is None or value.strip() == "":
        return None
    text = value.strip()
    if not text.isascii() or not text.isdigit() or not PCM_RATE_RANGE[0] <= int(text) <= PCM_RATE_RANGE[1]:
        raise InvalidParameter(f"'sample_rate' must be an integer from {PCM_RATE_RANGE[0]} to "
                               f"{PCM_RATE_RANGE[1]}; got {value!r}")
    return int(text)


def decode_pcm_s16le(data: bytes, sample_rate: int) -> tuple[np.ndarray, int]:
    if len(data) % 2:
        raise InvalidParameter("PCM audio must be 16-bit samples: odd number of bytes")
    samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    return samples, sample_rate


def _decode_soundfile(data: bytes) -> tuple[np.ndarray, int]:
    try:
        audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError, EOFError) as exc:
        reason = getattr(exc, "error_string", "") or type(exc).__name__  # never echo object reprs
        raise InvalidParameter(f"could not decode the audio file (WAV, MP3 or PCM expected): {reason}") from None
    return audio.mean(axis=1).astype(np.float32), int(rate)  # downmix to mono


def _is_pcm_name(filename: str) -> bool:
    return filename.lower().endswith(PCM_EXTENSIONS)


def check_sample_rate(sample_rate: int) -> None:
    if sample_rate < MIN_SAMPLE_RATE:
        raise InvalidParameter(f"reference audio sample rate is {sample_rate} Hz; "
                               f"at least {MIN_SAMPLE_RATE} Hz is required")


def check_duration(samples: np.ndarray, sample_rate: int) -> None:
    if len(samples) == 0:
        raise InvalidParameter("the audio file contains no samples")
    duration_s = len(samples) / sample_rate
    if duration_s < MIN_DURATION_S:
        raise InvalidParameter(f"reference audio too short: {duration_s:.2f} s (at least {MIN_DURATION_S} s)")
    if duration_s > MAX_DURATION_S:
        raise InvalidParameter(f"reference audio too long: {duration_s:.2f} s (at most {MAX_DURATION_S:g} s)")
    if not np.isfinite(samples).all():
        raise InvalidParameter("the audio file contains invalid (non-finite) samples")


def decode_upload(data: bytes, filename: str, pcm_sample_rate: int | None) -> tuple[np.ndarray, int]:
    """-> (float32 mono in [-1, 1], sample rate); InvalidParameter (400) when unusable."""
    if not data:
        raise InvalidParameter("the uploaded file is empty")
    if _is_pcm_name(filename):
        samples, rate = decode_pcm_s16le(data, pcm_sample_rate or DEFAULT_PCM_SAMPLE_RATE)
    else:
        try:
            samples, rate = _decode_soundfile(data)
        except InvalidParameter:
            if pcm_sample_rate is None:
                raise
            samples, rate = decode_pcm_s16le(data, pcm_sample_rate)  # headerless, rate given: PCM
    check_sample_rate(rate)
    check_duration(samples, rate)
    return samples, rate
