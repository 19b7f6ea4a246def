"""API errors: the one vocabulary of error codes, and the one place they become responses.

`ErrorCode` is shared by the engine (`scheduler.jobs.Failed`, the scheduler's `RequestRejected`)
and the server; a `StrEnum`, so a member equals its PascalCase string. `ApiError` carries a code,
a message and the HTTP status (from `HTTP_STATUS` unless the raiser knows better: 429 vs 503,
h11's hint). How an error looks on each transport:
- HTTP: `http_error` -> status, headers, JSON body `{code, message, request_id}`;
- SSE (after the stream began): `sse_error_event`;
- WebSocket: `ws_task_failed` -> a `task-failed` event.
"""
from __future__ import annotations

import enum
import json
from typing import Any

from protocol.sse import speech_error_event
from protocol.ws_events import task_failed


class ErrorCode(enum.StrEnum):
    INVALID_PARAMETER = "InvalidParameter"
    BAD_REQUEST = "BadRequest"  # malformed HTTP framing, not a parameter problem
    UNAUTHORIZED = "Unauthorized"
    NOT_FOUND = "NotFound"
    METHOD_NOT_ALLOWED = "MethodNotAllowed"
    REQUEST_TIMEOUT = "RequestTimeout"
    PAYLOAD_TOO_LARGE = "PayloadTooLarge"
    UNSUPPORTED_MEDIA_TYPE = "UnsupportedMediaType"
    UPGRADE_REQUIRED = "UpgradeRequired"
    HEADERS_TOO_LARGE = "RequestHeaderFieldsTooLarge"
    OVERLOADED = "Overloaded"
    INTERNAL_ERROR = "InternalError"
    CANCELLED = "Cancelled"  # the engine stopped the job (shutdown)
    INSUFFICIENT_STORAGE = "InsufficientStorage"  # the disk / bucket is full: nothing was stored
    # WebSocket task protocol (task-failed only; never an HTTP response)
    INVALID_MESSAGE = "InvalidMessage"  # not JSON / not an object / no header.action
    UNKNOWN_ACTION = "UnknownAction"
    TASK_NOT_STARTED = "TaskNotStarted"  # continue/finish before run-task
    TASK_ID_MISMATCH = "TaskIdMismatch"
    TASK_ALREADY_RUNNING = "TaskAlreadyRunning"
    INVALID_STATE = "InvalidState"  # e.g. continue-task after finish-task


HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_PARAMETER: 400,
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.REQUEST_TIMEOUT: 408,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.UPGRADE_REQUIRED: 426,
    ErrorCode.HEADERS_TOO_LARGE: 431,
    ErrorCode.OVERLOADED: 503,  # 429 when a per-server limit (max inflight) refuses
    ErrorCode.INTERNAL_ERROR: 500,
    ErrorCode.CANCELLED: 500,
    ErrorCode.INSUFFICIENT_STORAGE: 507,
    ErrorCode.INVALID_MESSAGE: 400,
    ErrorCode.UNKNOWN_ACTION: 400,
    ErrorCode.TASK_NOT_STARTED: 400,
    ErrorCode.TASK_ID_MISMATCH: 400,
    ErrorCode.TASK_ALREADY_RUNNING: 400,
    ErrorCode.INVALID_STATE: 400,
}
assert set(HTTP_STATUS) == set(ErrorCode), "every error code needs an HTTP status"


class ApiError(Exception):
    """An error the client should see: `code`, `message`, and `status` (HTTP)."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, *, status: int | None = None, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = ErrorCode(code)
        self.status = status if status is not None else HTTP_STATUS[self.code]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, code={self.code!r}, message={self.message!r})"


class InvalidParameter(ApiError):
    code = ErrorCode.INVALID_PARAMETER


class BadRequest(ApiError):
    """Malformed HTTP framing (not a parameter problem)."""

    code = ErrorCode.BAD_REQUEST


class Unauthorized(ApiError):
    code = ErrorCode.UNAUTHORIZED

    def __init__(self, message: str = "invalid or missing token") -> None:
        # Never tell the client which part of the credentials was wrong.
        super().__init__("invalid or missing token")


class NotFound(ApiError):
    code = ErrorCode.NOT_FOUND


class MethodNotAllowed(ApiError):
    code = ErrorCode.METHOD_NOT_ALLOWED

    def __init__(self, message: str, allowed: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.allowed = allowed  # for the Allow header


class RequestTimeout(ApiError):
    code = ErrorCode.REQUEST_TIMEOUT


class PayloadTooLarge(ApiError):
    code = ErrorCode.PAYLOAD_TOO_LARGE


class UnsupportedMediaType(ApiError):
    code = ErrorCode.UNSUPPORTED_MEDIA_TYPE


class UpgradeRequired(ApiError):
    code = ErrorCode.UPGRADE_REQUIRED


class HeadersTooLarge(ApiError):
    code = ErrorCode.HEADERS_TOO_LARGE


class Overloaded(ApiError):
    """429 (per-server limit) or 503 (server full); `retry_after_s` becomes Retry-After."""

    code = ErrorCode.OVERLOADED

    def __init__(self, message: str = "server overloaded, retry later", *, status: int = 503,
                 retry_after_s: int = 1) -> None:
        if status not in (429, 503):
            raise ValueError("Overloaded status must be 429 or 503")
        super().__init__(message, status=status)
        self.retry_after_s = retry_after_s


class InternalError(ApiError):
    code = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str = "internal error") -> None:
        super().__init__(message)


class InsufficientStorage(ApiError):
    """507: the store ran out of space (disk full, quota, file size limit); nothing was stored."""

    code = ErrorCode.INSUFFICIENT_STORAGE


def engine_error(code: ErrorCode, message: str, status: int | None = None) -> ApiError:
    """An engine `Failed` / `RequestRejected` as the error the client sees (`status`: where not the code's
    own, e.g. 502 when a frontend's backend died mid-job)."""
    if code is ErrorCode.OVERLOADED:
        return Overloaded(message)  # carries Retry-After like every other overload
    return ApiError(message, code=code, status=status)


# ---- the error on each transport ----

def error_dict(err: ApiError, request_id: str) -> dict[str, str]:
    return {"code": err.code, "message": err.message, "request_id": request_id}


def error_body(err: ApiError, request_id: str) -> bytes:
    """The JSON body of every error response: {code, message, request_id}."""
    return json.dumps(error_dict(err, request_id), ensure_ascii=False).encode("utf-8")


def error_headers(err: ApiError) -> list[tuple[str, str]]:
    """Extra headers an error implies (Retry-After, Allow)."""
    headers = [("content-type", "application/json")]
    if isinstance(err, Overloaded):
        headers.append(("retry-after", str(err.retry_after_s)))
    if isinstance(err, MethodNotAllowed) and err.allowed:
        headers.append(("allow", ", ".join(err.allowed)))
    return headers


def http_error(err: ApiError, request_id: str) -> tuple[int, list[tuple[str, str]], bytes]:
    """HTTP: (status, headers, body)."""
    return err.status, error_headers(err), error_body(err, request_id)


def sse_error_event(err: ApiError, request_id: str) -> bytes:
    """SSE, once the stream began: an event with `error` set and `finish_reason: "error"`."""
    return speech_error_event(request_id, request_id, err.code, err.message)


def ws_task_failed(task_id: str, err: ApiError) -> dict[str, Any]:
    """WebSocket: `task-failed` with `header.error_code` / `header.error_message`."""
    return task_failed(task_id, err.code, err.message)
