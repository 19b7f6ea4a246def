"""`WsTaskMachine` under a script of client messages and engine outcomes, watched by `ContractMonitor`.

`FakeEngine` plays the server's side as a real job could: it admits, speaks and finishes only the task it
was given, finishes only after FinishText, and may fail at any time. `stale` calls are the engine's late
words about a task that is not the running one: the machine must ignore them.
"""
from __future__ import annotations

import json

from protocol.ws_tasks import Action, CancelTask, FinishText, SendEvent, StartTask, WsTaskMachine
from tests.fuzz.ws_contract import ContractMonitor

MAX_TEXT_CHARS = 40
TASK_IDS = ("t1", "t2", "", "\ud800", "t1 ")  # "\ud800": half a UTF-16 pair, as JSON can escape it
PARAMS = {"mode": "fast_replication", "reference_audio_id": "ref", "output_format": "mp3", "sample_rate": 24000}
ODD_TEXTS = (None, "", " ", 7, None, "x" * 30)  # [0]: a text read from the input instead
PARAMETER_VARIANTS = (PARAMS, {**PARAMS, "speed": 9}, {**PARAMS, "mode": "natural_language_replication"},
                      {**PARAMS, "volume": 10 ** 400}, None, [], {})


def message(action: str, task_id: str, payload: object) -> str:
    return json.dumps({"header": {"action": action, "task_id": task_id, "streaming": "duplex"},
                       "payload": payload})


def run_task(task_id: str, parameters: object = PARAMS, text: object = None, model: object = "cosyvoice-v2") -> str:
    return message("run-task", task_id, {"task_group": "audio", "task": "tts", "function": "SpeechSynthesizer",
                                         "model": model, "parameters": parameters,
                                         "input": {} if text is None else {"text": text}})


def continue_task(task_id: str, text: object) -> str:
    return message("continue-task", task_id, {"input": {"text": text}})


def finish_task(task_id: str) -> str:
    return message("finish-task", task_id, {"input": {}})


LONG_MESSAGES = ("[" * 5000, '{"header":' * 3000, continue_task("t1", "x" * 5000))


class FakeEngine:
    """The job the server runs for the machine's StartTask, as far as causality goes."""

    def __init__(self) -> None:
        self.job: str | None = None
        self.admitted = False
        self.text_done = False

    def apply(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, StartTask):
                self.job, self.admitted, self.text_done = a.task_id, False, False
            elif isinstance(a, FinishText):
                self.text_done = True
            elif isinstance(a, CancelTask) or self._told_the_end(a):
                self.job = None

    def _told_the_end(self, action: Action) -> bool:
        """task-finished / task-failed for the job: the server lets the job go."""
        if not isinstance(action, SendEvent):
            return False
        header = action.event["header"]
        return header["event"] in ("task-finished", "task-failed") and header["task_id"] == self.job

    def possible(self) -> list[str]:
        """What the running job may do next."""
        if self.job is None:
            return []
        return (["audio"] + (["finished"] if self.text_done else []) if self.admitted else ["started"]) + ["failed"]


class Session:
    """One connection: the machine, its monitor and the fake engine, stepped together."""

    def __init__(self, max_text_chars: int = MAX_TEXT_CHARS) -> None:
        self.machine = WsTaskMachine(max_text_chars)
        self.monitor = ContractMonitor(self.machine)
        self.engine = FakeEngine()

    def client(self, text: str) -> list[Action]:
        actions = self.machine.handle_client_message(text)
        self.monitor.client(text, actions)
        self.engine.apply(actions)
        return actions

    def engine_step(self, what: str) -> list[Action]:
        """The running job's next outcome (`what` in `engine.possible()`)."""
        task_id = self.engine.job
        assert task_id is not None and what in self.engine.possible(), (what, self.engine.possible())
        if what == "started":
            self.engine.admitted = True
        return self._engine_call(what, task_id)

    def stale(self, what: str, task_id: str) -> list[Action]:
        """The engine speaking of a task that is not the running one (cancelled, finished, never started)."""
        assert task_id != self.engine.job
        actions = self._engine_call(what, task_id)
        assert actions == [], (what, task_id, actions)
        return actions

    def _engine_call(self, what: str, task_id: str) -> list[Action]:
        if what == "started":
            actions = self.machine.started(task_id)
        elif what == "audio":
            actions = self.machine.audio(task_id, "QUJD", {"speech_len": 0.1})
        elif what == "finished":
            actions = self.machine.finished(task_id)
        else:
            actions = self.machine.failed(task_id, "InternalError", "engine failed")  # type: ignore[arg-type]
        self.monitor.engine(what, task_id, actions)
        self.engine.apply(actions)
        return actions

    def connection_lost(self) -> list[Action]:
        actions = self.machine.connection_lost()
        self.monitor.connection_lost(actions)
        self.engine.apply(actions)
        return actions


class _Bytes:
    """Reads a fuzz input as a script: small choices and length-prefixed strings."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def __bool__(self) -> bool:
        return self.pos < len(self.data)

    def byte(self) -> int:
        b = self.data[self.pos] if self.pos < len(self.data) else 0
        self.pos += 1
        return b

    def pick(self, options: tuple | list) -> object:
        return options[self.byte() % len(options)]

    def text(self, n: int | None = None) -> str:
        n = self.byte() % 64 if n is None else n
        raw = self.data[self.pos:self.pos + n]
        self.pos += n
        return raw.decode("utf-8", "replace")  # a WebSocket text frame is valid UTF-8 (wsproto checks)


def run_script(data: bytes) -> Session:
    """Interpret `data` as a sequence of steps; the monitor checks every one."""
    s, r = Session(), _Bytes(data)
    while r:
        op = r.byte() % 8
        if op == 0:
            n = r.byte()  # a length, or past 191 a message too long to spell out byte by byte
            s.client(LONG_MESSAGES[n % len(LONG_MESSAGES)] if n >= 192 else r.text(n % 64))  # anything at all
        elif op == 1:
            s.client(run_task(r.pick(TASK_IDS), r.pick(PARAMETER_VARIANTS), r.pick((None, "hi", "", 5))))
        elif op == 2:
            task_id, choice = r.pick(TASK_IDS), r.byte() % len(ODD_TEXTS)
            s.client(continue_task(task_id, r.text() if choice == 0 else ODD_TEXTS[choice]))
        elif op == 3:
            s.client(finish_task(r.pick(TASK_IDS)))
        elif op in (4, 5):
            if s.engine.possible():
                s.engine_step(r.pick(s.engine.possible()))
        elif op == 6:
            task_id = r.pick(TASK_IDS)
            if task_id != s.engine.job:
                s.stale(r.pick(("started", "audio", "finished", "failed")), task_id)
        else:
            s.connection_lost()
            break  # the socket is gone: nothing more arrives
    return s
