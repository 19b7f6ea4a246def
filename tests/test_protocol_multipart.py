from __future__ import annotations

import io

import numpy as np
import pytest
import requests
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.audio_in import MIN_SAMPLE_RATE, decode_upload, parse_pcm_sample_rate
from protocol.encoders import OutputPipeline
from protocol.errors import ApiError
from protocol.multipart import parse_multipart


def form(files: dict, data: dict) -> tuple[bytes, str]:
    """Encode exactly as the document's `requests` upload example does."""
    req = requests.Request("POST", "http://x/", files=files, data=data).prepare()
    return req.body, req.headers["Content-Type"]  # type: ignore[return-value]


def test_document_upload_example() -> None:
    body, ctype = form({"file": ("zero_shot_prompt.wav", b"RIFF....")}, {"text": "希望你以後能夠做得比我還好喲"})
    fields, files = parse_multipart(body, ctype, max_file_bytes=1000)
    assert fields == {"text": "希望你以後能夠做得比我還好喲"}
    f = files["file"]
    assert (f.filename, f.data) == ("zero_shot_prompt.wav", b"RIFF....")


def test_curl_style_upload_with_content_type_and_utf8_name() -> None:
    b = b"BOUNDARY"
    body = (b"--" + b + b"\r\nContent-Disposition: form-data; name=\"file\"; filename=\"\xe4\xb8\xad.pcm\"\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n\x00\x01\r\n--" + b + b"\r\n"
            b"Content-Disposition: form-data; name=\"sample_rate\"\r\n\r\n16000\r\n--" + b + b"--\r\n")
    fields, files = parse_multipart(body, "multipart/form-data; boundary=BOUNDARY", 100)
    assert fields == {"sample_rate": "16000"}
    assert files["file"].filename == "中.pcm" and files["file"].content_type == "application/octet-stream"
    assert files["file"].data == b"\x00\x01"


@pytest.mark.parametrize("ctype,status", [
    ("application/json", 415), (None, 415), ("multipart/form-data", 400),
    ("multipart/form-data; boundary=" + "b" * 257, 400),  # was a FormParserError, a 500 (tests/fuzz)
])
def test_content_type_errors(ctype: str | None, status: int) -> None:
    body, _ = form({"file": ("a.wav", b"x")}, {})
    with pytest.raises(ApiError) as e:
        parse_multipart(body, ctype, 100)
    assert e.value.status == status


def test_file_too_large_is_413() -> None:
    body, ctype = form({"file": ("a.wav", b"x" * 101)}, {})
    with pytest.raises(ApiError) as e:
        parse_multipart(body, ctype, 100)
    assert e.value.status == 413


def test_bad_utf8_field_is_400() -> None:
    body, ctype = form({"file": ("a.wav", b"x")}, {"text": b"\xff\xfe"})
    with pytest.raises(ApiError) as e:
        parse_multipart(body, ctype, 100)
    assert e.value.status == 400


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=300), st.text(max_size=30), st.text("abc.xyz", min_size=1, max_size=10))
def test_property_roundtrip_and_every_truncation_refused(payload: bytes, text: str, name: str) -> None:
    body, ctype = form({"file": (name, payload)}, {"text": text})
    fields, files = parse_multipart(body, ctype, max_file_bytes=1000)
    assert fields["text"] == text
    assert files["file"].data == payload and files["file"].filename == name
    for cut in range(0, len(body) - 4, max(1, len(body) // 15)):  # lose the closing boundary
        with pytest.raises(ApiError) as e:
            parse_multipart(body[:cut], ctype, max_file_bytes=1000)
        assert e.value.status == 400


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=200))
def test_property_garbage_is_400(junk: bytes) -> None:
    try:
        parse_multipart(junk, "multipart/form-data; boundary=xyz", 100)
    except ApiError as e:
        assert e.status in (400, 413)


# ---- audio_in ----
def encoded(fmt: str, seconds: float, rate: int = 16000) -> bytes:
    x = (0.3 * np.sin(np.arange(int(24000 * seconds)) * 0.05)).astype(np.float32)
    pipe = OutputPipeline(fmt, rate, 64, stream=False)
    return pipe.feed(x) + pipe.finish()


def test_decode_wav_and_mp3() -> None:
    samples, rate = decode_upload(encoded("wav", 1.0), "a.wav", None)
    assert rate == 16000 and len(samples) == 16000 and samples.dtype == np.float32
    samples, rate = decode_upload(encoded("mp3", 1.0, 24000), "a.mp3", None)
    assert rate == 24000 and 24000 <= len(samples) <= 24000 + 2 * 1152 + 576


def test_decode_stereo_downmixed() -> None:
    buf = io.BytesIO()
    sf.write(buf, np.stack([np.full(16000, 0.5), np.zeros(16000)], axis=1), 16000, format="WAV")
    samples, _ = decode_upload(buf.getvalue(), "s.wav", None)
    assert samples.shape == (16000,) and np.allclose(samples, 0.25, atol=1e-3)


def test_decode_pcm() -> None:
    raw = np.full(16000, 16384, dtype="<i2").tobytes()
    samples, rate = decode_upload(raw, "voice.PCM", None)
    assert rate == 16000 and len(samples) == 16000 and samples[0] == 0.5
    assert decode_upload(raw, "voice.pcm", 24000)[1] == 24000
    assert decode_upload(raw, "upload.bin", 24000)[1] == 24000  # headerless + explicit rate: PCM


def test_min_rate_matches_the_extractor() -> None:
    from frontend.prompt import MIN_INPUT_SR
    assert MIN_SAMPLE_RATE == MIN_INPUT_SR


@pytest.mark.parametrize("data,name,rate,words", [
    (b"", "a.wav", None, "empty"),
    (b"not audio at all" * 10, "a.wav", None, "decode"),
    (b"\x00" * 3, "a.pcm", None, "odd"),
    (b"\x00\x00" * 7000, "a.pcm", None, "too short"),
    (b"\x00\x00" * 16000 * 31, "a.pcm", 16000, "too long"),
    (b"\x00\x00" * 8000, "a.pcm", 8000, "at least 16000 Hz"),
    (b"\x00\x00" * 22050, "a.pcm", 11025, "11025 Hz"),
])
def test_decode_refusals(data: bytes, name: str, rate: int | None, words: str) -> None:
    with pytest.raises(ApiError) as e:
        decode_upload(data, name, rate)
    assert e.value.status == 400 and words in e.value.message


def test_decode_short_wav_refused() -> None:
    with pytest.raises(ApiError, match="too short"):
        decode_upload(encoded("wav", 0.3), "a.wav", None)


@pytest.mark.parametrize("value,expected", [(None, None), ("", None), ("16000", 16000), (" 8000 ", 8000)])
def test_pcm_rate_field(value: str | None, expected: int | None) -> None:
    assert parse_pcm_sample_rate(value) == expected


@pytest.mark.parametrize("value", ["abc", "100", "96000", "16000.0", "-8000"])
def test_pcm_rate_field_bad(value: str) -> None:
    with pytest.raises(ApiError):
        parse_pcm_sample_rate(value)
