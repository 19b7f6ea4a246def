"""`--preset cpu-fast` resolves to the opt-in CPU options; explicit flags and GPUs are respected."""
from __future__ import annotations

from server.config import ServerConfig, load_config
from server.presets import CPU_FAST_FIRST_CHUNK_TOKENS, CPU_FAST_FLOW_STEPS, engine_options


def test_no_preset_passes_the_flags_through() -> None:
    opts = engine_options(ServerConfig(flow_steps=7, llm_int8=1), cuda=False)
    assert (opts.flow_steps, opts.llm_int8, opts.reason) == (7, True, None)
    assert engine_options(ServerConfig(), cuda=False) == engine_options(ServerConfig(), cuda=True)


def test_cpu_fast_on_a_cpu_turns_them_on_and_says_so() -> None:
    opts = engine_options(load_config(["--token", "x", "--preset", "cpu-fast"], {}), cuda=False)
    assert (opts.flow_steps, opts.llm_int8, opts.first_chunk_tokens) == (
        CPU_FAST_FLOW_STEPS, True, CPU_FAST_FIRST_CHUNK_TOKENS)
    assert opts.reason is not None and "flow steps 5" in opts.reason and "int8" in opts.reason
    assert f"first chunk {CPU_FAST_FIRST_CHUNK_TOKENS} tokens" in opts.reason


def test_explicit_flags_win_over_the_preset() -> None:
    opts = engine_options(ServerConfig(preset="cpu-fast", flow_steps=8), cuda=False)
    assert (opts.flow_steps, opts.llm_int8) == (8, True)
    opts = engine_options(load_config(["--token", "x", "--preset", "cpu-fast", "--first-chunk-tokens", "0"], {}),
                          cuda=False)
    assert opts.first_chunk_tokens == 0 and "upstream's first chunk" in (opts.reason or "")
    assert engine_options(ServerConfig(first_chunk_tokens=15), cuda=False).first_chunk_tokens == 15


def test_cpu_fast_on_a_gpu_changes_nothing() -> None:
    opts = engine_options(ServerConfig(preset="cpu-fast"), cuda=True)
    assert (opts.flow_steps, opts.llm_int8, opts.first_chunk_tokens) == (0, False, 0)
    assert opts.reason is not None and "ignored" in opts.reason


def test_cpu_fast_leaves_int8_off_for_a_small_model_unless_asked() -> None:
    opts = engine_options(ServerConfig(preset="cpu-fast"), cuda=False, small_model=True)
    assert (opts.flow_steps, opts.llm_int8) == (CPU_FAST_FLOW_STEPS, False)
    assert opts.reason is not None and "small model" in opts.reason
    asked = engine_options(ServerConfig(preset="cpu-fast", llm_int8=1), cuda=False, small_model=True)
    assert asked.llm_int8
