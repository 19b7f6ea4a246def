"""The OpenAI-compatible API with the real `openai` client (and raw `requests` for headers and framing),
against the server on a loopback port with the fake engine (220 Hz, 50 ms of audio per character)."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import av
import openai
import pytest
import requests
import soundfile as sf

from protocol.openai_schema import MODEL_IDS
from scheduler.jobs import Mode
from tests.fakes import SAMPLE_RATE, SAMPLES_PER_CHAR, FakeEngine
from tests.server_helpers import AUTH, TOKEN, running_server, speech_body, upload
from tests.test_server_split import backend_server, frontend_server

TEXT = "hello world, this is a test"
SECONDS = len(TEXT) * SAMPLES_PER_CHAR / SAMPLE_RATE
CONTENT_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac",
                 "wav": "audio/wav", "pcm": "audio/pcm"}
# Lossy encoders pad: MP3 with its encoder delay and last frame, AAC with its priming frame.
TOLERANCE_S = {"mp3": 0.08, "aac": 0.1}


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine(chunk_chars=6)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, engine: FakeEngine):
    with running_server(tmp_path_factory.mktemp("data"), engine) as srv:
        yield srv


@pytest.fixture(scope="module")
def voice(server) -> str:
    r = upload(requests, server.url, filename="alice.wav")
    assert r.status_code == 200, r.text
    return r.json()["id"]


@pytest.fixture(scope="module")
def client(server, voice) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, max_retries=0, timeout=20)


def seconds_of(fmt: str, data: bytes) -> float:
    """Decode the file back (libsndfile where it can, ffmpeg for AAC) and check it is 24 kHz."""
    if fmt == "pcm":
        return len(data) / 2 / SAMPLE_RATE
    if fmt == "aac":
        with av.open(io.BytesIO(data)) as container:
            samples = sum(frame.samples for frame in container.decode(audio=0))
            rate = container.streams.audio[0].rate
    else:
        audio, rate = sf.read(io.BytesIO(data), dtype="float32")
        samples = len(audio)
    assert rate == SAMPLE_RATE
    return samples / rate


def assert_duration(fmt: str, data: bytes, expected_s: float = SECONDS) -> None:
    assert abs(seconds_of(fmt, data) - expected_s) < TOLERANCE_S.get(fmt, 0.01), fmt


def sse_events(text: str) -> list[dict[str, Any]]:
    blocks = [b for b in text.split("\n\n") if b.strip()]
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks), blocks
    return [json.loads(b[len("data: "):]) for b in blocks]


def post(server, **fields: Any) -> requests.Response:
    body = {"model": "tts-1", "input": TEXT, "voice": "alice", **fields}
    return requests.post(f"{server.url}/v1/audio/speech", headers=AUTH, json=body, stream=True, timeout=20)


def assert_openai_error(r: requests.Response, status: int, type_: str, param: str | None = None) -> dict:
    assert r.status_code == status, r.text[:300]
    assert r.headers["content-type"] == "application/json" and r.headers["x-request-id"]
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert (body["error"]["type"], body["error"]["param"]) == (type_, param)
    return body["error"]


# ---- the whole file ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", list(CONTENT_TYPES))
def test_every_format_decodes_to_the_engines_duration(client: openai.OpenAI, fmt: str) -> None:
    response = client.audio.speech.create(model="tts-1", voice="alice", input=TEXT, response_format=fmt)
    assert response.response.headers["content-type"] == CONTENT_TYPES[fmt]
    assert "chunked" not in response.response.headers.get("transfer-encoding", "")
    assert_duration(fmt, response.content)


def test_default_format_is_mp3(client: openai.OpenAI) -> None:
    response = client.audio.speech.create(model="gpt-4o-mini-tts", voice="alice", input=TEXT)
    assert response.response.headers["content-type"] == "audio/mpeg"
    assert_duration("mp3", response.content)


@pytest.mark.parametrize("how", ["id", "object", "name", "file name"])
def test_voice_by_id_object_name_or_file_name(client: openai.OpenAI, engine: FakeEngine, voice: str,
                                              how: str) -> None:
    given: Any = {"id": voice, "object": {"id": voice}, "name": "alice", "file name": "alice.wav"}[how]
    response = client.audio.speech.create(model="cosyvoice2", voice=given, input=TEXT, response_format="wav")
    assert_duration("wav", response.content)
    assert engine.jobs[-1].mode is Mode.ZERO_SHOT and engine.jobs[-1].stream is False


def test_instructions_run_instruct_mode(client: openai.OpenAI, engine: FakeEngine) -> None:
    client.audio.speech.create(model="gpt-4o-mini-tts", voice="alice", input=TEXT, response_format="pcm",
                               instructions="Speak slowly and warmly.")
    job = engine.jobs[-1]
    assert (job.mode, job.instruct, job.text) == (Mode.INSTRUCT, "Speak slowly and warmly.", TEXT)


@pytest.mark.parametrize("speed", [0.25, 2.0, 4.0])
def test_speed_reaches_the_engine(client: openai.OpenAI, engine: FakeEngine, speed: float) -> None:
    response = client.audio.speech.create(model="tts-1", voice="alice", input=TEXT, response_format="pcm",
                                          speed=speed)
    assert engine.jobs[-1].speed == speed
    assert_duration("pcm", response.content, SECONDS / speed)


# ---- streaming ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["pcm", "opus", "mp3", "wav"])
def test_streamed_audio_through_the_client(client: openai.OpenAI, engine: FakeEngine, fmt: str) -> None:
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alice", input=TEXT, response_format=fmt, stream_format="audio") as response:
        assert response.headers["content-type"] == CONTENT_TYPES[fmt]
        data = b"".join(response.iter_bytes())
    assert engine.jobs[-1].stream is True
    if fmt != "wav":  # a streamed WAV's sizes are unknown (0xFFFFFFFF): libsndfile reads it to the end
        assert_duration(fmt, data)
    else:
        assert abs(sf.read(io.BytesIO(data))[0].shape[0] / SAMPLE_RATE - SECONDS) < 0.01


def test_streamed_pcm_headers_and_chunks(server) -> None:
    with post(server, response_format="pcm", stream_format="audio") as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "audio/pcm" and r.headers["x-sample-rate"] == "24000"
        assert r.headers["transfer-encoding"] == "chunked" and "content-length" not in r.headers
        chunks = [c for c in r.raw.stream(amt=None, decode_content=False) if c]
    assert len(chunks) > 1  # the fake engine's chunks come as they are made
    assert len(b"".join(chunks)) == round(SECONDS * SAMPLE_RATE) * 2


def test_stream_true_is_stream_format_audio(server, engine: FakeEngine) -> None:
    with post(server, response_format="flac", stream=True) as r:
        assert r.headers["transfer-encoding"] == "chunked" and r.headers["content-type"] == "audio/flac"
        data = r.content
    assert engine.jobs[-1].stream is True
    with av.open(io.BytesIO(data)) as container:  # a streamed FLAC does not know its length: ffmpeg reads it
        assert abs(sum(f.samples for f in container.decode(audio=0)) / SAMPLE_RATE - SECONDS) < 0.01


def test_sse_event_sequence(server) -> None:
    with post(server, response_format="pcm", stream_format="sse") as r:
        assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
        events = sse_events(r.text)
    *deltas, done = events
    assert len(deltas) > 1 and all(set(e) == {"type", "audio"} and e["type"] == "speech.audio.delta"
                                   for e in deltas)
    audio = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    assert len(audio) == round(SECONDS * SAMPLE_RATE) * 2
    assert done["type"] == "speech.audio.done" and set(done) == {"type", "usage"}
    usage = done["usage"]
    assert usage["input_tokens"] == len(TEXT)  # the fake engine: one token per character
    assert usage["output_tokens"] > 0 and usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_sse_through_the_client(client: openai.OpenAI) -> None:
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alice", input=TEXT, response_format="flac", stream_format="sse") as response:
        events = sse_events(response.text())
    audio = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
    with av.open(io.BytesIO(audio)) as container:
        assert abs(sum(f.samples for f in container.decode(audio=0)) / SAMPLE_RATE - SECONDS) < 0.01
    assert events[-1]["type"] == "speech.audio.done"


def test_engine_failure_mid_stream(tmp_path: Path) -> None:
    engine = FakeEngine(chunk_chars=6, fail_after_chunks=2)
    with running_server(tmp_path, engine) as srv:
        upload(requests, srv.url, filename="alice.wav")
        with post(srv, response_format="pcm", stream_format="sse") as r:
            events = sse_events(r.text)
        assert [e["type"] for e in events] == ["speech.audio.delta"] * 2 + ["error"]
        assert events[-1]["error"]["type"] == "server_error" and "fake engine failure" in events[-1]["error"]["message"]
        with post(srv, response_format="pcm", stream_format="audio") as r, \
                pytest.raises(requests.exceptions.ChunkedEncodingError):
            r.content  # noqa: B018 - the body ends without its last chunk: a truncated download
        engine.fail_after_chunks = 0
        r = post(srv, response_format="pcm")  # before any byte went out: a plain error response
        assert assert_openai_error(r, 500, "server_error")["message"] == "fake engine failure"


# ---- models, voices ------------------------------------------------------------------------------

def test_models(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == list(MODEL_IDS)
    assert {(m.object, m.owned_by) for m in models.data} == {("model", "cosyserve")}
    assert client.models.retrieve("tts-1").id == "tts-1"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("dall-e-3")


def test_voice_list(server, voice: str) -> None:
    r = requests.get(f"{server.url}/v1/audio/voices", headers=AUTH, timeout=5)
    assert r.status_code == 200
    listing = r.json()
    assert listing["object"] == "list" and listing["has_more"] is False
    assert {"id": voice, "name": "alice", "object": "audio.voice", "type": "audio_sample"}.items() <= \
        listing["data"][0].items()


def test_voice_list_limit_says_has_more(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        ids = [upload(requests, srv.url, filename=f"v{i}.wav").json()["id"] for i in range(3)]
        r = requests.get(f"{srv.url}/v1/audio/voices?limit=2", headers=AUTH, timeout=5).json()
        assert r["has_more"] is True and [v["id"] for v in r["data"]] == ids[:0:-1]


def test_the_newest_voice_of_a_name_wins(tmp_path: Path) -> None:
    with running_server(tmp_path, FakeEngine()) as srv:
        upload(requests, srv.url, filename="bob.wav", text="first")
        newest = upload(requests, srv.url, filename="bob.mp3", text="second").json()["id"]
        r = post(srv, voice="bob", response_format="pcm")
        assert r.status_code == 200
        listed = requests.get(f"{srv.url}/v1/audio/voices", headers=AUTH, timeout=5).json()["data"]
        assert [v["name"] for v in listed] == ["bob", "bob"] and listed[0]["id"] == newest


# ---- errors in OpenAI's shape ---------------------------------------------------------------------

def test_unknown_voice_is_a_bad_request_naming_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.speech.create(model="tts-1", voice="nova", input=TEXT)
    assert "'nova'" in info.value.message
    assert info.value.body["param"] == "voice" and info.value.body["code"] == "voice_not_found"


def test_wrong_token_is_an_authentication_error(server) -> None:
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError):
        bad.audio.speech.create(model="tts-1", voice="alice", input=TEXT)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = requests.get(f"{server.url}/v1/models", timeout=5)  # no token at all
    assert assert_openai_error(r, 401, "invalid_request_error")["code"] == "invalid_api_key"


@pytest.mark.parametrize("speed", [0.2, 4.5])
def test_speed_out_of_range(client: openai.OpenAI, server, speed: float) -> None:
    with pytest.raises(openai.BadRequestError, match="speed"):
        client.audio.speech.create(model="tts-1", voice="alice", input=TEXT, speed=speed)
    assert_openai_error(post(server, speed=speed), 400, "invalid_request_error", "speed")


def test_a_format_we_cannot_encode_is_a_400(client: openai.OpenAI, server) -> None:
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.audio.speech.create(model="tts-1", voice="alice", input=TEXT,
                                   response_format="vorbis")  # type: ignore[arg-type]
    err = assert_openai_error(post(server, response_format="m4a"), 400, "invalid_request_error", "response_format")
    assert "mp3, opus, aac, flac, wav, pcm" in err["message"]


@pytest.mark.parametrize("fields,param", [
    ({"input": ""}, "input"),
    ({"input": "x" * 4097}, "input"),
    ({"model": "whisper-1"}, "model"),
    ({"stream_format": "chunks"}, "stream_format"),
    ({"stream": "yes"}, "stream"),
    # schemathesis found it: beside a stream_format, `stream` was not read at all, so any type passed
    ({"stream_format": "audio", "stream": {}}, "stream"),
])
def test_bad_fields(server, fields: dict[str, Any], param: str) -> None:
    assert_openai_error(post(server, **fields), 400, "invalid_request_error", param)


def test_framing_errors_of_v1_are_openai_shaped_too(server) -> None:
    assert_openai_error(requests.get(f"{server.url}/v1/audio/transcriptions", headers=AUTH, timeout=5),
                        404, "invalid_request_error")
    r = requests.get(f"{server.url}/v1/audio/speech", headers=AUTH, timeout=5)
    assert_openai_error(r, 405, "invalid_request_error")
    assert r.headers["allow"] == "POST"
    r = requests.post(f"{server.url}/v1/audio/speech", headers={**AUTH, "Content-Type": "text/plain"},
                      data=b"{}", timeout=5)
    assert_openai_error(r, 415, "invalid_request_error")


def test_the_pai_routes_keep_their_error_shape(server) -> None:
    r = requests.post(f"{server.url}/api/v1/audio/speech", json=speech_body("x"), timeout=5)
    assert r.status_code == 401 and set(r.json()) == {"code", "message", "request_id"}


def test_overload_is_a_503_with_retry_after(tmp_path: Path) -> None:
    with running_server(tmp_path, FakeEngine(admit=False)) as srv:
        upload(requests, srv.url, filename="alice.wav")
        r = post(srv, response_format="wav")
        assert assert_openai_error(r, 503, "server_error")["code"] == "overloaded"
        assert int(r.headers["retry-after"]) >= 1


def test_max_inflight_is_a_429_with_retry_after(tmp_path: Path) -> None:
    with running_server(tmp_path, FakeEngine(chunk_chars=6, delay_s=0.3), max_inflight=1) as srv:
        upload(requests, srv.url, filename="alice.wav")
        with post(srv, response_format="pcm", stream_format="audio") as first:  # its head: the first chunk
            assert first.status_code == 200  # ... and four more chunks to go: still in flight
            r = post(srv, response_format="pcm")
            assert assert_openai_error(r, 429, "rate_limit_error")["code"] == "rate_limit_exceeded"
            assert int(r.headers["retry-after"]) >= 1


def test_metrics_name_the_openai_routes(server, client: openai.OpenAI) -> None:
    client.models.list()
    text = requests.get(f"{server.url}/metrics", headers=AUTH, timeout=5).text
    assert 'route="openai_models",status="200"' in text and 'route="openai_speech",status="200"' in text


# ---- through a --role frontend ---------------------------------------------------------------------

def test_a_frontend_serves_the_openai_api(tmp_path: Path) -> None:
    with backend_server(tmp_path / "backend") as back, frontend_server(tmp_path / "frontend", back.url) as front:
        upload(requests, front.url, filename="alice.wav")
        client = openai.OpenAI(base_url=f"{front.url}/v1", api_key=TOKEN, max_retries=0, timeout=20)
        assert_duration("opus", client.audio.speech.create(model="tts-1", voice="alice", input=TEXT,
                                                           response_format="opus").content)
        with post(front, response_format="pcm", stream_format="audio") as r:
            assert r.headers["x-sample-rate"] == "24000" and len(r.content) == round(SECONDS * SAMPLE_RATE) * 2
        assert [m.id for m in client.models.list().data] == list(MODEL_IDS)
