"""The engine's CPU settings chosen at start-up from the model's size and the cores: torch-free.

Three settings decide CPU speed, and the fast values depend on the machine and the model, never on
one benchmark run:
- intra-op threads of the engine thread: a small model's ops (the tiny test model: LLM width 64)
  are too small to split, so extra threads only add synchronisation — one thread serves a lone
  request fastest. The full-size model's flow gains ~1.7x from two threads, so it gets one per core;
- flow/vocoder shard workers: one single-threaded worker per core, so a batch's flow keeps every
  core busy (the flow is compute-bound on a CPU);
- overlapped stages (flow/vocoder on a stage thread while the LLM decodes): only when there is a
  second core for the stage thread; on one core the two stages would just take turns, with switches.
- weight dtypes (kernels/runtime/cpu_features.py): bf16 LLM and flow for the full-size model on a CPU
  that multiplies bf16 natively (AVX512-BF16, AMX): 2.3x the fp32 throughput here; fp32 elsewhere
  (emulated bf16 is ~100x slower) and for small models (parity with upstream's fp32; nothing to gain).
On CUDA the device does the work: torch's thread default stays, shards are off, overlap stays on, the
LLM runs in bf16 and the flow in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kernels.config import read_model_config
from kernels.runtime.cpu_features import CpuFeatures, read_cpu_features
from kernels.runtime.host_memory import usable_cores

# LLM widths below this are "small" (tiny test model: 64; CosyVoice2-0.5B: 896).
SMALL_MODEL_HIDDEN = 512
AUTO = "auto"


@dataclass(frozen=True)
class EngineSettings:
    threads: int  # engine intra-op threads; 0 = leave torch's default (CUDA)
    stage_workers: int
    overlap_stages: bool
    reasons: tuple[str, ...]  # one line per automatic choice, for the start-up log
    llm_dtype: str = "fp32"  # fp32 | bf16 | fp16 (never "auto": chosen here)
    flow_dtype: str = "fp32"
    small_model: bool = False  # LLM width < SMALL_MODEL_HIDDEN (the tiny model): its ops are too small to gain

    def summary(self) -> str:
        threads = "torch default" if self.threads == 0 else str(self.threads)
        return (f"threads {threads}, stage workers {self.stage_workers}, "
                f"overlap {'on' if self.overlap_stages else 'off'}, llm {self.llm_dtype}, flow {self.flow_dtype}")


def choose_dtypes(llm_dtype: str, flow_dtype: str, *, small: bool, cuda: bool,
                  cpu: CpuFeatures) -> tuple[str, str, str | None]:
    """(llm, flow, reason): "auto" resolved, explicit names kept; the reason is None when nothing was chosen."""
    autos = [name for name, value in (("llm", llm_dtype), ("flow", flow_dtype)) if value == AUTO]
    if not autos:
        return llm_dtype, flow_dtype, None
    if cuda:
        return ("bf16" if llm_dtype == AUTO else llm_dtype), ("fp32" if flow_dtype == AUTO else flow_dtype), None
    if small:
        chosen, why = "fp32", "small model: fp32 as upstream, bf16 does not pay on small ops"
    elif cpu.native_bf16:
        chosen, why = "bf16", f"{cpu.summary()} multiplies bf16 natively (~2x fp32 on the full-size model)"
    else:
        chosen, why = "fp32", f"{cpu.summary()} has no AVX512-BF16/AMX: bf16 would be emulated, far slower"
    llm = chosen if llm_dtype == AUTO else llm_dtype
    flow = chosen if flow_dtype == AUTO else flow_dtype
    return llm, flow, f"{'/'.join(autos)} dtype {chosen}: {why}"


def choose_settings(*, threads: int, stage_workers: int, overlap_stages: str, llm_hidden: int,
                    cores: int, cuda: bool, llm_dtype: str = AUTO, flow_dtype: str = AUTO,
                    cpu: CpuFeatures | None = None) -> EngineSettings:
    """Settings given explicitly (threads/stage_workers > 0, overlap "0"/"1", a dtype name) are kept; 0
    and "auto" are chosen here, each with its reason. `cpu`: the CPU's features (None: read them)."""
    if overlap_stages not in (AUTO, "0", "1"):
        raise ValueError(f"overlap_stages must be auto, 0 or 1: {overlap_stages!r}")
    cores = max(1, cores)
    reasons: list[str] = []
    small = llm_hidden < SMALL_MODEL_HIDDEN
    size = f"LLM width {llm_hidden} {'<' if small else '>='} {SMALL_MODEL_HIDDEN}"
    if threads <= 0:
        if cuda:
            threads = 0
        elif small:
            threads = 1
            reasons.append(f"threads 1: small model ({size}), its ops are too small to split")
        else:
            threads = cores
            reasons.append(f"threads {cores}: one per core ({size})")
    if stage_workers <= 0:
        stage_workers = 1 if cuda else cores
        if not cuda:
            reasons.append(f"stage workers {cores}: one per core")
    if overlap_stages == AUTO:
        overlap = cuda or cores >= 2
        if not cuda:
            reasons.append(f"overlap {'on' if overlap else 'off'}: {cores} core{'s' if cores > 1 else ''}")
    else:
        overlap = overlap_stages == "1"
    llm, flow, why = choose_dtypes(llm_dtype, flow_dtype, small=small, cuda=cuda,
                                   cpu=cpu if cpu is not None else read_cpu_features())
    reasons += [why] if why else []
    return EngineSettings(threads, stage_workers, overlap, tuple(reasons), llm, flow, small)


def settings_for(model_dir: str | Path, *, threads: int = 0, stage_workers: int = 0,
                 overlap_stages: str = AUTO, cuda: bool = False, llm_dtype: str = AUTO,
                 flow_dtype: str = AUTO) -> EngineSettings:
    """`choose_settings` for the model in `model_dir` on the cores (and the CPU) this process may use."""
    return choose_settings(threads=threads, stage_workers=stage_workers, overlap_stages=overlap_stages,
                           llm_hidden=read_model_config(model_dir).llm.qwen.hidden_size, cores=usable_cores(),
                           cuda=cuda, llm_dtype=llm_dtype, flow_dtype=flow_dtype)
