"""The WebSocket task contract as a monitor: it watches every `WsTaskMachine` call and the actions that
came back, and fails on anything /work/shared/api/CONTRACT.md and the README ("WebSocket duplex",
"API behaviour where the contract is silent") forbid.

What it enforces, per connection:
- one task at a time: StartTask only when none runs; PushText / FinishText / CancelTask only for it;
- the engine hears nothing of a task after it ended (CancelTask, task-finished, task-failed);
- the client sees, per task: task-started at most once, result-generated only after it, then exactly one
  of task-finished (only after its finish-task) / task-failed, and nothing after that;
- task-failed naming the running task ends it; one naming another id leaves the running task alone;
- task-finished counts the characters pushed; every event is JSON a WebSocket text frame can carry;
- engine calls never start, feed or cancel anything; a call for another task id is ignored.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from protocol.ws_tasks import (
    Action,
    CancelTask,
    FinishText,
    PushText,
    SendEvent,
    StartTask,
    State,
    WsTaskMachine,
)

EVENTS = ("task-started", "result-generated", "task-finished", "task-failed")


@dataclass
class _Task:
    task_id: str
    started: bool = False  # task-started sent
    texts: list[str] = field(default_factory=list)
    finish_text: bool = False  # FinishText sent to the engine


def message_header(text: str) -> tuple[str | None, str | None]:
    """(action, task_id) of a client message, None where unreadable."""
    try:
        header = json.loads(text).get("header")
        return header.get("action"), header.get("task_id")
    except (ValueError, AttributeError, RecursionError):
        return None, None


class ContractMonitor:
    def __init__(self, machine: WsTaskMachine) -> None:
        self.machine = machine
        self.task: _Task | None = None
        self.events: list[dict] = []  # everything the client was sent, in order

    # ---- observed calls ----
    def client(self, text: str, actions: list[Action]) -> None:
        action, task_id = message_header(text)
        for a in actions:
            if isinstance(a, StartTask):
                assert action == "run-task" and a.task_id == task_id, (text, actions)
            elif isinstance(a, PushText):
                assert action in ("run-task", "continue-task") and a.task_id == task_id, (text, actions)
            elif isinstance(a, FinishText):
                assert action == "finish-task" and a.task_id == task_id, (text, actions)
        self._apply(actions)

    def engine(self, what: str, task_id: str, actions: list[Action]) -> None:
        assert all(isinstance(a, SendEvent) for a in actions), (what, actions)
        expected = {"started": "task-started", "audio": "result-generated", "finished": "task-finished",
                    "failed": "task-failed"}[what]
        assert [a.event["header"]["event"] for a in actions] in ([], [expected]), (what, actions)
        running = self.task.task_id if self.task else None
        assert not actions or task_id == running, f"{what} for {task_id!r} answered while {running!r} runs"
        self._apply(actions)

    def connection_lost(self, actions: list[Action]) -> None:
        running = self.task.task_id if self.task else None
        assert actions == ([CancelTask(running, failed=False)] if running is not None else []), actions
        self.task = None
        self._check_state()

    # ---- the rules ----
    def _apply(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, SendEvent):
                self._event(a)
            else:
                self._engine_action(a)
        self._check_state()

    def _engine_action(self, a: Action) -> None:
        if isinstance(a, StartTask):
            assert self.task is None, f"StartTask {a.task_id!r} while {self.task.task_id!r} runs"
            assert a.task_id and a.params.text is None, a
            self.task = _Task(a.task_id)
            return
        assert self.task is not None and a.task_id == self.task.task_id, f"{a} for no running task"
        if isinstance(a, PushText):
            assert not self.task.finish_text, f"{a} after finish-task"
            assert isinstance(a.text, str) and a.text.strip(), a
            self.task.texts.append(a.text)
        elif isinstance(a, FinishText):
            assert not self.task.finish_text and self.task.texts, f"{a}: twice, or before any text"
            self.task.finish_text = True
        else:
            assert isinstance(a, CancelTask) and a.failed, a
            self.task = None  # its task-failed follows in the same list

    def _event(self, a: SendEvent) -> None:
        text = a.to_text()
        text.encode("utf-8")  # a WebSocket text frame is UTF-8: a lone surrogate cannot be sent
        event = json.loads(text)
        assert event == a.event, "an event does not survive JSON"
        header = event["header"]
        name, task_id = header["event"], header["task_id"]
        assert name in EVENTS and isinstance(task_id, str), event
        self.events.append(event)
        task = self.task if self.task is not None and self.task.task_id == task_id else None
        if name == "task-failed":
            assert header["error_code"] and isinstance(header["error_message"], str), event
            if task is not None:  # it names the running task: that task is over
                self.task = None
            return
        assert task is not None, f"{name} for {task_id!r}, which is not running"
        if name == "task-started":
            assert not task.started, f"a second task-started for {task_id!r}"
            task.started = True
        elif name == "result-generated":
            assert task.started, f"result-generated before task-started for {task_id!r}"
        else:
            assert task.started and task.finish_text, f"task-finished for {task_id!r} before finish-task"
            assert event["payload"]["usage"]["characters"] == sum(map(len, task.texts)), event
            self.task = None

    def _check_state(self) -> None:
        """The machine's own view agrees: a task runs exactly when the contract says one does."""
        if self.task is None:
            assert self.machine.state is State.IDLE and not self.machine.active, self.machine.state
        else:
            assert self.machine.task_id == self.task.task_id, (self.machine.task_id, self.task)
            admitted = self.machine.state in (State.RUNNING, State.FINISHING)
            assert admitted == self.task.started, (self.machine.state, self.task)
            finishing = self.machine.state in (State.STARTING_FINISHED, State.FINISHING)
            assert finishing == self.task.finish_text, (self.machine.state, self.task)
