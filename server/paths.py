"""The API's paths, and the metrics label of each (the route template, never the raw path)."""
from __future__ import annotations

REFERENCE = "/api/v1/audio/reference_audio"
SPEECH = "/api/v1/audio/speech"
WS_SPEECH = "/api-ws/v1/audio/speech"
READY = "/ready"  # readiness, both roles: 503 while draining


def normalise(path: str) -> str:
    return path.rstrip("/") or "/"


def route_name(path: str) -> str:
    """Metrics label: ids in the path would explode the label's cardinality."""
    path = normalise(path)
    if path.startswith(REFERENCE + "/"):
        return "reference_audio_id"
    return {REFERENCE: "reference_audio", SPEECH: "speech", WS_SPEECH: "ws_speech", "/health": "health", READY: "ready",
            "/metrics": "metrics"}.get(path, "unknown")
