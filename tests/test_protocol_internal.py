"""protocol.internal: every message round-trips through its frames; malformed frames are refused clearly."""
from __future__ import annotations

import json

import numpy as np
import pytest

from protocol.errors import ErrorCode
from protocol.internal import (
    Cancel,
    Chunk,
    Failed,
    Finished,
    FinishText,
    InternalProtocolError,
    NeedVoice,
    PushTokens,
    Reader,
    Status,
    Submit,
    Voice,
    VoiceFeatures,
    decode_features_request,
    encode,
    encode_features_request,
)
from protocol.speech_mode import Mode


def _voice() -> VoiceFeatures:
    rng = np.random.default_rng(0)
    return VoiceFeatures(speech_tokens=np.arange(7, dtype=np.int32), embedding=rng.standard_normal(192).astype(np.float32),
                         mel=rng.standard_normal((14, 80)).astype(np.float32), text="希望你以後")


def _roundtrip(msg, to_backend: bool):
    reader = Reader(to_backend)
    out = [reader.feed(frame) for frame in encode(msg)]
    assert all(m is None for m in out[:-1]) and out[-1] is not None
    assert not reader.expecting_binary
    return out[-1]


def _same_voice(a: VoiceFeatures, b: VoiceFeatures) -> None:
    for name in ("speech_tokens", "embedding", "mel"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert getattr(a, name).dtype == getattr(b, name).dtype
    assert a.text == b.text


@pytest.mark.parametrize("attached", [True, False])
def test_submit_round_trips_with_or_without_the_voice(attached: bool) -> None:
    voice = _voice()
    msg = Submit(request_id="r1", mode=Mode.INSTRUCT, voice_sha256=voice.sha256(), prompt_text_ids=(1, 2, 3),
                 prompt_speech_ids=(4, 5), pieces=((6, 7), (8,)), duplex=False, speed=1.5, stream=False, seed=42,
                 fixed_tokens=None, debug=True, voice=voice if attached else None)
    frames = encode(msg)
    assert len(frames) == (2 if attached else 1) and isinstance(frames[0], str)
    got = _roundtrip(msg, to_backend=True)
    assert got == msg  # the voice is compared below
    assert (got.voice is None) is (not attached)
    if attached:
        _same_voice(got.voice, voice)


def test_the_voice_hash_is_content_not_npz_bytes() -> None:
    a, b = _voice(), _voice()
    assert a.sha256() == b.sha256()
    changed = VoiceFeatures(a.speech_tokens, a.embedding, a.mel + 1e-3, a.text)
    assert changed.sha256() != a.sha256()


@pytest.mark.parametrize("msg", [PushTokens((1, 2, 3)), PushTokens(()), FinishText(), Cancel()])
def test_control_messages_round_trip(msg) -> None:
    assert _roundtrip(msg, to_backend=True) == msg


def test_voice_answer_round_trips() -> None:
    got = _roundtrip(Voice(_voice()), to_backend=True)
    _same_voice(got.voice, _voice())


def test_chunk_round_trips_pcm_and_metrics_and_status() -> None:
    pcm = np.linspace(-1, 1, 480, dtype=np.float32)
    msg = Chunk(pcm=pcm, generate_time_s=0.0123, llm_tokens=25, flow_batch=3, vocoder_batch=2,
                detail={"flow_s": 0.01}, status=Status(running=2, waiting=5, can_admit=False))
    frames = encode(msg)
    assert isinstance(frames[1], bytes) and len(frames[1]) == 4 * 480
    got = _roundtrip(msg, to_backend=False)
    assert got == msg
    np.testing.assert_array_equal(got.pcm, pcm)
    assert got.pcm.dtype == np.float32


@pytest.mark.parametrize("msg", [Finished(48000, 50, Status(1, 0, True)),
                                 Failed(ErrorCode.OVERLOADED, "queue full", Status(4, 9, False)), NeedVoice()])
def test_endings_round_trip(msg) -> None:
    assert _roundtrip(msg, to_backend=False) == msg


def test_features_request_round_trips() -> None:
    wav = np.zeros(1600, np.float32)
    got = decode_features_request(encode_features_request(wav, 16000, "hi"))
    assert got[1:] == (16000, "hi") and got[0].shape == (1600,)


@pytest.mark.parametrize(("frames", "to_backend", "says"), [
    (["not json"], True, "not JSON"),
    (["[" * 100_000], False, "not JSON"),  # nested too deep: was a RecursionError
    (["[1]"], True, "string 'type'"),
    ([json.dumps({"type": "launch"})], True, "unknown message type"),
    ([json.dumps({"type": "chunk", "samples": 1})], True, "unknown message type"),  # a backend never gets chunks
    ([json.dumps({"type": "submit"})], True, "mode"),
    ([json.dumps({"type": "submit", "mode": "opera", "request_id": "r", "voice_sha256": "x"})], True, "unknown mode"),
    ([json.dumps({"type": "push_tokens", "ids": [1, "2"]})], True, "list of integers"),
    ([json.dumps({"type": "push_tokens", "ids": [True]})], True, "list of integers"),
    ([b"\x00\x01"], True, "without a header"),
    ([json.dumps({"type": "voice"}), b"not an npz"], True, "not a valid npz"),
    ([json.dumps({"type": "voice"}), json.dumps({"type": "cancel"})], True, "expected its binary frame"),
    ([json.dumps({"type": "chunk", "samples": 3, "generate_time_s": 0.1, "llm_tokens": 1}), b"\x00" * 8],
     False, "3 samples"),
    ([json.dumps({"type": "chunk", "samples": "3"})], False, "wrong type"),
    ([json.dumps({"type": "failed", "code": "Nope", "message": "m"})], False, "unknown error code"),
    ([json.dumps({"type": "finished", "llm_tokens": 1})], False, "total_samples"),
])
def test_malformed_frames_are_refused_with_a_clear_error(frames, to_backend: bool, says: str) -> None:
    reader = Reader(to_backend)
    with pytest.raises(InternalProtocolError, match=says):
        for frame in frames:
            reader.feed(frame)


def test_an_attached_voice_that_does_not_match_its_hash_is_refused() -> None:
    voice = _voice()
    msg = Submit(request_id="r", mode=Mode.ZERO_SHOT, voice_sha256="0" * 64, voice=voice)
    reader = Reader(to_backend=True)
    frames = encode(msg)
    assert reader.feed(frames[0]) is None
    with pytest.raises(InternalProtocolError, match="does not match"):
        reader.feed(frames[1])
