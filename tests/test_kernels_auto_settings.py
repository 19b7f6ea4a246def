"""Start-up choice of threads, stage workers and overlap from the model's size and the cores."""
from __future__ import annotations

import pytest

from kernels.runtime.auto_settings import SMALL_MODEL_HIDDEN, choose_settings

AUTO = {"threads": 0, "stage_workers": 0, "overlap_stages": "auto"}
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
    assert [r.split(":")[0] for r in s.reasons] == ["threads 1", "stage workers 2", "overlap on"]
    assert "small model" in s.reasons[0]
    assert s.summary() == "threads 1, stage workers 2, overlap on"


def test_explicit_settings_are_kept_and_not_explained() -> None:
    s = choose_settings(threads=3, stage_workers=5, overlap_stages="0", llm_hidden=TINY, cores=2, cuda=False)
    assert (s.threads, s.stage_workers, s.overlap_stages, s.reasons) == (3, 5, False, ())
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
