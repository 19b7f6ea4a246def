"""Structured logs: `--log-format json` lines (time, level, logger, message, request_id, extra fields), the
request id in every response's X-Request-Id and in that request's lines, and no token in any of it."""
from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import websocket

from server.config import ServerConfig, load_config
from server.log_lines import JsonFormatter, TextFormatter, log_request, make_handler, request_id_var
from tests.fakes import FakeExtractor
from tests.server_helpers import (
    AUTH,
    TOKEN,
    continue_task,
    finish_task,
    run_task,
    running_server,
    speech_body,
    upload,
)

OURS = ("server", "scheduler", "frontend", "protocol", "kernels", "asyncio")  # not the test's own clients


class CapturedLog:
    """The server's log lines, as `--log-format json` writes them, at DEBUG (the probes' access lines)."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.handler = make_handler("json", self.stream)
        self.handler.addFilter(lambda record: record.name.split(".")[0] in OURS)

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]  # every line is JSON

    def of(self, request_id: str) -> list[dict[str, Any]]:
        """That request's lines; its access line is written just after the response: wait for it."""
        deadline = time.monotonic() + 5
        while True:
            lines = [line for line in self.lines() if line.get("request_id") == request_id]
            if any(line["logger"] == "server.access" for line in lines) or time.monotonic() > deadline:
                return lines
            time.sleep(0.01)


@pytest.fixture
def log() -> Iterator[CapturedLog]:
    captured, root = CapturedLog(), logging.getLogger()
    level = root.level
    root.addHandler(captured.handler)
    root.setLevel(logging.DEBUG)
    try:
        yield captured
    finally:
        root.removeHandler(captured.handler)
        root.setLevel(level)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    with running_server(tmp_path_factory.mktemp("data")) as srv:
        yield srv


@pytest.fixture(scope="module")
def voice(server) -> str:
    return upload(requests, server.url).json()["id"]


def _record(msg: str = "hello %s", *args: object, **extra: object) -> logging.LogRecord:
    return logging.makeLogRecord({"name": "server.x", "levelno": logging.INFO, "levelname": "INFO", "msg": msg,
                                  "args": args, **extra})


def test_a_json_line_holds_time_level_logger_message_request_id_and_extra_fields() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("server.test_json_line")
    handler = make_handler("json", stream)
    logger.addHandler(handler)
    logger.propagate = False
    token = request_id_var.set("rid-1")
    try:
        logger.warning("took %d ms", 12, extra={"route": "speech", "status": 200})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        request_id_var.reset(token)
        logger.removeHandler(handler)
        logger.propagate = True
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["time"].endswith("Z") and first["time"][10] == "T"
    assert {k: first[k] for k in ("level", "logger", "message", "request_id", "route", "status")} == {
        "level": "WARNING", "logger": "server.test_json_line", "message": "took 12 ms", "request_id": "rid-1",
        "route": "speech", "status": 200}
    assert second["request_id"] == "rid-1" and "ValueError: boom" in second["exception"]


def test_a_line_outside_a_request_has_no_request_id_and_text_lines_name_it() -> None:
    line = json.loads(JsonFormatter().format(_record()))
    assert "request_id" not in line and line["message"] == "hello %s"
    assert TextFormatter().format(_record(request_id="rid-2")).endswith("INFO server.x: hello %s [request rid-2]")


def test_the_flag_and_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_config(["--token", "t"], env={}).log_format == "text"
    assert load_config(["--token", "t", "--log-format", "json"], env={}).log_format == "json"
    assert load_config(["--token", "t"], env={"COSYSERVE_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(ValueError, match="log_format"):
        ServerConfig(log_format="xml")


def test_every_route_answers_with_its_request_id_and_logs_it(server, voice: str, log: CapturedLog) -> None:
    url = server.url
    responses = [
        requests.get(f"{url}/health", timeout=10),
        requests.get(f"{url}/ready", timeout=10),
        requests.get(f"{url}/", timeout=10),  # the WebUI's page
        requests.get(f"{url}/metrics", headers=AUTH, timeout=10),
        requests.get(f"{url}/api/v1/audio/reference_audio", headers=AUTH, timeout=10),
        requests.get(f"{url}/api/v1/audio/reference_audio/{voice}", headers=AUTH, timeout=10),
        requests.get(f"{url}/api/v1/audio/reference_audio/nope", headers=AUTH, timeout=10),  # 404
        requests.get(f"{url}/api/v1/audio/reference_audio", timeout=10),  # 401
        requests.put(f"{url}/api/v1/audio/speech", headers=AUTH, timeout=10),  # 405
        requests.post(f"{url}/api/v1/audio/speech", headers=AUTH, json=speech_body(voice), timeout=10),
        requests.post(f"{url}/api/v1/audio/speech", headers=AUTH, json=speech_body(voice, stream=True), timeout=10),
        requests.post(f"{url}/api/v1/audio/speech", headers=AUTH, json={"model": "x"}, timeout=10),  # 400
        requests.get(f"{url}/v1/models", headers=AUTH, timeout=10),
        requests.post(f"{url}/v1/audio/speech", headers=AUTH, timeout=10,
                      json={"model": "tts-1", "voice": voice, "input": "hi", "response_format": "pcm"}),
        requests.get(f"{url}/v1/audio/voices", timeout=10),  # 401 in OpenAI's shape
    ]
    for r in responses:
        rid = r.headers.get("x-request-id")
        assert rid, (r.request.method, r.url, r.status_code)
        access = [line for line in log.of(rid) if line["logger"] == "server.access"]
        assert len(access) == 1 and access[0]["status"] == r.status_code, (r.url, log.of(rid))
        probe = r.url.endswith(("/health", "/ready"))
        assert access[0]["level"] == ("DEBUG" if probe else "INFO")
        assert access[0]["method"] == r.request.method and access[0]["duration_ms"] >= 0
    assert len({r.headers["x-request-id"] for r in responses}) == len(responses)  # one id per request
    error = responses[6].json()
    assert error["request_id"] == responses[6].headers["x-request-id"]  # the body's id is the header's
    text = log.stream.getvalue()
    assert TOKEN not in text and "second-token" not in text


def test_a_malformed_request_gets_an_id_too(server, log: CapturedLog) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: " + TOKEN.encode() + b"\r\n\r\n")
        head = sock.recv(65536).decode("latin-1").lower()
    assert head.startswith("http/1.1 400") and TOKEN not in head
    rid = next(line.split(":", 1)[1].strip() for line in head.split("\r\n") if line.startswith("x-request-id:"))
    assert [line["status"] for line in log.of(rid)] == [400]


def _ws_session(server, voice: str) -> tuple[str, list[dict[str, Any]]]:
    """One WebSocket task; (the upgrade's X-Request-Id, the events)."""
    ws = websocket.create_connection(server.url.replace("http", "ws") + "/api-ws/v1/audio/speech",
                                     header=[f"Authorization: Bearer {TOKEN}"], timeout=10)
    rid = ws.getheaders()["x-request-id"]
    ws.send(run_task("t-" + rid, voice))
    events = [json.loads(ws.recv())]
    ws.send(continue_task("t-" + rid, "hello there"))
    ws.send(finish_task("t-" + rid))
    while events[-1]["header"]["event"] not in ("task-finished", "task-failed"):
        events.append(json.loads(ws.recv()))
    ws.close()
    return rid, events


def test_the_websocket_upgrade_and_its_tasks_carry_the_upgrades_id(server, voice: str, log: CapturedLog) -> None:
    first, events = _ws_session(server, voice)
    second, _ = _ws_session(server, voice)
    assert events[-1]["header"]["event"] == "task-finished" and first != second
    for rid in (first, second):
        lines = log.of(rid)
        assert [line["status"] for line in lines if line["logger"] == "server.access"] == [101]
        task_lines = [line for line in lines if line["logger"] == "server.ws"]
        assert [(line["task_id"], line["outcome"]) for line in task_lines] == [("t-" + rid, "finished")]
    refused = requests.get(server.url + "/api-ws/v1/audio/speech", timeout=10, headers={
        "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Authorization": "Bearer wrong"})
    assert refused.status_code == 401 and refused.json()["request_id"] == refused.headers["x-request-id"]
    assert [line["status"] for line in log.of(refused.headers["x-request-id"])] == [401]


class LoggingExtractor(FakeExtractor):
    """Logs from the worker pool, where upload features are computed."""

    def __call__(self, wav: Any, sample_rate: int, text: str) -> Any:
        logging.getLogger("server.test_pool").info("features on %s", threading.current_thread().name)
        return super().__call__(wav, sample_rate, text)


def test_work_on_the_pool_logs_with_its_requests_id(tmp_path: Path, log: CapturedLog) -> None:
    with running_server(tmp_path, extractor=LoggingExtractor()) as srv:
        r = upload(requests, srv.url)
    assert r.status_code == 200
    lines = log.of(r.headers["x-request-id"])
    pool = [line for line in lines if line["logger"] == "server.test_pool"]
    assert len(pool) == 1 and "MainThread" not in pool[0]["message"] and "test-server" not in pool[0]["message"]


def test_an_access_line_names_the_route_never_the_raw_path(log: CapturedLog) -> None:
    voice = "0a4e1f6c-0000-4000-8000-000000000000"
    log_request("GET", f"/api/v1/audio/reference_audio/{voice}", 200, 0.0012, request_id="r1")
    log_request("GET", "/internal/v1/health", 200, 0.0, request_id="r2")
    log_request("POST", "/internal/v1/jobs/", 101, 0.0, request_id="r3")
    log_request("GET", "/health", 503, 0.0, request_id="r4")  # a failing probe is worth an INFO line
    lines = {line["request_id"]: line for line in log.lines()}
    assert lines["r1"]["route"] == "reference_audio_id" and voice not in json.dumps(lines["r1"])
    assert lines["r1"]["duration_ms"] == 1.2 and lines["r1"]["message"] == "GET reference_audio_id 200 1.2 ms"
    assert (lines["r2"]["route"], lines["r2"]["level"]) == ("/internal/v1/health", "DEBUG")
    assert (lines["r3"]["route"], lines["r3"]["level"]) == ("/internal/v1/jobs", "INFO")
    assert lines["r4"]["level"] == "INFO"
