"""`--preset cpu-fast`: the opt-in CPU speed options in one flag, for a user who accepts their numerics.

The automatic CPU settings (kernels/runtime/auto_settings.py) only pick what keeps the output within the
parity tolerances. The preset adds the options that move it more, each measured in the README's CPU
section: 5 Euler steps in the flow's ODE instead of 10; a 10-token first streaming chunk (the first audio
after 13 generated tokens instead of 28); and int8 LLM weights for small decode steps, on any CPU (an
fp32 LLM's activations reach the int8 kernel in bf16, fast with AVX2 kernels too), but not for a small
model such as the tiny one: its matmuls are too small to gain (engine 1.00x at C1 and C8, its decode
steps 0.79x). An explicit `--flow-steps N` or `--first-chunk-tokens N` wins over the preset's.
"""
from __future__ import annotations

from dataclasses import dataclass

from server.config import ServerConfig

CPU_FAST_FLOW_STEPS = 5
CPU_FAST_FIRST_CHUNK_TOKENS = 10


@dataclass(frozen=True)
class EngineOptions:
    flow_steps: int  # 0 = upstream's 10
    llm_int8: bool
    first_chunk_tokens: int  # 0 = upstream's first hop (scheduler ChunkPolicyConfig.lead_hop)
    reason: str | None  # the log line when a preset changed something


def engine_options(config: ServerConfig, cuda: bool, small_model: bool = False) -> EngineOptions:
    """The flow steps, first chunk and int8 switch the engine gets: the flags', or the preset's where it
    applies."""
    flow_steps, llm_int8, first = config.flow_steps, bool(config.llm_int8), config.first_chunk_tokens
    if config.preset != "cpu-fast":
        return EngineOptions(flow_steps, llm_int8, max(first, 0), None)
    if cuda:
        return EngineOptions(flow_steps, llm_int8, max(first, 0), "preset cpu-fast ignored: the device is a GPU")
    steps = flow_steps or CPU_FAST_FLOW_STEPS
    first = CPU_FAST_FIRST_CHUNK_TOKENS if first < 0 else first
    int8 = llm_int8 or not small_model
    what = "LLM int8 weights for small steps" if int8 else "no LLM int8 (small model: no gain there)"
    lead = f"first chunk {first} tokens" if first else "upstream's first chunk"
    return EngineOptions(steps, int8, first, f"preset cpu-fast: flow steps {steps}, {lead}, {what} (faster; the "
                                             "output moves more than the parity tolerances: README)")
