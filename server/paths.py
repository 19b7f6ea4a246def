"""The API's paths, and the metrics label of each (the route template, never the raw path)."""
from __future__ import annotations

REFERENCE = "/api/v1/audio/reference_audio"
SPEECH = "/api/v1/audio/speech"
WS_SPEECH = "/api-ws/v1/audio/speech"
READY = "/ready"  # readiness, both roles: 503 while draining
OPENAPI = "/openapi.json"  # the API's OpenAPI description (protocol/openapi.py)
OPENAI_ROOT = "/v1"  # the OpenAI-compatible API (server/openai_routes.py)
OPENAI_SPEECH = "/v1/audio/speech"
OPENAI_VOICES = "/v1/audio/voices"
OPENAI_MODELS = "/v1/models"


def normalise(path: str) -> str:
    return path.rstrip("/") or "/"


def is_openai(path: str) -> bool:
    return path == OPENAI_ROOT or path.startswith(OPENAI_ROOT + "/")


def route_name(path: str) -> str:
    """Metrics label: ids in the path would explode the label's cardinality."""
    path = normalise(path)
    if path.startswith(REFERENCE + "/"):
        return "reference_audio_id"
    if path.startswith(OPENAI_MODELS + "/"):
        return "openai_model"
    if path == "/" or path.startswith("/webui/"):
        return "webui"
    return {REFERENCE: "reference_audio", SPEECH: "speech", WS_SPEECH: "ws_speech", "/health": "health", READY: "ready",
            "/metrics": "metrics", OPENAPI: "openapi", OPENAI_SPEECH: "openai_speech", OPENAI_VOICES: "openai_voices",
            OPENAI_MODELS: "openai_models"}.get(path, "unknown")
