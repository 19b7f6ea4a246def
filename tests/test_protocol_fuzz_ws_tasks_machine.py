"""The WebSocket task protocol as a hypothesis state machine: WsTaskMachine against a small reference model
of the contract (/work/shared/api/CONTRACT.md, README "WebSocket duplex" and "API behaviour where the
contract is silent"), and under tests/fuzz/ws_contract.py's monitor at every step.

The reference model predicts, for each client message and engine outcome, exactly what must come out:
engine actions (start, push, finish, cancel) and client events (task-started, result-generated,
task-finished, task-failed with its code). Forbidden states (continue-task before run-task, anything after
finish-task / task-failed, a second run-task while one runs, ...) are inputs here; the model says how
each is refused, and the monitor that nothing forbidden ever comes out.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from protocol.ws_tasks import Action, CancelTask, FinishText, PushText, SendEvent, StartTask, State
from tests.fuzz.drive_ws_tasks import (
    PARAMS,
    Session,
    continue_task,
    finish_task,
    message,
    run_script,
    run_task,
)
from tests.fuzz.strategies import examples

MAX_CHARS = 40
# Mostly the inputs that keep a task going, so runs get deep; the rest break a rule.
TASK_IDS = st.sampled_from(["t1", "t1", "t1", "t1", "t2", ""])
GOOD_TEXTS = st.text(min_size=1, max_size=6).filter(str.strip)
BAD_TEXTS = st.sampled_from(["", "  ", "\n", "x" * MAX_CHARS, 7, None, ["a"]])
TEXTS = st.one_of(GOOD_TEXTS, GOOD_TEXTS, GOOD_TEXTS, BAD_TEXTS)
FIRST_TEXTS = st.sampled_from([None, None, None, "hi", "", 5])
BAD_PARAMETERS = [{**PARAMS, "speed": 9}, {**PARAMS, "mode": "natural_language_replication"}, None, [],
                  {**PARAMS, "sample_rate": "24000"}]
GARBAGE = [("not json", ""), ("[]", ""), ('{"payload":{}}', ""), ('{"header":[]}', ""),
           (message("stop", "t1", {}), "t1"), (message("continue-task", "t1", []), "t1")]
GARBAGE_CODES = {"stop": "UnknownAction"}


def normal(actions: list[Action]) -> list[tuple]:
    """Actions as comparable tuples (an event by its name, task id and error code)."""
    out: list[tuple] = []
    for a in actions:
        if isinstance(a, StartTask):
            out.append(("start", a.task_id))
        elif isinstance(a, PushText):
            out.append(("push", a.task_id, a.text))
        elif isinstance(a, FinishText):
            out.append(("finish", a.task_id))
        elif isinstance(a, CancelTask):
            out.append(("cancel", a.task_id, a.failed))
        else:
            assert isinstance(a, SendEvent)
            h = a.event["header"]
            out.append((h["event"], h["task_id"], h.get("error_code")))
    return out


def valid_text(text: object, room: int) -> bool:
    return isinstance(text, str) and bool(text.strip()) and len(text) <= room


@dataclass
class Reference:
    """What the contract and our documented choices say each input must produce."""

    task: str | None = None
    admitted: bool = False  # task-started sent
    finishing: bool = False  # finish-task accepted
    chars: int = 0
    log: list[tuple] = field(default_factory=list)

    def _fail_running(self, code: str) -> list[tuple]:
        task = self.task
        self.end()
        return [("cancel", task, True), ("task-failed", task, code)]

    def end(self) -> None:
        self.task, self.admitted, self.finishing, self.chars = None, False, False, 0

    # ---- client messages ----
    def run(self, task_id: str, parameters_ok: bool, first: object) -> list[tuple]:
        if self.task is not None:  # a second run-task: its own id fails the running task, another only itself
            if task_id == self.task:
                return self._fail_running("TaskAlreadyRunning")
            return [("task-failed", task_id, "TaskAlreadyRunning")]
        if not task_id:
            return [("task-failed", "", "InvalidMessage")]
        if not parameters_ok or (first is not None and not valid_text(first, MAX_CHARS)):
            return [("task-failed", task_id, "InvalidParameter")]
        self.task = task_id
        if first is None:
            return [("start", task_id)]
        self.chars = len(first)  # type: ignore[arg-type]
        return [("start", task_id), ("push", task_id, first)]

    def _own(self, task_id: str) -> list[tuple] | None:
        """The refusals continue-task and finish-task share; None: it is for the running task, go on."""
        if self.task is None:
            return [("task-failed", task_id, "TaskNotStarted")]
        if task_id != self.task:
            return [("task-failed", task_id, "TaskIdMismatch")]
        if self.finishing:
            return self._fail_running("InvalidState")
        return None

    def cont(self, task_id: str, text: object) -> list[tuple]:
        refused = self._own(task_id)
        if refused is not None:
            return refused
        if not valid_text(text, MAX_CHARS - self.chars):
            return self._fail_running("InvalidParameter")
        self.chars += len(text)  # type: ignore[arg-type]
        return [("push", task_id, text)]

    def finish(self, task_id: str) -> list[tuple]:
        refused = self._own(task_id)
        if refused is not None:
            return refused
        if self.chars == 0:
            return self._fail_running("InvalidParameter")
        self.finishing = True
        return [("finish", task_id)]

    def garbage(self, task_id: str, code: str) -> list[tuple]:
        return self._fail_running(code) if self.task is not None else [("task-failed", task_id, code)]

    # ---- the engine ----
    def started(self) -> list[tuple]:
        self.admitted = True
        return [("task-started", self.task, None)]

    def audio(self) -> list[tuple]:
        return [("result-generated", self.task, None)]

    def finished(self) -> list[tuple]:
        task = self.task
        self.end()
        return [("task-finished", task, None)]

    def failed(self) -> list[tuple]:
        task = self.task
        self.end()
        return [("task-failed", task, "InternalError")]

    def connection_lost(self) -> list[tuple]:
        task = self.task
        self.end()
        return [("cancel", task, False)] if task is not None else []


class TaskProtocol(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.session = Session(MAX_CHARS)  # the machine, its contract monitor, the fake engine
        self.model = Reference()

    def expect(self, actions: list[Action], expected: list[tuple]) -> None:
        assert normal(actions) == expected, (normal(actions), expected)

    # ---- the client (rules split by state, so rule-breaking inputs stay a minority and tasks get far) ----
    @precondition(lambda self: self.model.task is None)
    @rule(task_id=TASK_IDS, bad=st.sampled_from([None] * 8 + list(range(len(BAD_PARAMETERS)))), first=FIRST_TEXTS)
    def run_task(self, task_id: str, bad: int | None, first: object) -> None:
        parameters = PARAMS if bad is None else BAD_PARAMETERS[bad]
        actions = self.session.client(run_task(task_id, parameters, first))
        self.expect(actions, self.model.run(task_id, bad is None, first))

    @precondition(lambda self: self.model.task is not None and not self.model.finishing)
    @rule(task_id=TASK_IDS, text=TEXTS)
    def continue_task(self, task_id: str, text: object) -> None:
        self.expect(self.session.client(continue_task(task_id, text)), self.model.cont(task_id, text))

    @precondition(lambda self: self.model.chars > 0 and not self.model.finishing)  # else: out_of_turn's
    @rule(task_id=TASK_IDS)
    def finish_task(self, task_id: str) -> None:
        self.expect(self.session.client(finish_task(task_id)), self.model.finish(task_id))

    @precondition(lambda self: self.model.finishing)
    @rule(kind=st.sampled_from(["continue", "finish"]), text=GOOD_TEXTS)
    def after_finish_task(self, kind: str, text: str) -> None:
        """The running task's own continue-task / finish-task once finish-task was accepted: it fails."""
        task_id = self.model.task
        assert task_id is not None
        if kind == "continue":
            self.expect(self.session.client(continue_task(task_id, text)), self.model.cont(task_id, text))
        else:
            self.expect(self.session.client(finish_task(task_id)), self.model.finish(task_id))

    @rule(kind=st.sampled_from(["continue", "finish", "run", "garbage", "continue", "finish", "leave"]),
          task_id=TASK_IDS, text=TEXTS, junk=st.sampled_from(GARBAGE))
    def out_of_turn(self, kind: str, task_id: str, text: object, junk: tuple[str, str]) -> None:
        """What the contract forbids now: continue/finish before run-task or after finish-task or for another
        id, a second run-task while one runs, a message that is not one, the client going away."""
        if kind == "continue":
            self.expect(self.session.client(continue_task(task_id, text)), self.model.cont(task_id, text))
        elif kind == "finish":
            self.expect(self.session.client(finish_task(task_id)), self.model.finish(task_id))
        elif kind == "run":
            self.expect(self.session.client(run_task(task_id)), self.model.run(task_id, True, None))
        elif kind == "garbage":
            junk_text, junk_id = junk
            code = "UnknownAction" if '"stop"' in junk_text else "InvalidMessage"
            self.expect(self.session.client(junk_text), self.model.garbage(junk_id, code))
        else:
            self.expect(self.session.connection_lost(), self.model.connection_lost())

    # ---- the engine: only what a real job can do next, failing now and then ----
    @precondition(lambda self: self.model.task is not None)
    @rule(fail=st.sampled_from([False] * 9 + [True]))
    def engine_step(self, fail: bool) -> None:
        """The job is admitted, or speaks; or it fails."""
        what = "failed" if fail else "audio" if self.model.admitted else "started"
        expected = {"started": self.model.started, "audio": self.model.audio, "failed": self.model.failed}[what]()
        self.expect(self.session.engine_step(what), expected)

    @precondition(lambda self: self.model.admitted and self.model.finishing)
    @rule()
    def engine_finishes(self) -> None:
        self.expect(self.session.engine_step("finished"), self.model.finished())

    @precondition(lambda self: self.model.task is not None)
    @rule(what=st.sampled_from(["started", "audio", "finished"]))
    def engine_out_of_order(self, what: str) -> None:
        """Late or early words about the running task no job sends in this order (a second `started`, audio or
        the end before it): ignored. (`finished` before finish-task is left out: a job cannot end sooner.)"""
        if (what == "started") != self.model.admitted:
            return  # in order after all (engine_step's), or `finished` before finish-task
        task_id = self.model.task
        assert task_id is not None
        actions = {"started": self.session.machine.started, "finished": self.session.machine.finished,
                   "audio": lambda t: self.session.machine.audio(t, "QUJD", {})}[what](task_id)
        self.expect(actions, [])

    @rule(what=st.sampled_from(["started", "audio", "finished", "failed"]), task_id=TASK_IDS)
    def engine_speaks_of_another_task(self, what: str, task_id: str) -> None:
        if task_id != self.model.task:
            self.session.stale(what, task_id)  # asserts it is ignored

    @invariant()
    def machine_agrees_with_the_model(self) -> None:
        m = self.session.machine
        assert m.task_id == self.model.task
        expected = State.IDLE if self.model.task is None else {
            (False, False): State.STARTING, (False, True): State.STARTING_FINISHED,
            (True, False): State.RUNNING, (True, True): State.FINISHING}[(self.model.admitted, self.model.finishing)]
        assert m.state is expected, (m.state, self.model)


def test_task_protocol() -> None:
    run_state_machine_as_test(TaskProtocol, settings=settings(examples(200), stateful_step_count=40))


@examples(200)
@given(st.binary(max_size=300))
def test_any_script_of_messages_and_engine_outcomes_keeps_the_contract(script: bytes) -> None:
    """The atheris harness's interpreter (raw messages, lone-surrogate ids, stale engine calls) under the monitor."""
    run_script(script)
