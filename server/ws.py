"""WebSocket duplex at /api-ws/v1/audio/speech: WsTaskMachine actions carried out on the loop.

One runner task per synthesis task: it looks up the voice, submits the job, says
task-started, forwards text queued before admission, then streams result-generated
events (awaiting drain: a slow reader stalls only itself) until task-finished. Several
tasks run one after another on one connection. A close or lost connection cancels the
running job at once.
"""
from __future__ import annotations

import asyncio
import base64
import logging

from protocol.errors import ApiError, InternalError
from protocol.schema import SpeechParams
from protocol.websocket import CLOSE_NORMAL, WebSocketSession
from protocol.ws_tasks import Action, CancelTask, FinishText, PushText, SendEvent, StartTask, WsTaskMachine
from server.context import new_request_id
from server.state import ServerState
from server.synthesis import Synthesis
from server.ws_handler import Socket, WsHandler

log = logging.getLogger("server.ws")


class _Task:
    """Bookkeeping for the active synthesis task: text that arrived before the job existed."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.synth: Synthesis | None = None
        self.pending: list[str] = []
        self.finish = False
        self.got_text = False
        self.runner: asyncio.Task[None] | None = None
        self.outcome = "cancelled"  # for /metrics; the runner or a failing CancelTask says otherwise

    def push(self, text: str) -> None:
        if self.synth is None:
            self.pending.append(text)
            return
        if not self.got_text:
            self.synth.restart_clock()
        self.got_text = True
        self.synth.stream.push_text(text)

    def finish_text(self) -> None:
        self.finish = True
        if self.synth is not None:
            self.synth.stream.finish_text()

    def attach(self, synth: Synthesis) -> None:
        self.synth = synth
        for text in self.pending:
            self.push(text)
        self.pending = []
        if self.finish:
            synth.stream.finish_text()

    def cancel(self, outcome: str = "cancelled") -> None:
        self.outcome = outcome
        if self.runner is not None:
            self.runner.cancel()
        if self.synth is not None:
            self.synth.close()


class WsConnection(WsHandler):
    def __init__(self, state: ServerState, session: WebSocketSession, proto: Socket) -> None:
        super().__init__(session, proto)
        self.state = state
        self.machine = WsTaskMachine(state.config.max_text_chars)
        self.task: _Task | None = None

    # ---- socket side ----
    def _message(self, data: str | bytes) -> None:
        assert isinstance(data, str)  # the public session refuses binary frames (close 1003)
        self._do(self.machine.handle_client_message(data))

    def _on_end(self) -> None:
        self._do(self.machine.connection_lost())
        if self.task is not None:  # cancel even if the machine already forgot it
            self.task.cancel()
            self.task = None

    # ---- actions ----
    def _do(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendEvent):
                self.proto.write(self.session.send_text(action.to_text()))
            elif isinstance(action, StartTask):
                self._start(action.task_id, action.params)
            elif self.task is None or self.task.task_id != action.task_id:
                continue
            elif isinstance(action, PushText):
                self.task.push(action.text)
            elif isinstance(action, FinishText):
                self.task.finish_text()
            elif isinstance(action, CancelTask):
                self.task.cancel("failed" if action.failed else "cancelled")
                self.task = None

    def _start(self, task_id: str, params: SpeechParams) -> None:
        task = _Task(task_id)
        self.task = task
        task.runner = asyncio.get_running_loop().create_task(self._run(task, params))
        self.state.tasks.add(task.runner)
        task.runner.add_done_callback(self.state.tasks.discard)
        # Counted when the runner ends, however: a runner cancelled before its first step runs no finally.
        task.runner.add_done_callback(lambda _: self.state.metrics.ws_task_done(task.outcome))

    async def _send(self, actions: list[Action]) -> None:
        self._do(actions)
        await self.proto.flow.drain()

    async def _run(self, task: _Task, params: SpeechParams) -> None:
        tid = task.task_id
        try:
            voice = await self.state.voice(params.reference_audio_id)
            synth = Synthesis(self.state, new_request_id(), params, voice, asyncio.get_running_loop().time())
            task.attach(synth)
            await self._send(self.machine.started(tid))
            async for chunk in synth.chunks():
                if chunk.data:
                    b64 = base64.b64encode(chunk.data).decode("ascii")
                    await self._send(self.machine.audio(tid, b64, chunk.metrics))
            task.outcome = "finished"
            await self._send(self.machine.finished(tid))
        except ApiError as err:  # engine failures arrive as theirs too
            self._fail(task, err)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("WebSocket task %s failed", tid)
            self._fail(task, InternalError())
        finally:
            if task.synth is not None:
                task.synth.close()
            if self.task is task:
                self.task = None
            log.info("WebSocket task %s %s", tid, task.outcome, extra={"task_id": tid, "outcome": task.outcome})

    def _fail(self, task: _Task, err: ApiError) -> None:
        task.outcome = "failed"
        self.state.metrics.error(err.code)
        self._do(self.machine.failed(task.task_id, err.code, err.message))

    def close_normally(self) -> None:
        self.proto.write(self.session.send_close(CLOSE_NORMAL, ""))
