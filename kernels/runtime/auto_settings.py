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
On CUDA the device does the work: torch's thread default stays, shards are off, overlap stays on.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kernels.config import read_model_config
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

    def summary(self) -> str:
        threads = "torch default" if self.threads == 0 else str(self.threads)
        return (f"threads {threads}, stage workers {self.stage_workers}, "
                f"overlap {'on' if self.overlap_stages else 'off'}")


def choose_settings(*, threads: int, stage_workers: int, overlap_stages: str, llm_hidden: int,
                    cores: int, cuda: bool) -> EngineSettings:
    """Settings given explicitly (threads/stage_workers > 0, overlap "0"/"1") are kept; 0 and "auto"
    are chosen here, each with its reason."""
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
    return EngineSettings(threads, stage_workers, overlap, tuple(reasons))


def settings_for(model_dir: str | Path, *, threads: int = 0, stage_workers: int = 0,
                 overlap_stages: str = AUTO, cuda: bool = False) -> EngineSettings:
    """`choose_settings` for the model in `model_dir` on the cores this process may use."""
    return choose_settings(threads=threads, stage_workers=stage_workers, overlap_stages=overlap_stages,
                           llm_hidden=read_model_config(model_dir).llm.qwen.hidden_size, cores=usable_cores(),
                           cuda=cuda)
