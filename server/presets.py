"""`--preset cpu-fast`: the opt-in CPU speed options in one flag, for a user who accepts their numerics.

The automatic CPU settings (kernels/runtime/auto_settings.py) only pick what keeps the output within the
parity tolerances. The preset adds the options that move it more, each measured in the README's CPU
section: 5 Euler steps in the flow's ODE instead of 10, int8 LLM weights for small decode steps
(not for a small model such as the tiny one: there the int8 kernel is slower than its float matmuls,
LLM 0.76x at C1), and HiFT's convolutions in bf16 where the flow runs in bf16 (the auto settings chose
that only where the CPU computes bf16 natively; elsewhere bf16 convolutions would be far slower).
An explicit `--flow-steps N` or `--hift-dtype` wins over the preset's choice.
"""
from __future__ import annotations

from dataclasses import dataclass

from server.config import ServerConfig

CPU_FAST_FLOW_STEPS = 5


@dataclass(frozen=True)
class EngineOptions:
    flow_steps: int  # 0 = upstream's 10
    llm_int8: bool
    hift_dtype: str  # fp32 | bf16
    reason: str | None  # the log line when a preset changed something


def engine_options(config: ServerConfig, cuda: bool, small_model: bool = False,
                   flow_dtype: str = "fp32") -> EngineOptions:
    """The flow steps, int8 switch and HiFT dtype the engine gets: the flags', or the preset's where it
    applies. `flow_dtype`: the flow's resolved dtype (bf16 only where the CPU computes it natively)."""
    flow_steps, llm_int8 = config.flow_steps, bool(config.llm_int8)
    hift = "fp32" if config.hift_dtype == "auto" else config.hift_dtype
    if config.preset != "cpu-fast":
        return EngineOptions(flow_steps, llm_int8, hift, None)
    if cuda:
        return EngineOptions(flow_steps, llm_int8, hift, "preset cpu-fast ignored: the device is a GPU")
    steps = flow_steps or CPU_FAST_FLOW_STEPS
    int8 = llm_int8 or not small_model
    if config.hift_dtype == "auto" and flow_dtype == "bf16":
        hift = "bf16"
    what = "LLM int8 weights for small steps" if int8 else "no LLM int8 (small model: it would be slower)"
    return EngineOptions(steps, int8, hift, f"preset cpu-fast: flow steps {steps}, {what}, vocoder {hift} "
                                            "(faster; the output moves more than the parity tolerances: README)")
