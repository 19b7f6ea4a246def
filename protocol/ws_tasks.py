"""The duplex WebSocket task protocol (run-task / continue-task / finish-task), one machine per connection.

Pure: the server feeds client text messages and engine outcomes in; the machine answers with
actions (frozen dataclasses) the server carries out in order. All state transitions live in
`TRANSITIONS`; anything not in it is a protocol error.

    IDLE --run-task--> STARTING --started--> RUNNING --finish-task--> FINISHING --finished--> IDLE
    STARTING --finish-task--> STARTING_FINISHED --started--> FINISHING
    (continue-task keeps STARTING / RUNNING; failed: any active state -> IDLE)

`started` is the server's confirmation that the job was admitted (reference audio found, engine
has room): only then does the client see task-started. A client may send continue-task before
task-started arrives; the text is queued for the job (PushText) all the same.

Error policy (the original document is silent; chosen here):
- idle connection: one task-failed carrying the message's task_id ("" if unreadable);
- a message for another task_id, or a second run-task while one runs: task-failed for that
  task_id only; the running task goes on (a bad message changes nothing);
- anything else wrong while a task runs (bad JSON, unknown action, empty text, text after
  finish-task, too much text, finish-task before any text): the running task fails
  (CancelTask + task-failed).
"""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

from protocol.errors import ApiError, ErrorCode, ws_task_failed
from protocol.schema import (
    DEFAULT_MAX_TEXT_CHARS,
    LONE_SURROGATE,
    SpeechParams,
    check_ws_text,
    has_lone_surrogate,
    parse_ws_run_task,
)
from protocol.ws_events import result_generated, task_failed, task_finished, task_started

__all__ = ["Action", "CancelTask", "FinishText", "PushText", "SendEvent", "StartTask", "State", "WsTaskMachine",
           "result_generated", "task_failed", "task_finished", "task_started"]  # events re-exported for callers


class State(enum.Enum):
    IDLE = "idle"
    STARTING = "starting"  # run-task accepted, waiting for the server's `started`
    STARTING_FINISHED = "starting_finished"  # ... and finish-task already received
    RUNNING = "running"
    FINISHING = "finishing"  # finish-task received, audio still coming


# (state, input) -> next state. Inputs: client actions and server confirmations.
TRANSITIONS: dict[tuple[State, str], State] = {
    (State.IDLE, "run-task"): State.STARTING,
    (State.STARTING, "continue-task"): State.STARTING,
    (State.STARTING, "finish-task"): State.STARTING_FINISHED,
    (State.STARTING, "started"): State.RUNNING,
    (State.STARTING_FINISHED, "started"): State.FINISHING,
    (State.RUNNING, "continue-task"): State.RUNNING,
    (State.RUNNING, "finish-task"): State.FINISHING,
    (State.RUNNING, "audio"): State.RUNNING,
    (State.FINISHING, "audio"): State.FINISHING,
    (State.RUNNING, "finished"): State.IDLE,
    (State.FINISHING, "finished"): State.IDLE,
    (State.STARTING, "failed"): State.IDLE,
    (State.STARTING_FINISHED, "failed"): State.IDLE,
    (State.RUNNING, "failed"): State.IDLE,
    (State.FINISHING, "failed"): State.IDLE,
}
CLIENT_ACTIONS = ("run-task", "continue-task", "finish-task")


# ---- actions for the server ----
@dataclass(frozen=True)
class StartTask:
    task_id: str
    params: SpeechParams  # text is None: it arrives through PushText


@dataclass(frozen=True)
class PushText:
    task_id: str
    text: str


@dataclass(frozen=True)
class FinishText:
    task_id: str


@dataclass(frozen=True)
class CancelTask:
    task_id: str  # stop the engine job now
    failed: bool = True  # its task-failed is in the actions; False: the client left, nothing is sent


@dataclass(frozen=True)
class SendEvent:
    event: dict[str, Any]

    def to_text(self) -> str:
        return json.dumps(self.event, ensure_ascii=False, separators=(",", ":"))


Action = StartTask | PushText | FinishText | CancelTask | SendEvent


class _ProtocolError(ApiError):
    def __init__(self, code: ErrorCode, message: str, task_id: str = "", own: bool = True) -> None:
        super().__init__(message, code=code)
        self.task_id = task_id
        self.own = own  # False: about another task; the running one is left alone


class WsTaskMachine:
    def __init__(self, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS) -> None:
        self._max_text_chars = max_text_chars
        self.state = State.IDLE
        self.task_id: str | None = None  # the active task
        self._text_chars = 0

    @property
    def active(self) -> bool:
        return self.state is not State.IDLE

    # ---- client input ----
    def handle_client_message(self, text: str) -> list[Action]:
        try:
            return self._handle(text)
        except _ProtocolError as err:
            return self._on_error(err)

    def _handle(self, text: str) -> list[Action]:
        msg = _load(text)
        header = msg.get("header")
        if not isinstance(header, dict):
            raise _ProtocolError(ErrorCode.INVALID_MESSAGE, "message has no 'header' object")
        task_id = header.get("task_id")
        task_id = task_id if isinstance(task_id, str) else ""
        action = header.get("action")
        if action not in CLIENT_ACTIONS:
            raise _ProtocolError(ErrorCode.UNKNOWN_ACTION, f"unknown action {action!r}", task_id)
        payload = msg.get("payload", {})
        if not isinstance(payload, dict):
            raise _ProtocolError(ErrorCode.INVALID_MESSAGE, "'payload' must be an object", task_id)
        if action == "run-task":
            return self._run_task(task_id, payload)
        self._check_task_id(action, task_id)
        if action == "continue-task":
            return self._continue_task(task_id, payload)
        if self._text_chars == 0:  # the engine would speak its prompt alone: nothing was asked for
            raise _ProtocolError(ErrorCode.INVALID_PARAMETER, "no text was sent before finish-task", task_id)
        self._step("finish-task")
        return [FinishText(task_id)]

    def _run_task(self, task_id: str, payload: dict[str, Any]) -> list[Action]:
        if self.active:
            raise _ProtocolError(ErrorCode.TASK_ALREADY_RUNNING, f"task {self.task_id} is still running; "
                                 "send run-task after task-finished", task_id, own=task_id == self.task_id)
        if not task_id:
            raise _ProtocolError(ErrorCode.INVALID_MESSAGE, "run-task needs a non-empty header.task_id")
        try:
            params = parse_ws_run_task(payload.get("parameters"), payload.get("model"))  # type: ignore[arg-type]
            first_text = _input_text(payload)
            if first_text is not None:
                first_text = check_ws_text(first_text, self._max_text_chars)
        except ApiError as err:
            raise _ProtocolError(ErrorCode.INVALID_PARAMETER, err.message, task_id) from None
        self._step("run-task")
        self.task_id, self._text_chars = task_id, 0
        actions: list[Action] = [StartTask(task_id, params)]
        if first_text is not None:
            self._text_chars += len(first_text)
            actions.append(PushText(task_id, first_text))
        return actions

    def _continue_task(self, task_id: str, payload: dict[str, Any]) -> list[Action]:
        if (self.state, "continue-task") not in TRANSITIONS:
            raise _ProtocolError(ErrorCode.INVALID_STATE, "continue-task after finish-task", task_id)
        try:
            text = check_ws_text(_input_text(payload), self._max_text_chars - self._text_chars)
        except ApiError as err:
            raise _ProtocolError(ErrorCode.INVALID_PARAMETER, err.message, task_id) from None
        self._text_chars += len(text)
        self._step("continue-task")
        return [PushText(task_id, text)]

    def _check_task_id(self, action: str, task_id: str) -> None:
        if not self.active:
            raise _ProtocolError(ErrorCode.TASK_NOT_STARTED, f"{action} before run-task", task_id)
        if task_id != self.task_id:
            raise _ProtocolError(ErrorCode.TASK_ID_MISMATCH, f"{action} for task {task_id!r}, but the running "
                                 f"task is {self.task_id!r}", task_id, own=False)
        if (self.state, action) not in TRANSITIONS:
            raise _ProtocolError(ErrorCode.INVALID_STATE, f"{action} not allowed now ({self.state.value})", task_id)

    def _on_error(self, err: _ProtocolError) -> list[Action]:
        if not self.active or not err.own:
            return [SendEvent(ws_task_failed(err.task_id, err))]
        task_id = self.task_id or ""
        self._reset()
        return [CancelTask(task_id), SendEvent(ws_task_failed(task_id, err))]

    # ---- engine / server input ----
    def started(self, task_id: str) -> list[Action]:
        """The server admitted the job: tell the client."""
        if not self._is_current(task_id, "started"):
            return []
        self._step("started")
        return [SendEvent(task_started(task_id))]

    def audio(self, task_id: str, audio_b64: str, metrics: dict[str, Any]) -> list[Action]:
        if not self._is_current(task_id, "audio"):
            return []  # late chunk of a cancelled task
        return [SendEvent(result_generated(task_id, audio_b64, metrics))]

    def finished(self, task_id: str) -> list[Action]:
        if not self._is_current(task_id, "finished"):
            return []
        characters = self._text_chars
        self._reset()
        return [SendEvent(task_finished(task_id, characters))]

    def failed(self, task_id: str, code: ErrorCode, message: str) -> list[Action]:
        """The engine/server failed the job (unknown reference, overload, internal error)."""
        if not self._is_current(task_id, "failed"):
            return []
        self._reset()
        return [SendEvent(ws_task_failed(task_id, ApiError(message, code=code)))]

    def connection_lost(self) -> list[Action]:
        """The client went away: cancel at once, nothing to send."""
        if not self.active:
            return []
        task_id = self.task_id or ""
        self._reset()
        return [CancelTask(task_id, failed=False)]

    # ---- helpers ----
    def _is_current(self, task_id: str, what: str) -> bool:
        return task_id == self.task_id and (self.state, what) in TRANSITIONS

    def _step(self, what: str) -> None:
        self.state = TRANSITIONS[(self.state, what)]

    def _reset(self) -> None:
        self.state, self.task_id, self._text_chars = State.IDLE, None, 0


def _load(text: str) -> dict[str, Any]:
    try:
        msg = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise _ProtocolError(ErrorCode.INVALID_MESSAGE, f"message is not valid JSON: {exc}") from None
    if has_lone_surrogate(msg):  # not even its task_id could be sent back
        raise _ProtocolError(ErrorCode.INVALID_MESSAGE, f"message is not valid Unicode: {LONE_SURROGATE}")
    if not isinstance(msg, dict):
        raise _ProtocolError(ErrorCode.INVALID_MESSAGE, "message must be a JSON object")
    return msg


def _input_text(payload: dict[str, Any]) -> Any:
    inp = payload.get("input", {})
    return inp.get("text") if isinstance(inp, dict) else None
