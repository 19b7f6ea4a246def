"""Server -> client WebSocket events in the DashScope duplex shape: `{"header": {...}, "payload": {...}}`.

A leaf (no protocol imports), so both the task machine and the error mapping can build events.
"""
from __future__ import annotations

from typing import Any


def ws_event(task_id: str, name: str, payload: dict[str, Any], **header: Any) -> dict[str, Any]:
    return {"header": {"task_id": task_id, "event": name, **header, "attributes": {}}, "payload": payload}


def task_started(task_id: str) -> dict[str, Any]:
    return ws_event(task_id, "task-started", {})


def result_generated(task_id: str, audio_b64: str, metrics: dict[str, Any]) -> dict[str, Any]:
    return ws_event(task_id, "result-generated",
                    {"output": {"audio": {"data": audio_b64}}, "metrics": metrics})


def task_finished(task_id: str, characters: int | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = {"output": {}}
    if characters is not None:
        payload["usage"] = {"characters": characters}
    return ws_event(task_id, "task-finished", payload)


def task_failed(task_id: str, error_code: str, error_message: str) -> dict[str, Any]:
    """The envelope only; `protocol.errors.ws_task_failed` is how an error becomes one."""
    return ws_event(task_id, "task-failed", {}, error_code=error_code, error_message=error_message)
