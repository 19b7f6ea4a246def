"""Jobs on top of scheduler requests: sentence pieces, their audio order, the backlog, admission. Torch-free.

A prepared job's text is a list of token-id pieces (one per sentence); each piece is one scheduler
request, run in order. The next piece is added as soon as the previous one's LLM is done, so its LLM
overlaps the previous piece's last flow/vocoder chunks; its audio is held back until the previous piece
has emitted everything, so the listener hears the job in order. A duplex job (text=None) is bistream
requests fed by text commands: one per segment of its text that fits a KV slot (scheduler/duplex_text.py),
run in order the same way. Jobs over `max_jobs` wait in a FIFO backlog, with any duplex text that arrives
for them meanwhile. Only the engine thread calls this.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from protocol.errors import ErrorCode
from scheduler.commands import FinishText, PushTokens, Submit, TextCommand
from scheduler.duplex_text import DuplexText, segment_budget
from scheduler.jobs import (
    AudioChunk,
    ChunkMetrics,
    EngineEvent,
    EventSink,
    Failed,
    Finished,
    PreparedJob,
    SpeechJob,
)
from scheduler.plan import ChunkOutput
from scheduler.request import Playback, Request, RequestStatus
from scheduler.scheduler import RequestRejected, Scheduler

log = logging.getLogger(__name__)

SEED_STRIDE = 1000  # piece i of a seeded job samples with seed + 1000 * i (pieces differ, runs repeat)


@dataclass
class Job:
    prepared: PreparedJob
    sink: EventSink
    pieces: list[tuple[int, ...]]  # token ids of text pieces not yet submitted
    piece_index: int = 0
    active: list[str] = field(default_factory=list)  # request ids in order; [0] may emit audio
    held: dict[str, list[AudioChunk]] = field(default_factory=dict)  # audio of later pieces
    samples: int = 0
    tokens: int = 0
    done: bool = False
    playback: Playback = field(default_factory=Playback)  # shared by the job's pieces: one listener
    duplex: DuplexText | None = None  # a duplex job's text, by segment
    segment: int = 0  # duplex: the segment of the newest request

    @property
    def job(self) -> SpeechJob:
        return self.prepared.job

    @property
    def job_id(self) -> str:
        return self.prepared.job.request_id


class JobBook:
    """The engine thread's jobs. `release(rid)` drops a request's runner state (the loop defers it while
    the request's chunk is out)."""

    def __init__(
        self,
        scheduler: Scheduler,
        release: Callable[[str], None],
        clock: Callable[[], float],
        max_jobs: int = 0,
    ) -> None:
        self.scheduler = scheduler
        self._release = release
        self._clock = clock
        self.max_jobs = max_jobs  # 0 = no limit beyond the scheduler's queue
        self._jobs: dict[str, Job] = {}
        self._owner: dict[str, str] = {}  # scheduler request id -> job id
        self._backlog: list[Submit] = []  # jobs over max_jobs, FIFO
        self._backlog_text: dict[str, list[TextCommand]] = {}  # duplex text sent while backlogged

    # ------------------------------------------------------------------ sizes
    @property
    def num_jobs(self) -> int:
        return len(self._jobs)

    @property
    def num_backlogged(self) -> int:
        return len(self._backlog)

    @property
    def num_requests(self) -> int:
        """Scheduler requests of live jobs (waiting, decoding or draining)."""
        return len(self._owner)

    def _has_room(self) -> bool:
        return not self.max_jobs or len(self._jobs) < self.max_jobs

    # ------------------------------------------------------------------ commands
    def take(self, submit: Submit) -> None:
        if self._has_room():
            self._intake(submit)
        else:
            self._backlog.append(submit)

    def text(self, cmd: TextCommand) -> None:
        if any(b.job.request_id == cmd.job_id for b in self._backlog):
            self._backlog_text.setdefault(cmd.job_id, []).append(cmd)  # replayed at intake
            return
        self._feed_text(cmd)

    def cancel(self, job_id: str) -> Job | None:
        """Drop the job (backlogged or running) without an event; returns it if it was running."""
        self._backlog = [b for b in self._backlog if b.job.request_id != job_id]
        self._backlog_text.pop(job_id, None)
        state = self._jobs.pop(job_id, None)
        if state is not None:
            state.done = True
            self._end_requests(state)
        return state

    def cancel_all(self, code: ErrorCode, message: str) -> None:
        """Every job, running or backlogged, ends with Failed(code)."""
        for job_id in list(self._jobs):
            state = self.cancel(job_id)
            if state is not None:
                self._deliver(state, Failed(job_id, code, message))
        backlog, self._backlog = self._backlog, []
        self._backlog_text.clear()
        for submit in backlog:
            self.refuse(submit, code, message)

    def refuse(self, submit: Submit, code: ErrorCode, message: str) -> None:
        try:
            submit.sink(Failed(submit.job.request_id, code, message))
        except Exception:
            log.exception("sink raised on refusal of job %s", submit.job.request_id)

    def admit_backlog(self) -> None:
        while self._backlog and self._has_room():
            self._intake(self._backlog.pop(0))

    # ------------------------------------------------------------------ intake
    def _intake(self, submit: Submit) -> None:
        prepared, sink = submit.job, submit.sink
        job_id = prepared.request_id
        early_text = self._backlog_text.pop(job_id, [])
        if job_id in self._jobs:
            sink(Failed(job_id, ErrorCode.INVALID_PARAMETER, "duplicate request id"))
            return
        if prepared.refusal is not None:
            sink(Failed(job_id, ErrorCode.INVALID_PARAMETER, prepared.refusal))
            return
        duplex = prepared.job.text is None
        state = Job(prepared, sink, pieces=list(prepared.pieces[1:]))
        if duplex:
            prefix = 2 + len(prepared.prompt_text_ids) + len(prepared.prompt_speech_ids)
            state.duplex = DuplexText(segment_budget(self.scheduler.config.slot_len, prefix))
        try:
            self._jobs[job_id] = state
            self._submit_piece(state, () if duplex else prepared.pieces[0], bistream=duplex)
        except RequestRejected as exc:
            self._jobs.pop(job_id, None)
            sink(Failed(job_id, exc.code, str(exc)))
            return
        except Exception as exc:
            log.exception("intake failed")
            self._jobs.pop(job_id, None)
            sink(Failed(job_id, ErrorCode.INTERNAL_ERROR, f"could not prepare the request: {exc}"))
            return
        for cmd in early_text:
            self._feed_text(cmd)

    def _submit_piece(self, state: Job, text_ids: Sequence[int], bistream: bool) -> None:
        job, prepared = state.job, state.prepared
        rid = f"{job.request_id}#{state.piece_index}"
        seed = None if job.seed is None else job.seed + SEED_STRIDE * state.piece_index
        self.scheduler.add_request(Request(
            request_id=rid,
            text_ids=list(text_ids),
            prompt_text_ids=prepared.prompt_text_ids,
            prompt_speech_ids=prepared.prompt_speech_ids,
            flow_prompt_len=len(job.voice.speech_tokens),
            stream=job.stream,
            bistream=bistream,
            fixed_tokens=job.fixed_tokens,
            seed=seed,
            voice=job.voice,  # the runner's per-request state is made from these at admission (StepPlan.admitted)
            speed=job.speed,
            arrival_s=self._clock(),
            playback=state.playback,
            follows=state.piece_index > 0,
        ))
        self._owner[rid] = job.request_id
        state.active.append(rid)
        state.piece_index += 1

    def _feed_text(self, cmd: TextCommand) -> None:
        state = self._jobs.get(cmd.job_id)
        if state is None or state.duplex is None or state.done:
            return
        text = state.duplex
        if text.finished:  # the caller's mistake, not the engine's
            log.warning("job %s: text after finish_text ignored", cmd.job_id)
            return
        if state.segment == len(text.segments) - 1 and self._taking_text(state) is None:
            text.start_segment()  # its request is done with text (its slot filled): later text needs another
        match cmd:
            case PushTokens(ids=ids) if ids:
                text.push(ids)
            case FinishText():
                text.finish()
        self._hand_on_text(state)

    def _taking_text(self, state: Job) -> Request | None:
        """The job's newest request, while it still takes text."""
        newest = f"{state.job_id}#{state.piece_index - 1}"
        req = self.scheduler.get(newest) if state.active and state.active[-1] == newest else None
        if req is None or req.text_finished or req.status >= RequestStatus.DRAINING:
            return None
        return req

    def _hand_on_text(self, state: Job) -> None:
        """Duplex: the newest request gets its segment's new text (and its end); with nothing running, the
        next segment starts, or the job ends once all its text was spoken."""
        assert state.duplex is not None
        req = self._taking_text(state)
        if req is not None:
            ids, close = state.duplex.take(state.segment)
            if ids:
                req.push_text(ids)
            if close:
                req.finish_text()
        elif not state.active and state.duplex.has(state.segment + 1):
            self._next_segment(state)
        elif not state.active and state.duplex.finished:
            self._finish(state, Finished(state.job_id, state.samples, state.tokens))

    def advance_pieces(self) -> None:
        """Add a job's next text piece (or duplex segment) once the current one's LLM is done; one ahead at
        most (the one speaking and the next), so a job of many short sentences does not run its LLM ever
        further ahead."""
        for state in list(self._jobs.values()):
            more = state.pieces or (state.duplex is not None and state.duplex.has(state.segment + 1))
            if not more or state.done or len(state.active) != 1:
                continue
            last = self.scheduler.get(state.active[-1])
            if last is not None and last.status < RequestStatus.DRAINING:
                continue  # its LLM still runs
            if state.pieces:
                self._next_piece(state)
            else:
                self._next_segment(state)

    def _next_piece(self, state: Job) -> None:
        try:
            self._submit_piece(state, state.pieces.pop(0), bistream=False)
        except RequestRejected as exc:
            self._finish(state, Failed(state.job_id, exc.code, str(exc)))

    def _next_segment(self, state: Job) -> None:
        state.segment += 1
        try:
            self._submit_piece(state, (), bistream=True)
        except RequestRejected as exc:
            self._finish(state, Failed(state.job_id, exc.code, str(exc)))
            return
        self._hand_on_text(state)

    # ------------------------------------------------------------------ results
    def starts_playback(self, rid: str) -> bool:
        """This request's next chunk is its listener's first audio (not a later sentence piece's)."""
        req = self.scheduler.get(rid)
        return req is not None and req.playback.start_s is None and not req.follows

    def on_chunk(self, out: ChunkOutput) -> None:
        job_id = self._owner.get(out.request_id)
        state = self._jobs.get(job_id) if job_id else None
        if state is None or state.done or out.pcm.size == 0:
            return
        metrics = ChunkMetrics(
            generate_time_s=out.generate_time_s,
            llm_tokens=out.tokens,
            flow_batch=out.flow_batch,
            vocoder_batch=out.vocoder_batch,
            detail=dict(out.detail) if state.job.debug else {},
        )
        chunk = AudioChunk(state.job_id, out.pcm, metrics)
        state.tokens += out.tokens
        if state.active and state.active[0] == out.request_id:
            self._emit(state, chunk)
        else:
            state.held.setdefault(out.request_id, []).append(chunk)

    def on_request_end(self, rid: str) -> None:
        self._release(rid)
        job_id = self._owner.pop(rid, None)
        state = self._jobs.get(job_id) if job_id else None
        req = self.scheduler.get(rid)
        if state is None or state.done or req is None or req.status is RequestStatus.FINISHED_CANCELLED:
            return
        if req.status is RequestStatus.FINISHED_FAILED:
            self._finish(state, Failed(state.job_id, ErrorCode.INTERNAL_ERROR, req.fail_reason or "failed"))
            return
        if rid in state.active:
            state.active.remove(rid)
        if state.active:  # the next piece may now speak: flush what it produced meanwhile
            for chunk in state.held.pop(state.active[0], []):
                self._emit(state, chunk)
        if not state.active and state.pieces:  # a piece that ended without speech: go on with the next
            self._next_piece(state)
        elif not state.active and state.duplex is not None:
            self._hand_on_text(state)  # the next segment, the end, or (text still to come) a wait for it
        elif not state.active:
            self._finish(state, Finished(state.job_id, state.samples, state.tokens))

    def _emit(self, state: Job, chunk: AudioChunk) -> None:
        state.samples += int(chunk.pcm.shape[0])
        self._deliver(state, chunk)

    def _deliver(self, state: Job, event: EngineEvent) -> None:
        try:
            state.sink(event)
        except Exception:
            log.exception("sink raised; cancelling job %s", state.job_id)
            self.cancel(state.job_id)

    def _finish(self, state: Job, event: EngineEvent) -> None:
        self._jobs.pop(state.job_id, None)
        state.done = True
        self._end_requests(state)
        self._deliver(state, event)

    def _end_requests(self, state: Job) -> None:
        for rid in state.active:
            self.scheduler.cancel(rid)
            self._release(rid)
            self._owner.pop(rid, None)
