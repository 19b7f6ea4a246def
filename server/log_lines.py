"""Log lines: text for people or one JSON object a line for machines (`--log-format`), each carrying the id
of the request it belongs to.

That id lives in a context variable, set where a request starts (server/connection.py: the handler's
task, or a WebSocket connection once upgraded); a filter on the handler copies it onto every record, so
no handler, bridge or store call passes it along. A record's `extra` fields become keys of its JSON line.
One access line per response (`log_request`) names the route by its template, never the raw path or
query (ids, and whatever a client put in a URL, stay out of the logs); no line ever holds a header. The
probes' lines (/health, /ready, a backend's health, asked every few seconds) are DEBUG.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import IO, Any

from protocol.internal import FEATURES_PATH, HEALTH_PATH, JOBS_PATH
from server.paths import READY, normalise, route_name

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
access = logging.getLogger("server.access")
INTERNAL_PATHS = (JOBS_PATH, HEALTH_PATH, FEATURES_PATH)  # no ids in them: logged as they are
PROBES = ("/health", READY, HEALTH_PATH)  # asked every few seconds: their access lines are DEBUG
_RECORD_FIELDS = {*vars(logging.LogRecord("", 0, "", 0, "", (), None)), "message", "asctime", "request_id"}


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on the record (unless the call gave one in `extra`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """time (UTC, ISO 8601, ms), level, logger, message, request_id (when the line belongs to a request),
    the record's extra fields, and the exception's traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "request_id", None):
            line["request_id"] = record.request_id
        line.update((k, v) for k, v in vars(record).items() if k not in _RECORD_FIELDS and not k.startswith("_"))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The classic line, with `[request <id>]` at its end when it belongs to one."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = getattr(record, "request_id", None)
        return f"{text} [request {request_id}]" if request_id else text


def make_handler(log_format: str, stream: IO[str] | None = None) -> logging.Handler:
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    return handler


def configure_logging(log_format: str) -> None:
    """The process's one log handler, at INFO (replaces any handler already on the root logger)."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(make_handler(log_format))
    root.setLevel(logging.INFO)


def log_request(method: str, path: str, status: int, duration_s: float, request_id: str | None = None) -> None:
    """The access line of one response (a WebSocket upgrade's too: 101 or its refusal); a probe's at DEBUG."""
    path = normalise(path) if path else ""
    route = path if path in INTERNAL_PATHS else route_name(path) if path else "unknown"
    fields = {"method": method, "route": route, "status": status, "duration_ms": round(duration_s * 1000, 1)}
    if request_id is not None:
        fields["request_id"] = request_id
    level = logging.DEBUG if path in PROBES and status < 400 else logging.INFO
    access.log(level, "%s %s %d %.1f ms", method, route, status, fields["duration_ms"], extra=fields)
