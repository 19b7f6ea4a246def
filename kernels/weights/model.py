"""Load a released CosyVoice2 model directory into the three inference networks.

Order of work: check every required file exists (one error naming the first missing one),
read the config, strict-check each state dict against `kernels.weights.layout`, then build each module
without random init (meta device) and assign the memory-mapped checkpoint tensors directly,
so fp32 CPU loading copies nothing; the single `.to(device, dtype)` per module is the only copy.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, TypeVar

import torch
from torch import nn

from frontend.model_files import CAMPPLUS_FILE, QWEN_DIR, SPEECH_TOKENIZER_FILE, WEIGHT_FILES, YAML_NAME
from kernels.config import ModelConfig, read_model_config
from kernels.weights.checkpoint import CheckpointError, check_strict, clone_shared, load_state_dict_file
from kernels.weights.layout import LM_HEAD_KEY, expected_layout
from kernels.weights.progress import progress

REQUIRED_FILES = (
    YAML_NAME,
    *WEIGHT_FILES,
    CAMPPLUS_FILE,
    SPEECH_TOKENIZER_FILE,
    f"{QWEN_DIR}/config.json",
    f"{QWEN_DIR}/vocab.json",
    f"{QWEN_DIR}/merges.txt",
)

M = TypeVar("M", bound=nn.Module)


class ModelFileMissing(CheckpointError):
    """A file the model directory must contain is absent."""


@dataclass(frozen=True)
class MemoryStats:
    rss_mb: float  # resident now (VmRSS)
    peak_rss_mb: float  # high-water mark of this process (VmHWM)


@dataclass(frozen=True)
class LoadStats:
    seconds: float
    memory: MemoryStats
    params: dict[str, int] = field(default_factory=dict)  # per network, after dropping the tied lm_head


@dataclass
class CosyVoice2Model:
    config: ModelConfig
    llm: nn.Module  # kernels.networks.llm.Qwen2LM
    flow: nn.Module  # kernels.networks.flow.CausalMaskedDiffWithXvec
    hift: nn.Module  # kernels.networks.hift.HiFTGenerator
    device: torch.device
    model_dir: Path
    load_stats: LoadStats | None = None


def memory_stats() -> MemoryStats:
    """VmRSS / VmHWM of this process from /proc (zeros where /proc is unavailable)."""
    values = {"VmRSS": 0.0, "VmHWM": 0.0}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in values:
                    values[key] = int(rest.split()[0]) / 1024.0  # kB -> MiB
    except OSError:
        pass
    return MemoryStats(rss_mb=values["VmRSS"], peak_rss_mb=values["VmHWM"])


def check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise ModelFileMissing(f"{model_dir}: model directory not found")
    for name in REQUIRED_FILES:
        if not (model_dir / name).is_file():
            raise ModelFileMissing(f"{name}: required file missing from model directory {model_dir}")


def _assign(module: M, state: dict[str, torch.Tensor], file_name: str) -> M:
    """Load `state` into a meta-built module without copying (parameters become the tensors).

    Non-persistent buffers built with real values (flow's fixed noise) survive; `to_empty`
    gives meta-built ones storage, and modules that compute them rebuild them in `_apply`.
    """
    real_buffers = {
        name: buf for name, buf in module.named_buffers() if name not in state and not buf.is_meta
    }
    module = module.to_empty(device="cpu")
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # a module/layout disagreement: name the file
        raise CheckpointError(f"{file_name}: {exc}") from exc
    for name, buf in real_buffers.items():
        owner, _, attr = name.rpartition(".")
        setattr(module.get_submodule(owner), attr, buf)
    return module


def _finish(module: M, device: torch.device, dtype: torch.dtype | None) -> M:
    module = module.to(device=device, dtype=dtype) if dtype is not None else module.to(device=device)
    return module.eval().requires_grad_(False)


def _timed_state(model_dir: Path, file_name: str, expected: dict[str, tuple[int, ...]],
                 ignore: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    state = load_state_dict_file(model_dir / file_name)
    return check_strict(file_name, state, expected, ignore=ignore)


def _build_on_meta(factory: Callable[[], M]) -> M:
    with torch.device("meta"):
        return factory()


def load_model(
    model_dir: str | Path,
    device: str | torch.device = "cpu",
    llm_dtype: torch.dtype | None = None,
    flow_dtype: torch.dtype | None = None,
    progress_file: IO[str] | None = None,
    flow_steps: int | None = None,
    llm_int8: bool = False,
    packed_linears: bool = False,
) -> CosyVoice2Model:
    """Strictly load llm.pt / flow.pt / hift.pt of `model_dir`; HiFT always stays fp32. `flow_steps`: Euler
    steps of the flow's ODE instead of upstream's 10 (fewer: faster, and a different mel). `llm_int8` (CPU):
    the LLM's decoder-layer linears also get int8 weights for steps of few rows (kernels/networks/int8_linear.py).
    `packed_linears` (CPU): the flow's linears, and a wide LLM's, run on weights pre-packed for oneDNN, same numbers
    (kernels/networks/packed_linear.py); skipped for a dtype this CPU or torch build cannot run packed."""
    from kernels.networks.flow import CausalMaskedDiffWithXvec
    from kernels.networks.hift import HiFTGenerator, fold_weight_norm
    from kernels.networks.llm import Qwen2LM

    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    device = torch.device(device)
    check_model_dir(model_dir)
    cfg = read_model_config(model_dir)
    if flow_steps is not None:
        if flow_steps < 1:
            raise ValueError(f"flow_steps must be >= 1, got {flow_steps}")
        cfg = replace(cfg, flow=replace(cfg.flow, n_timesteps=flow_steps))
    if llm_int8 and device.type != "cpu":
        raise ValueError("llm_int8 is a CPU option (its kernel is aten._weight_int8pack_mm on the CPU)")
    layout = expected_layout(cfg)
    # Check all three before building anything: a bad hift.pt fails fast, not after the LLM.
    sizes = {name: (model_dir / name).stat().st_size for name in ("llm.pt", "flow.pt", "hift.pt")}
    with progress(sum(sizes.values()), "loading weights", unit="B", unit_scale=True,
                  file=progress_file) as bar:
        llm_state = _timed_state(model_dir, "llm.pt", layout["llm.pt"], ignore=(LM_HEAD_KEY,))
        bar.update(sizes["llm.pt"])
        flow_state = clone_shared(_timed_state(model_dir, "flow.pt", layout["flow.pt"]))
        bar.update(sizes["flow.pt"])
        hift_state = fold_weight_norm(_timed_state(model_dir, "hift.pt", layout["hift.pt"]))
        bar.update(sizes["hift.pt"])

    llm = _assign(_build_on_meta(lambda: Qwen2LM(cfg.llm)), clone_shared(llm_state), "llm.pt")
    flow = _assign(_build_on_meta(lambda: CausalMaskedDiffWithXvec(cfg.flow)), flow_state, "flow.pt")
    hift = HiFTGenerator(cfg.hift)  # small; built on CPU so its computed buffers are real
    try:
        hift.load_state_dict(hift_state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"hift.pt: {exc}") from exc
    del llm_state, flow_state, hift_state

    llm = _finish(llm, device, llm_dtype)
    flow = _finish(flow, device, flow_dtype)
    if packed_linears and device.type == "cpu":
        from kernels.networks.packed_linear import MIN_PACKED_LLM_WIDTH, pack_linears, packing_works

        wide_llm = cfg.llm.qwen.hidden_size >= MIN_PACKED_LLM_WIDTH
        for module in (llm, flow) if wide_llm else (flow,):
            if packing_works(next(module.parameters()).dtype):
                pack_linears(module)
    if llm_int8:
        from kernels.networks.int8_linear import quantize_decoder_linears

        quantize_decoder_linears(llm.backbone.layers)
    if flow.decoder.rand_noise.dtype != torch.float32:  # the fixed CFM noise stays exact in fp32
        from kernels.networks.flow import fixed_noise

        flow.decoder.rand_noise = fixed_noise(cfg.flow.output_size, cfg.flow.noise_frames).to(device)
    hift = _finish(hift, device, torch.float32)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in (("llm", llm), ("flow", flow), ("hift", hift))}
    stats = LoadStats(seconds=time.perf_counter() - t0, memory=memory_stats(), params=params)
    return CosyVoice2Model(cfg, llm, flow, hift, device, model_dir, stats)


def main(argv: list[str] | None = None) -> int:
    """`python -m kernels.weights.model --model-dir DIR`: strict load, then report time, params and memory."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--touch", action="store_true", help="read every weight once (page in mmapped files)")
    args = parser.parse_args(argv)
    model = load_model(args.model_dir, device=args.device)
    stats = model.load_stats
    assert stats is not None
    print(f"loaded {args.model_dir} in {stats.seconds:.1f} s; params " +
          ", ".join(f"{k} {v:,}" for k, v in stats.params.items()))
    print(f"memory after load: rss {stats.memory.rss_mb:.0f} MiB, peak {stats.memory.peak_rss_mb:.0f} MiB "
          "(CPU fp32 weights are memory-mapped: pages come in on first use)")
    if args.touch:
        t0 = time.perf_counter()
        total = sum(float(p.float().sum()) for m in (model.llm, model.flow, model.hift) for p in m.parameters())
        mem = memory_stats()
        print(f"touched every weight in {time.perf_counter() - t0:.1f} s (checksum {total:.3e}); "
              f"rss {mem.rss_mb:.0f} MiB, peak {mem.peak_rss_mb:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
