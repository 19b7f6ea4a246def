"""The real engine: builds the model, its runner, the scheduler and the text frontend, and runs the
engine loop (scheduler/engine_loop.py) on its own thread.

The asyncio side calls `prepare()`/`encode_text()` on worker threads (text never reaches the engine
thread), then `submit()`, which returns a `JobHandle`; the engine thread calls the job's sink with
`AudioChunk`s and one final `Finished` or `Failed`. Everything here beyond construction is a thin
delegation: the loop, the jobs and every policy are torch-free and tested without the model.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from frontend.prepare import TextPreparer
from frontend.text_normalize import TextFrontend
from frontend.text_process import TextProcess
from kernels.config import ModelConfig
from kernels.networks.attention import use_flash
from kernels.networks.packed_linear import packed_count
from kernels.runtime.device import default_device, intra_op_threads
from kernels.runtime.flow_cache import DEFAULT_BUDGET_BYTES, flow_budget_config
from kernels.runtime.heap_trim import HeapTrimmer, TrimPolicy
from kernels.runtime.host_memory import host_ram_bytes, tune_allocator, usable_cores
from kernels.runtime.runner import ModelRunner
from kernels.runtime.voice_prefix import DEFAULT_BUDGET_BYTES as VOICE_PREFIX_BYTES
from kernels.weights.model import CosyVoice2Model, load_model
from scheduler.config import SchedulerConfig
from scheduler.engine_loop import EngineLoop, JobHandle
from scheduler.jobs import EngineStats, EventSink, PreparedJob, SpeechJob, VoicePrompt
from scheduler.scheduler import Scheduler


@dataclass(frozen=True)
class EngineConfig:
    # Slots, queue bound, batch limits and the chunk policy; the model's token ids and hop constants are
    # filled in from the model directory at start (`scheduler_config`).
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
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
    # A voice's streaming-flow prompt frames, computed once and copied into its later streams
    # (kernels/runtime/voice_prefix.py): an LRU of this many bytes (0 = off).
    voice_prefix_bytes: int = VOICE_PREFIX_BYTES
    max_jobs: int = 0  # jobs in flight at once (0 = no limit beyond the scheduler); 1 = strictly sequential
    # CPU only: the flow/vocoder requests of a step split into this many shards, each on its own
    # single-threaded worker (kernels/runtime/shards.py); 0 = one per usable core; 1 = off.
    stage_workers: int = 0
    # Weights' dtypes: "auto" = bf16 LLM on CUDA, fp32 on CPU; the flow defaults to fp32 (parity). "bf16"
    # flow runs the estimator/encoder in bf16 with the ODE state in fp32: 2.1x faster for the full-size
    # flow on an AVX512-BF16 CPU, mel within ~0.6 % of fp32 on random weights
    # (mean relative difference on the tiny model, tests/test_kernels_flow_dtype.py). HiFT is always fp32.
    llm_dtype: str = "auto"
    flow_dtype: str = "fp32"
    # Euler steps of the flow's ODE (0 = upstream's 10). Opt-in speed for a different mel: the flow's
    # time is proportional to it (bench/results/2026-12-07-cpu2-full-flow-steps.md).
    flow_steps: int = 0
    # CPU: int8 copies of the LLM's decoder-layer weights for steps of <= 8 rows, <= 4 beside packed bf16 ones
    # (opt-in, numerics move; kernels/networks/int8_linear.py).
    llm_int8: bool = False
    # CPU: the flow's linears, and the full-size LLM's, on weights packed once for oneDNN
    # (kernels/networks/packed_linear.py): the same numbers, 1.05-1.45x faster bf16 and ~2x faster fp32
    # matmuls on an AMD Zen 4; the packing replaces the float weight.
    packed_linears: bool = True
    # Run each step's flow/vocoder chunks on a stage thread (its own CUDA stream on a GPU) while the
    # engine thread goes on decoding: the LLM no longer waits for a chunk batch, so new requests reach
    # their first chunk sooner under load. False = one thread does LLM, then chunks, every step.
    overlap_stages: bool = True
    # CPU: while a chunk batch holding a listener's first audio runs and keeps every stage worker busy, the
    # streams whose first audio it holds do not decode either (others already hold back to one chunk ahead),
    # so the LLM does not slow that batch down (scheduler/engine_loop.py).
    first_chunk_alone: bool = True
    # CPU, overlapped stages: a lone request's flow call beside its decoding LLM runs on one 1-thread stage
    # worker instead of the stage thread's intra-op threads (ModelRunner.lone_flow_beside_llm says why).
    lone_flow_worker: bool = True
    # CPU, overlapped stages: an LLM step while a chunk batch leaves cores free uses only those as intra-op
    # threads (ModelRunner.llm_yields_cores says why).
    llm_yields_cores: bool = True
    # CPU: only the engine thread runs torch ops on several threads; the thread that builds the engine (while
    # it lives), the stage thread, its workers and any thread started later use one. libgomp, torch's OpenMP,
    # keeps a pool of helper threads per thread that ever ran a parallel region, and once those helpers
    # outnumber the cores every pool stops spinning between regions and sleeps instead: the flow's many
    # small ops then ran 2x slower on 2 threads (an advance call of 50 frames: 350 ms with one pool, 660-740
    # ms with two).
    one_thread_team: bool = True
    # The engine thread's intra-op threads; 0 = the building thread's count (an engine built while another
    # one_thread_team engine lives would read that one's 1, so pass the count there).
    intra_op_threads: int = 0
    # CPU, overlapped stages: a lone stream's first audio goes first, alone (EngineLoop `lone_first_alone`): its
    # decode waits once it holds the first chunk's tokens, and that chunk runs on the engine thread with
    # every core instead of a 1-thread stage worker beside the decode; so does a lone final chunk.
    lone_first_alone: bool = True
    # CPU: at most one malloc_trim per this many seconds under load, one when idle (0: off);
    # kernels/runtime/heap_trim.py says why and what it costs.
    heap_trim_s: float = 60.0


def scheduler_config(model: ModelConfig, limits: SchedulerConfig) -> SchedulerConfig:
    """`limits` with the model's token ids and hop constants (from the model directory)."""
    llm, flow = model.llm, model.flow
    chunk = replace(limits.chunk, first_hop=model.chunk_size, grid=model.chunk_size,
                    lookahead=flow.pre_lookahead_len, samples_per_token=model.samples_per_token,
                    sample_rate=model.sample_rate)
    return replace(limits, eos_token=llm.eos_token, fill_token=llm.fill_token, stop_token_ids=llm.stop_token_ids,
                   mix_ratio=llm.mix_ratio, win_size=llm.win_size, token_mel_ratio=flow.token_mel_ratio,
                   chunk=chunk)


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


def _configure_device(device: str) -> None:
    if device.startswith("cuda"):
        # flow/HiFT stay fp32 for fidelity; TF32 tensor cores make that cheap on Ampere and later
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        tune_allocator()  # keep freed activations in the process (kernels/runtime/host_memory.py)


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n else "off"


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
        device = default_device(device)
        _configure_device(device)
        self.threads = config.intra_op_threads or torch.get_num_threads()  # the engine thread's
        self._one_team = config.one_thread_team and not device.startswith("cuda")
        if self._one_team:
            torch.set_num_threads(1)  # this thread, and threads started from now on (see EngineConfig)
        if model is None:
            model = load_model(model_dir, device=device, llm_dtype=weight_dtype(config.llm_dtype, device.startswith("cuda")),
                               flow_dtype=weight_dtype(config.flow_dtype, False), flow_steps=config.flow_steps or None,
                               llm_int8=config.llm_int8, packed_linears=config.packed_linears)
        self.model = model
        self.sample_rate = model.config.sample_rate
        # Used by `prepare`/`encode_text` on the callers' threads only: the engine thread gets token ids.
        self.text = TextPreparer(
            TextFrontend(Path(model_dir), use_wetext=config.use_wetext),
            TextProcess(Path(model_dir), use_wetext=config.use_wetext) if config.text_process else None)
        flow_cache = flow_budget_config(model.flow, config.incremental_flow, config.flow_cache_bytes,
                                        flow_pool_bytes(config.flow_cache_pool_bytes, device))
        self.scheduler = Scheduler(replace(scheduler_config(model.config, config.scheduler), flow_cache=flow_cache))
        self.runner = self._build_runner(model)
        cpu_overlap = config.overlap_stages and not device.startswith("cuda")  # the CPU stage rules' condition
        self.runner.lone_flow_beside_llm = config.lone_flow_worker and cpu_overlap
        self.runner.llm_yields_cores = config.llm_yields_cores and cpu_overlap
        stage_threads = 1 if self._one_team else self.threads
        stage = ThreadPoolExecutor(1, thread_name_prefix="cosyserve-stage",
                                   initializer=lambda: torch.set_num_threads(stage_threads)
                                   ) if config.overlap_stages else None
        if stage is not None and device.startswith("cuda"):
            self.runner.stage_stream = torch.cuda.Stream(torch.device(device))
        self.loop = EngineLoop(self.scheduler, self.runner, stage=stage, max_jobs=config.max_jobs,
                               idle_wait_s=config.idle_wait_s, first_alone_batch=self._first_alone_batch(device),
                               lone_first_alone=config.lone_first_alone and cpu_overlap)
        self.loop.start(on_thread_start=self._start_engine_thread)
        self.heap_trimmer = self._start_heap_trimmer(device)

    def _start_engine_thread(self) -> None:
        torch.set_grad_enabled(False)
        torch.set_num_threads(self.threads)

    def _first_alone_batch(self, device: str) -> int:
        """EngineLoop's `first_alone_batch`: on a CPU a batch as large as the stage workers (0: off; on a GPU
        the LLM and the flow run on streams of their own)."""
        if device.startswith("cuda") or not self.config.first_chunk_alone:
            return 0
        return self.runner.shards.workers

    def _start_heap_trimmer(self, device: str) -> HeapTrimmer | None:
        if device.startswith("cuda") or self.config.heap_trim_s <= 0:
            return None
        trimmer = HeapTrimmer(TrimPolicy(interval_s=self.config.heap_trim_s),
                              idle=lambda: not self.loop.busy(), clock=time.monotonic)
        return trimmer if trimmer.start() else None

    def _build_runner(self, model: CosyVoice2Model) -> ModelRunner:
        cfg, limits = self.config, self.config.scheduler
        return ModelRunner(
            model, limits.num_slots, limits.slot_len, cuda_graphs=cfg.cuda_graphs,
            incremental_flow=cfg.incremental_flow, stage_workers=cfg.stage_workers or usable_cores(),
            voice_prefix_bytes=cfg.voice_prefix_bytes,
        )

    # ------------------------------------------------------------------ EngineProtocol (any thread)
    def prepare(self, job: SpeechJob) -> PreparedJob:
        """Normalise, split and tokenise the job's text (thread-safe; call it from a worker thread)."""
        return self.text.prepare(job)

    def encode_text(self, text: str) -> list[int]:
        """A duplex text piece's token ids (thread-safe)."""
        return self.text.encode(text)

    def submit(self, job: PreparedJob | SpeechJob, sink: EventSink) -> JobHandle:
        """A SpeechJob is prepared here, on the calling thread (tests, tools); servers pass PreparedJobs."""
        prepared = job if isinstance(job, PreparedJob) else self.prepare(job)
        return self.loop.submit(prepared, sink, self.encode_text)

    def warm_voice(self, voice: VoicePrompt) -> bool:
        """Compute a voice's streaming-flow prefix ahead of its first stream (any thread; uses the CPU/GPU
        beside the engine, on a CPU one core: see EngineConfig.one_thread_team). False when nothing is kept
        for it."""
        with intra_op_threads(1 if self._one_team else 0):
            return self.runner.warm_voice(voice)

    def can_admit(self) -> bool:
        return self.loop.can_admit()

    def stats(self) -> EngineStats:
        prefix = self.runner.voice_prefix
        if prefix is None:
            return self.loop.stats()
        return replace(self.loop.stats(), voice_prefix_hits=prefix.stats.hits,
                       voice_prefix_misses=prefix.stats.misses, voice_prefix_bytes=prefix.nbytes)

    def describe(self) -> str:
        """One line for the start-up log: device, dtypes, threads, batch limits, attention, flow cache."""
        model, runner, cfg = self.model, self.runner, self.config
        names = {dtype: name for name, dtype in DTYPES.items()}
        llm_dtype = next(model.llm.parameters()).dtype
        flow_dtype = next(model.flow.parameters()).dtype
        attention = "flash-attn" if use_flash(runner.device, model.llm.attn_backend, llm_dtype) else "torch SDPA"
        pool = self.scheduler.config.flow_cache.pool_bytes
        cache = "off" if not cfg.incremental_flow or not pool else _size(pool)
        cpu = runner.device.type == "cpu"
        int8 = " + int8 weights" if any(b.dtype == torch.int8 for b in model.llm.buffers()) else ""
        packed = packed_count(model.llm) + packed_count(model.flow)
        parts = [
            f"device {runner.device}", f"llm {names.get(llm_dtype, '?')}{int8}", f"flow {names.get(flow_dtype, '?')}",
            f"flow steps {model.config.flow.n_timesteps}",
            (f"threads {self.threads}{' (engine thread only)' if self._one_team else ''}" if cpu
             else f"cuda graphs {'on' if runner.graphs else 'off'}"),
            *([f"lone first audio {'alone' if self.loop.lone_first_alone else 'beside the LLM'}"] if cpu else []),
            *([f"stage workers {runner.shards.workers}"] if cpu else []),
            *([f"linears {f'{packed} packed (oneDNN)' if packed else 'unpacked'}"] if cpu else []),
            *([f"heap trim {f'every {cfg.heap_trim_s:g} s' if self.heap_trimmer else 'off'}"] if cpu else []),
            f"overlap {'on' if self.loop.overlap else 'off'}",
            f"max batch {self.scheduler.config.num_slots}",
            f"max chunks/step {self.scheduler.config.chunk.max_chunks_per_step}",
            f"attention {attention}", f"flow cache {cache}",
            f"voice prefix {_size(runner.voice_prefix.budget_bytes) if runner.voice_prefix else 'off'}",
        ]
        return ", ".join(parts)

    def shutdown(self, deadline_s: float = 5.0) -> None:
        """Let running jobs finish until the deadline, then cancel what is left and stop."""
        if self.heap_trimmer is not None:
            self.heap_trimmer.stop()
        stopped = self.loop.stop(deadline_s)
        self.text.close()
        if stopped:
            if self.loop.stage is not None:
                self.loop.stage.shutdown(wait=True)
            self.runner.shards.close()
        if self._one_team:
            torch.set_num_threads(self.threads)  # the building thread's count back (in-process callers)
