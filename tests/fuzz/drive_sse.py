"""SSE encoding (protocol.sse, protocol.openai_responses) read back by a real SSE client (sseclient-py).

Every event is one `data:` line and a blank line, whatever its text holds (newlines, CR, NUL, any
Unicode): a stream of them, delivered in any pieces, parses back to exactly the objects that went in.
"""
from __future__ import annotations

import json
from typing import Any

from sseclient import SSEClient

from protocol.errors import ApiError, ErrorCode, sse_error_event
from protocol.openai_responses import speech_delta_event, speech_done_event
from protocol.openai_responses import speech_error_event as openai_error_event
from protocol.openai_schema import error_object
from protocol.sse import chunk_metrics, speech_chunk, speech_chunk_event, speech_error_event, sse_event


def check_one_event(encoded: bytes) -> None:
    """The SSE framing: `data: ` + one line + a blank line; no CR anywhere (a line end in SSE)."""
    assert encoded.startswith(b"data: ") and encoded.endswith(b"\n\n"), encoded
    assert b"\n" not in encoded[:-2] and b"\r" not in encoded, encoded


def events_of(text: str, number: float = 0.5) -> list[tuple[bytes, Any]]:
    """Every SSE event the server makes, with `text` wherever a string goes: (bytes, the object sent)."""
    metrics = chunk_metrics(number, number, number, number, {text: number, "llm_tokens": 3})
    err = ApiError(text, code=ErrorCode.INTERNAL_ERROR)
    return [
        (sse_event({text: text, "n": number}), {text: text, "n": number}),
        (speech_chunk_event(text, text, text, None, metrics), speech_chunk(text, text, text, None, metrics)),
        (speech_error_event(text, text, text, text),
         speech_chunk(text, text, "", "error", {}, {"code": text, "message": text})),
        (sse_error_event(err, text), speech_chunk(text, text, "", "error", {}, {"code": err.code, "message": text})),
        (speech_delta_event(text), {"type": "speech.audio.delta", "audio": text}),
        (speech_done_event(3, 4), {"type": "speech.audio.done",
                                   "usage": {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}}),
        (openai_error_event(err), {"type": "error", **error_object(err)}),
    ]


def read_back(pieces: list[bytes]) -> list[Any]:
    """What an SSE client decodes from a stream arriving in `pieces`."""
    events = list(SSEClient(iter(pieces)).events())
    assert all(e.event == "message" and e.id is None for e in events), events
    return [json.loads(e.data) for e in events]


def run_sse(text: str, cut: Any) -> None:
    """Encode every event with `text`, check each one's framing, read the stream back cut by `cut`."""
    pairs = events_of(text)
    for encoded, _ in pairs:
        check_one_event(encoded)
    stream = b"".join(encoded for encoded, _ in pairs)
    expected = [json.loads(json.dumps(obj)) for _, obj in pairs]  # what JSON makes of it (tuples, keys)
    assert read_back(cut(stream)) == expected
