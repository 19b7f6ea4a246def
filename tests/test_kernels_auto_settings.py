"""Start-up choice of threads, stage workers and overlap from the model's size and the cores."""
from __future__ import annotations

import pytest

from kernels.runtime.auto_settings import SMALL_MODEL_HIDDEN, choose_settings
from kernels.runtime.cpu_features import CpuFeatures

ZEN4 = CpuFeatures("AMD EPYC 9B14", frozenset({"avx2", "avx512f", "avx512_bf16"}))
SAPPHIRE_RAPIDS = CpuFeatures("Intel Xeon Platinum 8481C", frozenset({"avx2", "avx512f", "amx_tile", "amx_bf16"}))
ZEN2 = CpuFeatures("AMD EPYC 7B12", frozenset({"avx2", "fma"}))
AUTO = {"threads": 0, "stage_workers": 0, "overlap_stages": "auto", "cpu": ZEN4}
TINY, FULL = 64, 896  # LLM widths: the tiny test model, CosyVoice2-0.5B


@pytest.mark.parametrize(("hidden", "cores", "cuda", "expected"), [
    (TINY, 2, False, (1, 2, True)),  # small ops: one intra-op thread; shards and overlap use the cores
    (FULL, 2, False, (2, 2, True)),  # the 0.5B flow splits well: one thread per core
    (FULL, 16, False, (16, 16, True)),
    (TINY, 1, False, (1, 1, False)),  # one core: no second core for a stage thread
    (FULL, 1, False, (1, 1, False)),
    (FULL, 16, True, (0, 1, True)),  # CUDA: torch's thread default, no CPU shards, stages on two streams
    (SMALL_MODEL_HIDDEN, 4, False, (4, 4, True)),
    (SMALL_MODEL_HIDDEN - 1, 4, False, (1, 4, True)),
])
def test_auto_choices(hidden: int, cores: int, cuda: bool, expected: tuple[int, int, bool]) -> None:
    s = choose_settings(**AUTO, llm_hidden=hidden, cores=cores, cuda=cuda)
    assert (s.threads, s.stage_workers, s.overlap_stages) == expected


def test_every_cpu_choice_says_why() -> None:
    s = choose_settings(**AUTO, llm_hidden=TINY, cores=2, cuda=False)
    assert [r.split(":")[0] for r in s.reasons] == ["threads 1", "stage workers 2", "overlap on",
                                                    "llm/flow dtype fp32"]
    assert "small model" in s.reasons[0] and "small model" in s.reasons[3]
    assert s.summary() == "threads 1, stage workers 2, overlap on, llm fp32, flow fp32"


@pytest.mark.parametrize(("cpu", "hidden", "expected"), [
    (ZEN4, FULL, "bf16"),  # AVX512-BF16: the full-size model's fast path
    (SAPPHIRE_RAPIDS, FULL, "bf16"),  # AMX tiles
    (ZEN2, FULL, "fp32"),  # AVX2 only: bf16 would be emulated
    (ZEN4, TINY, "fp32"),  # small model: fp32 as upstream (the parity fixtures)
    (CpuFeatures("", frozenset()), FULL, "fp32"),  # nothing known
])
def test_auto_dtypes_follow_the_cpu_and_the_model(cpu: CpuFeatures, hidden: int, expected: str) -> None:
    s = choose_settings(**{**AUTO, "cpu": cpu}, llm_hidden=hidden, cores=2, cuda=False)
    assert (s.llm_dtype, s.flow_dtype) == (expected, expected)
    assert s.reasons[-1].startswith(f"llm/flow dtype {expected}: ")
    if hidden == FULL:
        assert cpu.summary() in s.reasons[-1]  # the log names the CPU it chose for


def test_explicit_dtypes_are_kept_and_only_auto_is_chosen() -> None:
    s = choose_settings(**AUTO, llm_hidden=FULL, cores=2, cuda=False, llm_dtype="fp32")
    assert (s.llm_dtype, s.flow_dtype) == ("fp32", "bf16") and s.reasons[-1].startswith("flow dtype bf16")
    s = choose_settings(**AUTO, llm_hidden=FULL, cores=2, cuda=False, llm_dtype="fp16", flow_dtype="fp32")
    assert (s.llm_dtype, s.flow_dtype) == ("fp16", "fp32") and not any("dtype" in r for r in s.reasons)


def test_cuda_dtypes_are_bf16_llm_and_fp32_flow() -> None:
    s = choose_settings(**AUTO, llm_hidden=FULL, cores=16, cuda=True)
    assert (s.llm_dtype, s.flow_dtype) == ("bf16", "fp32")


def test_explicit_settings_are_kept_and_not_explained() -> None:
    s = choose_settings(threads=3, stage_workers=5, overlap_stages="0", llm_hidden=TINY, cores=2, cuda=False,
                        llm_dtype="bf16", flow_dtype="fp32")
    assert (s.threads, s.stage_workers, s.overlap_stages, s.reasons) == (3, 5, False, ())
    assert (s.llm_dtype, s.flow_dtype) == ("bf16", "fp32")
    assert choose_settings(threads=0, stage_workers=0, overlap_stages="1", llm_hidden=TINY, cores=1,
                           cuda=False).overlap_stages


def test_unknown_overlap_value_is_refused() -> None:
    with pytest.raises(ValueError, match="overlap_stages"):
        choose_settings(threads=0, stage_workers=0, overlap_stages="yes", llm_hidden=TINY, cores=2, cuda=False)


def test_settings_for_reads_the_model_width_from_its_directory(tiny_model_dir) -> None:
    from kernels.runtime.auto_settings import settings_for
    from kernels.runtime.host_memory import usable_cores

    s = settings_for(tiny_model_dir)
    assert (s.threads, s.stage_workers) == (1, usable_cores())  # the tiny model is small
    assert settings_for(tiny_model_dir, threads=3, cuda=True).threads == 3
