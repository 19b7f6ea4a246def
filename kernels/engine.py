"""The engine: one thread that owns the model and runs schedule -> execute -> update forever.

With `overlap_stages` (the default) a step's flow/vocoder chunks go to a stage thread (on a GPU, its
own CUDA stream) and the engine thread goes on with LLM-only steps until that batch is back; then
the next batch is planned. Runner state of a request whose chunk is out is released only once it is
back. While a batch is out, streams already two chunks ahead of their audio do not decode (the
scheduler's pacing; one chunk ahead while the batch holds a first packet, except the batch's own
requests), so the cores go to the chunks and to requests still working to a next chunk.

The asyncio side talks to it only through `submit()` (returns a `JobHandle`) and the sink
callable it passes in, which this thread calls with `AudioChunk`s and one final `Finished` or
`Failed`. Commands from other threads (submit, push_text, finish_text, cancel) go through a
queue, so the scheduler and runner are touched by this thread alone.

A job's text is normalised and split into sentences (upstream `text_normalize`); each piece is
one scheduler request, run in order. The next piece is admitted as soon as the previous one's
LLM is done, so its LLM overlaps the previous piece's last flow/vocoder chunks; its audio is
held back until the previous piece has emitted everything, so the stream stays in order.
A duplex job (text=None) is a single bistream request fed by push_text.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from frontend.prepare import TextPreparer
from frontend.text_normalize import TextFrontend
from frontend.text_process import TextProcess
from kernels.attention import use_flash
from kernels.flow_cache import DEFAULT_BUDGET_BYTES, flow_budget_config
from kernels.host_memory import host_ram_bytes, tune_allocator, usable_cores
from kernels.model import CosyVoice2Model, load_model
from kernels.runner import ChunkOutput, ModelRunner
from scheduler.chunk_policy import ChunkPolicyConfig
from scheduler.commands import Cancel, Command, FinishText, PushTokens, Stop, Submit, TextCommand
from scheduler.config import SchedulerConfig
from scheduler.jobs import (
    AudioChunk,
    ChunkMetrics,
    EngineStats,
    EventSink,
    Failed,
    Finished,
    PreparedJob,
    SpeechJob,
)
from scheduler.plan import StepPlan, StepResult
from scheduler.request import Playback, Request, RequestStatus
from scheduler.scheduler import RequestRejected, Scheduler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    num_slots: int = 32  # KV slots = max requests decoding at once
    slot_len: int = 2048  # positions per slot (prompt + speech tokens); ~75 s of speech
    max_waiting: int = 256  # queued jobs beyond this are refused (server: 503 + Retry-After)
    max_chunks_per_step: int = 16  # flow/vocoder chunks batched in one step
    # Requests arriving together are prefilled together, so their chunk boundaries line up and
    # their flow/vocoder calls batch (4 split a burst of 8 into two flow batches of 4).
    max_prefills_per_step: int = 16
    cuda_graphs: bool = True  # decode graphs on CUDA (ignored on CPU)
    use_wetext: bool = True  # wetext text normalisation when installed
    # Normalise text in a child process (the server's setting): in a thread its pure-Python work holds
    # the GIL and slows the decode thread for as long (bench.stall). False: on the caller's thread.
    text_process: bool = False
    idle_wait_s: float = 0.05  # how long the thread sleeps on its inbox when there is no work
    # Non-final streaming chunks compute only their new mel frames (flow cache) instead of re-running
    # the flow on the whole prefix, within a per-request memory budget (else: recompute).
    incremental_flow: bool = True
    # Per request, and for all requests together (-1 = auto: half the host's RAM on CPU, a third
    # of the free device memory on CUDA, measured at start). The full-size model needs ~4.6 MB per mel
    # frame in fp32 (an 11 s sentence: ~3.5 GB) and computes its flow 1.9x faster than by recomputing.
    flow_cache_bytes: int = DEFAULT_BUDGET_BYTES
    flow_cache_pool_bytes: int = -1
    # A streaming request's last chunk keeps the chunk masks of its earlier chunks (so it is
    # incremental too). False = upstream: the last chunk re-runs the flow with full attention.
    final_chunk_streaming: bool = True
    max_jobs: int = 0  # jobs in flight at once (0 = no limit beyond the scheduler); 1 = strictly sequential
    # CPU only: the flow/vocoder requests of a step split into this many shards, each on its own
    # single-threaded worker (kernels/shards.py); 0 = one per usable core; 1 = off.
    stage_workers: int = 0
    # Weights' dtypes: "auto" = bf16 LLM on CUDA, fp32 on CPU; the flow defaults to fp32 (parity). "bf16"
    # flow runs the estimator/encoder in bf16 with the ODE state in fp32: 2.1x faster for the full-size
    # flow on an AVX512-BF16 CPU, mel within ~3 % of fp32 on random weights. HiFT is always fp32.
    llm_dtype: str = "auto"
    flow_dtype: str = "fp32"
    # Run each step's flow/vocoder chunks on a stage thread (its own CUDA stream on a GPU) while the
    # engine thread goes on decoding: the LLM no longer waits for a chunk batch, so new requests reach
    # their first chunk sooner under load. False = one thread does LLM, then chunks, every step.
    overlap_stages: bool = True


def flow_pool_bytes(setting: int, device: str) -> int:
    """The shared flow-cache pool: `setting` when >= 0, else half the RAM (CPU) or a third of the
    device's free memory (CUDA, after the weights are loaded)."""
    if setting >= 0:
        return setting
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free // 3
    return host_ram_bytes() // 2


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def weight_dtype(name: str, cuda: bool) -> torch.dtype:
    """`auto` -> bf16 on CUDA, fp32 elsewhere; else one of DTYPES."""
    if name == "auto":
        return torch.bfloat16 if cuda else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: expected auto or one of {sorted(DTYPES)}")
    return DTYPES[name]


@dataclass
class _InFlight:
    """The chunk batch running on the stage thread (at most one at a time)."""

    plan: StepPlan  # chunks only
    future: Future
    request_ids: frozenset[str]
    has_first: bool  # holds some listener's first audio (not a later sentence piece's)


@dataclass
class _Job:
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

    @property
    def job(self) -> SpeechJob:
        return self.prepared.job


class JobHandle:
    """JobControl for one submitted job; safe to call from any thread."""

    def __init__(self, engine: Engine, request_id: str) -> None:
        self._engine = engine
        self.request_id = request_id

    def push_tokens(self, ids: Sequence[int]) -> None:
        self._engine._inbox.put(PushTokens(self.request_id, tuple(ids)))

    def push_text(self, text: str) -> None:
        """Tokenises on the calling thread (servers use `encode_text` on a worker, then push_tokens)."""
        self.push_tokens(self._engine.encode_text(text))

    def finish_text(self) -> None:
        self._engine._inbox.put(FinishText(self.request_id))

    def cancel(self) -> None:
        self._engine._inbox.put(Cancel(self.request_id))


class Engine:
    """EngineProtocol implementation over the real model."""

    def __init__(
        self,
        model_dir: str | Path,
        device: str | None = None,
        config: EngineConfig = EngineConfig(),
        model: CosyVoice2Model | None = None,
    ) -> None:
        self.config = config
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        cuda = device.startswith("cuda")
        if cuda:
            # flow/HiFT stay fp32 for fidelity; TF32 tensor cores make that cheap on Ampere and later
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        else:
            tune_allocator()  # keep freed activations in the process (kernels/host_memory.py)
        if model is None:
            model = load_model(model_dir, device=device, llm_dtype=weight_dtype(config.llm_dtype, cuda),
                               flow_dtype=weight_dtype(config.flow_dtype, False))
        self.model = model
        self.sample_rate = model.config.sample_rate
        # Used by `prepare`/`encode_text` on the callers' threads only: the engine thread gets token ids.
        self.text = TextPreparer(
            TextFrontend(Path(model_dir), use_wetext=config.use_wetext),
            TextProcess(Path(model_dir), use_wetext=config.use_wetext) if config.text_process else None)
        chunk = ChunkPolicyConfig(
            max_chunks_per_step=config.max_chunks_per_step, final_streaming=config.final_chunk_streaming
        )
        self.scheduler = Scheduler(
            SchedulerConfig.from_model(
                model.config,
                num_slots=config.num_slots,
                slot_len=config.slot_len,
                max_running=config.num_slots,
                max_waiting=config.max_waiting,
                max_prefills_per_step=config.max_prefills_per_step,
                chunk=chunk,
                flow_cache=flow_budget_config(model.flow, config.incremental_flow, config.flow_cache_bytes,
                                              flow_pool_bytes(config.flow_cache_pool_bytes, device)),
            )
        )
        self.runner = ModelRunner(
            model, config.num_slots, config.slot_len, cuda_graphs=config.cuda_graphs,
            incremental_flow=config.incremental_flow,
            stage_workers=config.stage_workers or usable_cores(),
        )
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._jobs: dict[str, _Job] = {}
        self._owner: dict[str, str] = {}  # scheduler request id -> job id
        # submitted (callers, under a lock) - taken (the engine thread): jobs still in the inbox
        self._submit_lock = threading.Lock()
        self._submitted = 0
        self._taken = 0
        self._backlog: list[Submit] = []  # jobs over max_jobs, FIFO
        self._backlog_text: dict[str, list[TextCommand]] = {}  # duplex text sent while backlogged
        self._stop = threading.Event()
        # Published by the engine thread every loop pass; what other threads read (stats, can_admit).
        # Live counts, not the scheduler's last-step ones: those go stale once the engine idles.
        self._snapshot = EngineStats(0, 0, 0, 0, 0, 0, 0, 0)
        self._stage: ThreadPoolExecutor | None = None
        if config.overlap_stages:
            self._stage = ThreadPoolExecutor(1, thread_name_prefix="cosyserve-stage")
            if cuda:
                self.runner.stage_stream = torch.cuda.Stream(torch.device(device))
        self._in_flight: _InFlight | None = None
        self._deferred: set[str] = set()  # runner state to drop once the in-flight batch is back
        self._thread = threading.Thread(target=self._loop, name="cosyserve-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API (any thread)

    def prepare(self, job: SpeechJob) -> PreparedJob:
        """Normalise, split and tokenise the job's text (thread-safe; call it from a worker thread)."""
        return self.text.prepare(job)

    def encode_text(self, text: str) -> list[int]:
        """A duplex text piece's token ids (thread-safe)."""
        return self.text.encode(text)

    def submit(self, job: PreparedJob | SpeechJob, sink: EventSink) -> JobHandle:
        """A SpeechJob is prepared here, on the calling thread (tests, tools); servers pass PreparedJobs."""
        prepared = job if isinstance(job, PreparedJob) else self.prepare(job)
        with self._submit_lock:
            self._submitted += 1
            self._inbox.put(Submit(prepared, sink))
        return JobHandle(self, prepared.request_id)

    def _pending_submits(self) -> int:
        return max(0, self._submitted - self._taken)

    def can_admit(self) -> bool:
        return self._snapshot.waiting + self._pending_submits() < self.config.max_waiting

    def stats(self) -> EngineStats:
        """The engine thread's latest snapshot (other threads never read the scheduler or runner)."""
        return replace(self._snapshot, waiting=self._snapshot.waiting + self._pending_submits())

    def describe(self) -> str:
        """One line for the start-up log: device, dtypes, threads, batch limits, attention, flow cache."""
        model, runner, cfg = self.model, self.runner, self.config
        names = {dtype: name for name, dtype in DTYPES.items()}
        llm_dtype = next(model.llm.parameters()).dtype
        flow_dtype = next(model.flow.parameters()).dtype
        attention = "flash-attn" if use_flash(runner.device, model.llm.attn_backend, llm_dtype) else "torch SDPA"
        pool = self.scheduler.config.flow_cache.pool_bytes
        cache = "off" if not cfg.incremental_flow or not pool else f"{pool / 2**30:.1f} GiB"
        cpu = runner.device.type == "cpu"
        parts = [
            f"device {runner.device}", f"llm {names.get(llm_dtype, '?')}", f"flow {names.get(flow_dtype, '?')}",
            f"threads {torch.get_num_threads()}" if cpu else f"cuda graphs {'on' if runner.graphs else 'off'}",
            *([f"stage workers {runner.shards.workers}"] if cpu else []),
            f"overlap {'on' if self._stage is not None else 'off'}",
            f"max batch {cfg.num_slots}", f"max chunks/step {cfg.max_chunks_per_step}",
            f"attention {attention}", f"flow cache {cache}",
        ]
        return ", ".join(parts)

    def shutdown(self, deadline_s: float = 5.0) -> None:
        """Let running jobs finish until the deadline, then cancel what is left and stop."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end and (self._jobs or self._pending_submits()):
            time.sleep(0.02)
        self._inbox.put(Stop())
        self._thread.join(timeout=max(1.0, deadline_s))
        self.text.close()
        if not self._thread.is_alive():
            if self._stage is not None:
                self._stage.shutdown(wait=True)
            self.runner.shards.close()

    # ------------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            self._publish_stats()
            self._admit_backlog()
            self._collect()
            block = not self.scheduler.has_work() and self._in_flight is None
            if not self._drain_inbox(block):
                break
            self._admit_backlog()
            if not self.scheduler.has_work():
                self._collect(self.config.idle_wait_s)  # e.g. the chunks of a request cancelled meanwhile
                continue
            flight = self._in_flight
            # a first packet in flight: other streams hold back to one chunk ahead, so it gets the cores sooner
            first_out = flight is not None and flight.has_first
            plan = self.scheduler.schedule(with_chunks=flight is None, chunks_ahead=1 if first_out else 2,
                                           in_flight=flight.request_ids if flight is not None else ())
            for rid in plan.released:
                self._release(rid)
            if plan.is_empty:
                if flight is not None:
                    self._collect(self.config.idle_wait_s)  # nothing to decode: wait for the chunks
                else:
                    self._drain_inbox_wait(self.config.idle_wait_s)  # e.g. bistream waiting for text
                continue
            if self._stage is None:
                self._step_serial(plan)
            else:
                self._step_overlapped(plan)
            self._advance_pieces()
        self._collect(None)
        self._cancel_all()

    def _step_serial(self, plan: StepPlan) -> None:
        """LLM then chunks on this thread, one update."""
        try:
            result, outputs = self.runner.execute(plan)
        except Exception as exc:
            log.exception("engine step failed")
            self._fail_plan(plan, f"internal error: {exc}")
            return
        self._apply_result(plan, result, outputs)

    def _step_overlapped(self, plan: StepPlan) -> None:
        """Hand the chunks to the stage thread first, then run the LLM part here meanwhile."""
        if plan.chunks:
            chunk_plan = StepPlan(plan.step, chunks=plan.chunks)
            future = self._stage.submit(self.runner.execute_chunks, plan.chunks)
            self._in_flight = _InFlight(chunk_plan, future, frozenset(c.request_id for c in plan.chunks),
                                        any(self._starts_playback(c.request_id) for c in plan.chunks))
        llm_plan = replace(plan, chunks=())
        if llm_plan.is_empty:
            return
        try:
            result = self.runner.execute_llm(llm_plan)
        except Exception as exc:
            log.exception("engine LLM step failed")
            self._fail_plan(llm_plan, f"internal error: {exc}")
            return
        self._apply_result(llm_plan, result, [])

    def _starts_playback(self, rid: str) -> bool:
        """This request's next chunk is its listener's first audio (not a later sentence piece's)."""
        req = self.scheduler.get(rid)
        return req is not None and req.playback.start_s is None

    def _collect(self, wait_s: float | None = 0.0) -> None:
        """Apply the stage thread's chunk batch if it is done, waiting up to wait_s for it (None: until done)."""
        flight = self._in_flight
        if flight is None or (wait_s == 0.0 and not flight.future.done()):
            return
        try:
            result, outputs = flight.future.result(wait_s)
        except FutureTimeout:
            return
        except Exception as exc:
            self._in_flight = None
            log.exception("engine chunk step failed")
            self._fail_plan(flight.plan, f"internal error: {exc}")
        else:
            self._in_flight = None
            self._apply_result(flight.plan, result, outputs)
        for rid in self._deferred:
            self.runner.release(rid)
        self._deferred.clear()

    def _apply_result(self, plan: StepPlan, result: StepResult, outputs: list[ChunkOutput]) -> None:
        ended = self.scheduler.update(plan, result)
        for out in outputs:
            self._on_chunk(out)
        for rid in ended:
            self._on_request_end(rid)

    def _release(self, rid: str) -> None:
        """Drop a request's runner state, or defer that while the stage thread is using it."""
        if self._in_flight is not None and rid in self._in_flight.request_ids:
            self._deferred.add(rid)
        else:
            self.runner.release(rid)

    def _publish_stats(self) -> None:
        waiting = self.scheduler.num_waiting
        running = max(0, len(self._owner) - waiting)  # admitted scheduler requests (decoding or draining)
        s = self.scheduler.stats()
        timings = self.runner.last
        self._snapshot = EngineStats(
            running=running,
            waiting=waiting + len(self._backlog),
            kv_used_tokens=self.scheduler.kv.used_tokens,
            kv_total_tokens=s.last_step.kv_total_tokens,
            last_decode_batch=s.last_step.decode_batch,
            last_flow_batch=timings.flow_batch,
            last_vocoder_batch=timings.vocoder_batch,
            steps=s.totals.steps,
            flow_cache_bytes=s.flow_cache_bytes,
            flow_cache_pool_bytes=s.flow_cache_pool_bytes,
        )

    def _drain_inbox(self, block: bool) -> bool:
        """Apply queued commands; returns False on stop."""
        try:
            cmd = self._inbox.get(timeout=self.config.idle_wait_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if not self._apply(cmd):
                return False
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _drain_inbox_wait(self, timeout_s: float) -> None:
        try:
            cmd = self._inbox.get(timeout=timeout_s)
        except queue.Empty:
            return
        if not self._apply(cmd):
            self._inbox.put(Stop())  # re-queue so the main loop sees it
            return
        self._drain_inbox(block=False)

    def _apply(self, cmd: Command) -> bool:
        """One command from another thread; False on stop."""
        match cmd:
            case Stop():
                return False
            case Submit():
                self._taken += 1
                if self.config.max_jobs and len(self._jobs) >= self.config.max_jobs:
                    self._backlog.append(cmd)
                else:
                    self._intake(cmd)
            case Cancel(job_id=job_id):
                self._backlog = [b for b in self._backlog if b.job.request_id != job_id]
                self._backlog_text.pop(job_id, None)
                self._cancel(job_id)
            case PushTokens(job_id=job_id) | FinishText(job_id=job_id):
                if any(b.job.request_id == job_id for b in self._backlog):
                    self._backlog_text.setdefault(job_id, []).append(cmd)  # replayed at intake
                else:
                    self._feed_text(cmd)
        return True

    # ------------------------------------------------------------------ intake

    def _intake(self, submit: Submit) -> None:
        prepared, sink = submit.job, submit.sink
        job = prepared.job
        if job.request_id in self._jobs:
            sink(Failed(job.request_id, "InvalidParameter", "duplicate request id"))
            return
        if prepared.refusal is not None:
            sink(Failed(job.request_id, "InvalidParameter", prepared.refusal))
            return
        try:
            duplex = job.text is None
            state = _Job(prepared, sink, pieces=list(prepared.pieces[1:]))
            self._jobs[job.request_id] = state
            self._submit_piece(state, text_ids=() if duplex else prepared.pieces[0], bistream=duplex)
            for cmd in self._backlog_text.pop(job.request_id, []) if duplex else ():
                self._feed_text(cmd)
        except RequestRejected as exc:
            self._jobs.pop(job.request_id, None)
            sink(Failed(job.request_id, exc.code, str(exc)))
        except Exception as exc:
            log.exception("intake failed")
            self._jobs.pop(job.request_id, None)
            sink(Failed(job.request_id, "InternalError", f"could not prepare the request: {exc}"))

    def _submit_piece(self, state: _Job, text_ids: Sequence[int], bistream: bool) -> None:
        job, prepared = state.job, state.prepared
        rid = f"{job.request_id}#{state.piece_index}"
        seed = None if job.seed is None else job.seed + 1000 * state.piece_index
        req = Request(
            request_id=rid,
            text_ids=list(text_ids),
            prompt_text_ids=prepared.prompt_text_ids,
            prompt_speech_ids=prepared.prompt_speech_ids,
            flow_prompt_len=len(job.voice.speech_tokens),
            stream=job.stream,
            bistream=bistream,
            fixed_tokens=job.fixed_tokens,
            seed=seed,
            arrival_s=time.monotonic(),
            playback=state.playback,
            voice=job.voice,
            speed=job.speed,
        )
        self.scheduler.add_request(req)
        self._owner[rid] = job.request_id
        state.active.append(rid)
        state.piece_index += 1

    def _feed_text(self, cmd: TextCommand) -> None:
        state = self._jobs.get(cmd.job_id)
        if state is None or not state.active:
            return
        req = self.scheduler.get(state.active[-1])
        if req is None or not req.bistream:
            return
        match cmd:
            case PushTokens(ids=ids) if ids:
                req.push_text(list(ids))
            case FinishText():
                req.finish_text()

    def _admit_backlog(self) -> None:
        while self._backlog and (not self.config.max_jobs or len(self._jobs) < self.config.max_jobs):
            self._intake(self._backlog.pop(0))

    def _advance_pieces(self) -> None:
        """Admit a job's next text piece once the current piece's LLM is done."""
        for state in list(self._jobs.values()):
            if not state.pieces or state.done or not state.active:
                continue
            last = self.scheduler.get(state.active[-1])
            if last is None or last.status >= RequestStatus.DRAINING:
                try:
                    self._submit_piece(state, state.pieces.pop(0), bistream=False)
                except RequestRejected as exc:
                    self._finish_job(state, Failed(state.job.request_id, exc.code, str(exc)))

    # ------------------------------------------------------------------ results

    def _on_chunk(self, out: ChunkOutput) -> None:
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
        chunk = AudioChunk(state.job.request_id, out.pcm, metrics)
        state.tokens += out.tokens
        if state.active and state.active[0] == out.request_id:
            self._emit(state, chunk)
        else:
            state.held.setdefault(out.request_id, []).append(chunk)

    def _emit(self, state: _Job, chunk: AudioChunk) -> None:
        state.samples += int(chunk.pcm.shape[0])
        self._deliver(state, chunk)

    def _deliver(self, state: _Job, event) -> None:
        try:
            state.sink(event)
        except Exception:
            log.exception("sink raised; cancelling job %s", state.job.request_id)
            self._cancel(state.job.request_id)

    def _on_request_end(self, rid: str) -> None:
        self._release(rid)
        job_id = self._owner.pop(rid, None)
        state = self._jobs.get(job_id) if job_id else None
        req = self.scheduler.get(rid)
        if state is None or state.done or req is None:
            return
        if req.status is RequestStatus.FINISHED_CANCELLED:
            return
        if req.status is RequestStatus.FINISHED_FAILED:
            self._finish_job(state, Failed(state.job.request_id, "InternalError", req.fail_reason or "failed"))
            return
        if rid in state.active:
            state.active.remove(rid)
        # the next piece may now speak: flush what it produced meanwhile
        if state.active:
            for chunk in state.held.pop(state.active[0], []):
                self._emit(state, chunk)
        if not state.active and not state.pieces:
            self._finish_job(state, Finished(state.job.request_id, state.samples, state.tokens))

    def _finish_job(self, state: _Job, event) -> None:
        state.done = True
        for rid in state.active:
            self.scheduler.cancel(rid)
            self._release(rid)
            self._owner.pop(rid, None)
        self._jobs.pop(state.job.request_id, None)
        self._deliver(state, event)

    def _fail_plan(self, plan, message: str) -> None:
        rids = {p.request_id for p in plan.prefills} | {d.request_id for d in plan.decodes}
        rids |= {c.request_id for c in plan.chunks}
        for rid in rids:
            self.scheduler.fail(rid, message)
            self._on_request_end(rid)  # the scheduler reports it again at the next update: a no-op then

    def _cancel(self, job_id: str) -> None:
        state = self._jobs.pop(job_id, None)
        if state is None:
            return
        state.done = True
        for rid in state.active:
            self.scheduler.cancel(rid)
            self._release(rid)
            self._owner.pop(rid, None)

    def _cancel_all(self) -> None:
        for job_id in list(self._jobs):
            state = self._jobs[job_id]
            self._cancel(job_id)
            self._deliver(state, Failed(job_id, "Cancelled", "server shutting down"))
