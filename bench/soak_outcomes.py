"""What became of one soak request: ok, a documented error, our own hang-up, or lost.

Pure: it reads a bench.load RequestResult (whose `status` and `code` bench/load.py fills from the
answer), so it is tested with hand-made results.

Documented (README "API behaviour where the contract is silent" and "Response shapes"): the server
answered in its error shape, `{"code", "message", "request_id"}` on the PAI routes or OpenAI's
`{"error": {"message", "type", "code"}}` on /v1, with
- an HTTP 4xx (400, 401, 404, 405, 408, 413, 415, 426, 429 with Retry-After, 431), a 503 with
  Retry-After (engine queue full, draining) or a 507 (an upload to a full store: nothing was stored),
  before or instead of the WebSocket upgrade as well;
- an SSE error event (`"error": {"code", "message"}`, `finish_reason: "error"`) after the stream began;
- a WebSocket `task-failed` carrying `error_code` and `error_message`.
A server fault is lost even in that shape: any other 5xx, and the codes InternalError and Cancelled
(the engine failed, or stopped a job: shutdown only, never during a soak). Lost, too: a reset or refused
connection, a timeout without an answer, a malformed body, a stream that ends without its final event.
"""
from __future__ import annotations

from bench.load_stats import RequestResult

OK = "ok"
DOCUMENTED = "documented_error"
HUNG_UP = "client_disconnect"  # our client left mid-stream on purpose (after the first audio chunk)
LOST = "lost"
OUTCOMES = (OK, DOCUMENTED, HUNG_UP, LOST)

SERVER_FAULT_CODES = frozenset({"InternalError", "Cancelled", "server_error"})
# OpenAI's `server_error` type is a 500 or a 503: the status decides (a 503 is documented, see below).
REFUSED = frozenset({"Overloaded", "rate_limit_error"})  # 429/503: the client backs off (Retry-After)


def documented_status(status: int) -> bool:
    """0: no HTTP status of its own (a WebSocket task-failed); 200: an error event inside the stream."""
    return status in (0, 200, 503, 507) or 400 <= status < 500


def classify(result: RequestResult, hung_up: bool = False) -> str:
    """`hung_up`: the request was one of our own mid-stream disconnects (bench.load's `hang_up`)."""
    if result.ok:
        return HUNG_UP if hung_up else OK
    if not result.code or not documented_status(result.status):
        return LOST
    if result.code in SERVER_FAULT_CODES and result.status != 503:
        return LOST
    return DOCUMENTED


def is_refusal(result: RequestResult) -> bool:
    """429/503: the server asks the client to come back later."""
    return result.status in (429, 503) or result.code in REFUSED
