from __future__ import annotations

import json

import pytest

from protocol.errors import ErrorCode
from protocol.ws_tasks import (
    CancelTask,
    FinishText,
    PushText,
    SendEvent,
    StartTask,
    State,
    WsTaskMachine,
    result_generated,
    task_failed,
    task_finished,
    task_started,
)
from scheduler.jobs import Mode

PARAMS = {"mode": "fast_replication", "reference_audio_id": "ref", "output_format": "mp3", "sample_rate": 24000,
          "bit_rate": "48k", "volume": 2.0, "instruct": "", "speed": 1.0, "debug": True}


def run_task(task_id: str = "t1", params: dict | None = None, model: str = "cosyvoice-v2") -> str:
    return json.dumps({"header": {"action": "run-task", "task_id": task_id, "streaming": "duplex"},
                       "payload": {"task_group": "audio", "task": "tts", "function": "SpeechSynthesizer",
                                   "model": model, "parameters": params or PARAMS, "input": {}}})


def cont(text: object, task_id: str = "t1") -> str:
    return json.dumps({"header": {"action": "continue-task", "task_id": task_id, "streaming": "duplex"},
                       "payload": {"input": {"text": text}}})


def finish(task_id: str = "t1") -> str:
    return json.dumps({"header": {"action": "finish-task", "task_id": task_id, "streaming": "duplex"},
                       "payload": {"input": {}}})


def failed(actions: list) -> tuple[str, str]:
    ev = [a for a in actions if isinstance(a, SendEvent)][-1].event
    assert ev["header"]["event"] == "task-failed"
    return ev["header"]["task_id"], ev["header"]["error_code"]


def test_event_shapes() -> None:
    assert task_started("t") == {"header": {"task_id": "t", "event": "task-started", "attributes": {}},
                                 "payload": {}}
    rg = result_generated("t", "QUJD", {"speech_len": 0.5})
    assert rg["header"]["event"] == "result-generated"
    assert rg["payload"]["output"]["audio"]["data"] == "QUJD" and rg["payload"]["metrics"]["speech_len"] == 0.5
    assert task_finished("t")["header"]["event"] == "task-finished"
    tf = task_failed("t", "InvalidParameter", "bad")
    assert tf["header"]["error_code"] == "InvalidParameter" and tf["header"]["error_message"] == "bad"
    assert json.loads(SendEvent(tf).to_text()) == tf


def full_task(m: WsTaskMachine, task_id: str) -> list:
    log: list = []
    (start,) = m.handle_client_message(run_task(task_id))
    assert isinstance(start, StartTask) and start.params.mode is Mode.ZERO_SHOT and start.params.text is None
    log += m.started(task_id)
    log += m.handle_client_message(cont("你好,", task_id))
    log += m.handle_client_message(cont("世界。", task_id))
    log += m.audio(task_id, "AAA=", {"speech_len": 0.1})
    log += m.handle_client_message(finish(task_id))
    assert m.state is State.FINISHING
    log += m.audio(task_id, "BBB=", {"speech_len": 0.1})
    log += m.finished(task_id)
    assert m.state is State.IDLE
    return log


def test_two_tasks_on_one_connection() -> None:
    m = WsTaskMachine()
    for task_id in ("t1", "t2"):
        log = full_task(m, task_id)
        kinds = [a.event["header"]["event"] if isinstance(a, SendEvent) else type(a).__name__ for a in log]
        assert kinds == ["task-started", "PushText", "PushText", "result-generated", "FinishText",
                         "result-generated", "task-finished"]
        assert log[1] == PushText(task_id, "你好,") and log[4] == FinishText(task_id)
        assert log[-1].event["payload"]["usage"] == {"characters": 6}


def test_text_before_task_started_is_queued() -> None:
    m = WsTaskMachine()
    m.handle_client_message(run_task())
    assert m.handle_client_message(cont("a")) == [PushText("t1", "a")]
    assert m.handle_client_message(finish()) == [FinishText("t1")]
    assert m.state is State.STARTING_FINISHED
    assert m.started("t1") == [SendEvent(task_started("t1"))]
    assert m.state is State.FINISHING


def test_engine_failure_and_late_events_dropped() -> None:
    m = WsTaskMachine()
    m.handle_client_message(run_task())
    assert failed(m.failed("t1", ErrorCode.NOT_FOUND, "unknown reference audio")) == ("t1", "NotFound")
    assert m.state is State.IDLE
    assert m.audio("t1", "x", {}) == [] and m.finished("t1") == [] and m.started("t1") == []


@pytest.mark.parametrize("msg,code", [
    ("not json", "InvalidMessage"), ("[]", "InvalidMessage"), ('{"payload":{}}', "InvalidMessage"),
    ("[" * 100_000, "InvalidMessage"),  # nested too deep: was a RecursionError out of the machine (tests/fuzz)
    (cont("x", "\ud800"), "InvalidMessage"),  # half a surrogate pair: not sendable back (see below)
    (json.dumps({"header": {"action": "stop", "task_id": "t1"}}), "UnknownAction"),
    (cont("x"), "TaskNotStarted"), (finish(), "TaskNotStarted"),
    (run_task(params={**PARAMS, "speed": 9}), "InvalidParameter"),
    (run_task(params={**PARAMS, "mode": "natural_language_replication"}), "InvalidParameter"),
    (run_task(model="gpt"), "InvalidParameter"),
    (run_task(task_id=""), "InvalidMessage"),
])
def test_errors_when_idle(msg: str, code: str) -> None:
    m = WsTaskMachine()
    actions = m.handle_client_message(msg)
    assert len(actions) == 1 and failed(actions)[1] == code and m.state is State.IDLE


@pytest.mark.parametrize("msg,code", [
    (run_task("t2"), "TaskAlreadyRunning"),
    (cont("x", "other"), "TaskIdMismatch"),
    (finish("other"), "TaskIdMismatch"),
])
def test_foreign_messages_leave_the_running_task_alone(msg: str, code: str) -> None:
    m = WsTaskMachine()
    m.handle_client_message(run_task())
    m.started("t1")
    actions = m.handle_client_message(msg)
    assert len(actions) == 1 and failed(actions)[1] == code
    assert m.state is State.RUNNING and m.task_id == "t1"


@pytest.mark.parametrize("msg,code", [
    ("{bad", "InvalidMessage"), (cont(""), "InvalidParameter"), (cont(5), "InvalidParameter"),
    (cont("x" * 20), "InvalidParameter"), (run_task("t1"), "TaskAlreadyRunning"),
])
def test_own_errors_fail_the_running_task(msg: str, code: str) -> None:
    m = WsTaskMachine(max_text_chars=10)
    m.handle_client_message(run_task())
    m.started("t1")
    actions = m.handle_client_message(msg)
    assert actions[0] == CancelTask("t1") and failed(actions) == ("t1", code)
    assert m.state is State.IDLE
    assert isinstance(m.handle_client_message(run_task("t3"))[0], StartTask)  # the connection goes on


def test_continue_after_finish_fails() -> None:
    m = WsTaskMachine()
    m.handle_client_message(run_task())
    m.started("t1")
    m.handle_client_message(cont("text"))
    m.handle_client_message(finish())
    actions = m.handle_client_message(cont("more"))
    assert actions[0] == CancelTask("t1") and failed(actions)[1] == "InvalidState"


@pytest.mark.parametrize("admitted", [False, True])
def test_finish_without_text_fails(admitted: bool) -> None:
    """Nothing to speak: task-failed rather than the audio of an empty text."""
    m = WsTaskMachine()
    m.handle_client_message(run_task())
    if admitted:
        m.started("t1")
    actions = m.handle_client_message(finish())
    assert actions[0] == CancelTask("t1") and failed(actions) == ("t1", "InvalidParameter")
    assert "no text" in actions[-1].event["header"]["error_message"] and m.state is State.IDLE


def test_text_in_run_task_input_is_pushed() -> None:
    msg = json.loads(run_task())
    msg["payload"]["input"] = {"text": "hi"}
    assert WsTaskMachine().handle_client_message(json.dumps(msg))[1] == PushText("t1", "hi")


def test_connection_lost_cancels() -> None:
    m = WsTaskMachine()
    assert m.connection_lost() == []
    m.handle_client_message(run_task())
    assert m.connection_lost() == [CancelTask("t1", failed=False)] and m.state is State.IDLE


@pytest.mark.parametrize("msg", [cont("x", task_id="\ud800"), run_task("t\udfff"), cont("a\ud800b"),
                                 json.dumps({"header": {"action": "finish-task", "task_id": "t1"}, "x": "\udc00"})])
def test_a_lone_surrogate_escape_is_an_invalid_message_that_can_be_sent(msg: str) -> None:
    """Found by tests/fuzz/fuzz_ws_tasks.py: JSON may escape half a UTF-16 pair ("\\ud800"); echoed in
    task-failed's task_id it made a str no WebSocket frame can carry (UnicodeEncodeError in the server),
    and as text it reached the tokenizer (TypeError). Refused whole, idle or while a task runs."""
    for running in (False, True):
        m = WsTaskMachine()
        if running:
            m.handle_client_message(run_task())
        actions = m.handle_client_message(msg)
        assert failed(actions) == ("t1" if running else "", "InvalidMessage") and m.state is State.IDLE
        assert all(a.to_text().encode("utf-8") for a in actions if isinstance(a, SendEvent))
