"""HTTP speech responses: SSE events (stream) and the one-shot JSON body (non-stream)."""
from __future__ import annotations

import json
from typing import Any

SSE_CONTENT_TYPE = "text/event-stream"


def _dumps(obj: Any) -> bytes:
    # Compact and UTF-8: one event is one line (json.dumps never emits a raw newline).
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def sse_event(obj: dict[str, Any]) -> bytes:
    """One Server-Sent Event: `data: {json}` and a blank line."""
    return b"data: " + _dumps(obj) + b"\n\n"


def ms(seconds: float) -> float:
    """Seconds to the millisecond, as every emitted time is: `0.912`, not `0.9119999999999777`."""
    return round(float(seconds), 3)


def chunk_metrics(speech_len_s: float, server_cost_time_s: float, generate_time_s: float,
                  first_package_time_s: float | None = None,
                  detail: dict[str, Any] | None = None) -> dict[str, Any]:
    """The per-chunk `metrics` object (seconds, to the ms); `rtf` = server_cost_time / speech_len.

    Times in `detail` are the keys ending in `_s`; its counts pass through."""
    speech_len, cost = ms(speech_len_s), ms(server_cost_time_s)
    metrics: dict[str, Any] = {
        "speech_len": speech_len,
        "server_cost_time": cost,
        "generate_time": ms(generate_time_s),
        "rtf": round(cost / speech_len, 3) if speech_len > 0 else 0.0,
    }
    if first_package_time_s is not None:
        metrics["first_package_time"] = ms(first_package_time_s)
    if detail:
        metrics["detail"] = {k: ms(v) if k.endswith("_s") else v for k, v in detail.items()}
    return metrics


def speech_chunk(request_id: str, audio_id: str, data_b64: str, finish_reason: str | None,
                 metrics: dict[str, Any], error: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "output": {"finish_reason": finish_reason, "audio": {"id": audio_id, "data": data_b64}},
        "error": error,
        "metrics": metrics,
    }


def speech_chunk_event(request_id: str, audio_id: str, data_b64: str, finish_reason: str | None,
                       metrics: dict[str, Any], error: dict[str, str] | None = None) -> bytes:
    """One stream event; `finish_reason` is None, "stop" (last) or "error" (with `error`)."""
    return sse_event(speech_chunk(request_id, audio_id, data_b64, finish_reason, metrics, error))


def speech_error_event(request_id: str, audio_id: str, code: str, message: str,
                       metrics: dict[str, Any] | None = None) -> bytes:
    """An error after the stream began: `finish_reason: "error"`, then the stream ends."""
    return speech_chunk_event(request_id, audio_id, "", "error", metrics or {},
                              {"code": code, "message": message})


def speech_body(request_id: str, audio_id: str, data_b64: str, usage_bytes: int) -> bytes:
    """Non-stream response: the whole file base64-encoded; `usage` is its size in bytes."""
    return _dumps({
        "request_id": request_id,
        "output": {"finish_reason": None, "audio": {"id": audio_id, "data": data_b64}},
        "usage": usage_bytes,
    })
