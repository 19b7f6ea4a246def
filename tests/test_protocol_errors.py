"""The error vocabulary: every ErrorCode has a form on each transport, and engine codes map like API ones."""
from __future__ import annotations

import json

import pytest

from protocol.errors import (
    HTTP_STATUS,
    ApiError,
    ErrorCode,
    Overloaded,
    engine_error,
    http_error,
    sse_error_event,
    ws_task_failed,
)
from scheduler.jobs import Failed
from scheduler.scheduler import RequestRejected


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_code_has_an_http_response(code: ErrorCode) -> None:
    status, headers, body = http_error(ApiError("boom", code=code), "rid")
    assert 400 <= status < 600 and status == HTTP_STATUS[code]
    assert ("content-type", "application/json") in headers
    assert json.loads(body) == {"code": code.value, "message": "boom", "request_id": "rid"}


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_code_has_an_sse_error_event(code: ErrorCode) -> None:
    event = sse_error_event(ApiError("boom", code=code), "rid")
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    obj = json.loads(event[len(b"data: "):])
    assert obj["request_id"] == "rid" and obj["output"]["finish_reason"] == "error"
    assert obj["error"] == {"code": code.value, "message": "boom"}


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_code_has_a_ws_task_failed(code: ErrorCode) -> None:
    event = json.loads(json.dumps(ws_task_failed("t1", ApiError("boom", code=code))))
    assert event["header"]["event"] == "task-failed" and event["header"]["task_id"] == "t1"
    assert (event["header"]["error_code"], event["header"]["error_message"]) == (code.value, "boom")


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_engine_code_becomes_the_same_api_code(code: ErrorCode) -> None:
    err = engine_error(code, "boom")
    assert err.code is code and err.message == "boom" and err.status == HTTP_STATUS[code]


def test_contract_statuses() -> None:
    want = {"InvalidParameter": 400, "Unauthorized": 401, "NotFound": 404, "MethodNotAllowed": 405,
            "PayloadTooLarge": 413, "UnsupportedMediaType": 415, "Overloaded": 503, "InternalError": 500}
    assert {code: HTTP_STATUS[ErrorCode(code)] for code in want} == want


def test_engine_overload_carries_retry_after() -> None:
    err = engine_error(ErrorCode.OVERLOADED, "waiting queue is full")
    assert isinstance(err, Overloaded) and ("retry-after", "1") in http_error(err, "r")[1]


def test_codes_compare_equal_to_their_strings() -> None:
    assert ErrorCode.OVERLOADED == "Overloaded" and f"{ErrorCode.NOT_FOUND}" == "NotFound"
    assert json.dumps({"c": ErrorCode.CANCELLED}) == '{"c": "Cancelled"}'


def test_engine_messages_carry_the_enum() -> None:
    assert RequestRejected(ErrorCode.OVERLOADED, "full").code is ErrorCode.OVERLOADED
    assert Failed("r", ErrorCode.INTERNAL_ERROR, "x").code is ErrorCode.INTERNAL_ERROR
