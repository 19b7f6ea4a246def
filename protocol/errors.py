"""API errors: one exception type carrying the HTTP status hint and the PascalCase code.

Raised anywhere in `protocol/` (and by the server); turned into a response body in
exactly one place, `error_body`.
"""
from __future__ import annotations

import json


class ApiError(Exception):
    """An error the client should see: `status` (HTTP), `code` (PascalCase), `message`."""

    status: int = 500
    code: str = "InternalError"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, code={self.code!r}, message={self.message!r})"


class InvalidParameter(ApiError):
    status = 400
    code = "InvalidParameter"


class BadRequest(ApiError):
    """Malformed HTTP framing (not a parameter problem)."""

    status = 400
    code = "BadRequest"


class Unauthorized(ApiError):
    status = 401
    code = "Unauthorized"

    def __init__(self, message: str = "invalid or missing token") -> None:
        # Never tell the client which part of the credentials was wrong.
        super().__init__("invalid or missing token")


class NotFound(ApiError):
    status = 404
    code = "NotFound"


class MethodNotAllowed(ApiError):
    status = 405
    code = "MethodNotAllowed"

    def __init__(self, message: str, allowed: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.allowed = allowed  # for the Allow header


class PayloadTooLarge(ApiError):
    status = 413
    code = "PayloadTooLarge"


class UnsupportedMediaType(ApiError):
    status = 415
    code = "UnsupportedMediaType"


class HeadersTooLarge(ApiError):
    status = 431
    code = "RequestHeaderFieldsTooLarge"


class Overloaded(ApiError):
    """429 (per-client limit) or 503 (server full); `retry_after_s` becomes Retry-After."""

    code = "Overloaded"

    def __init__(self, message: str = "server overloaded, retry later", *, status: int = 503,
                 retry_after_s: int = 1) -> None:
        if status not in (429, 503):
            raise ValueError("Overloaded status must be 429 or 503")
        super().__init__(message, status=status)
        self.retry_after_s = retry_after_s


class InternalError(ApiError):
    status = 500
    code = "InternalError"

    def __init__(self, message: str = "internal error") -> None:
        super().__init__(message)


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
