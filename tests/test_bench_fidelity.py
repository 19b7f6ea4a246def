"""bench.fidelity on the tiny model: the same path agrees with itself exactly; packed linears within rounding;
bf16 stays close."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import fidelity


@pytest.fixture(scope="module")
def same(tiny_model_dir: Path) -> dict:
    return fidelity.run(tiny_model_dir, "fp32", "fp32", tokens=30, packed_linears=False)


def test_fp32_against_itself_is_identical(same: dict) -> None:
    llm = same["llm"]
    assert (llm["teacher_forced_top1"], llm["logp_max_abs_diff"], llm["greedy_common_prefix"]) == (1.0, 0.0, 30)
    assert len(llm["reference_tokens"]) == 30
    for name, f in same["flow"].items():
        if name == "incremental":  # the same frames from other call shapes: ~1e-6
            assert f["frames"] >= 2 * 25 and f["mel_rel_mean"] < 1e-4
        else:
            assert f["frames"] > 0 and (f["mel_rel_mean"], f["mel_max_abs"]) == (0.0, 0.0)


def test_packed_linears_move_the_mel_by_rounding_only(tiny_model_dir: Path, tmp_path: Path) -> None:
    md = tmp_path / "f.md"
    result = fidelity.main(["--model-dir", str(tiny_model_dir), "--llm-dtype", "fp32", "--flow-dtype", "fp32",
                            "--tokens", "20", "--markdown", str(md)])  # packed: the default
    assert result["candidate"]["packed_linears"] is True
    assert result["llm"]["teacher_forced_top1"] == 1.0  # the tiny LLM stays unpacked
    for f in result["flow"].values():
        assert f["mel_rel_mean"] < 1e-5  # oneDNN's fp32 sums in another order (full-size: 1e-6; tiny rounds to 0)
    assert "(linears packed)" in md.read_text()


def test_bf16_is_close_and_the_report_says_so(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.json"
    result = fidelity.main(["--model-dir", str(tiny_model_dir), "--llm-dtype", "bf16", "--flow-dtype", "bf16",
                            "--tokens", "30", "--json", str(out), "--markdown", str(tmp_path / "f.md")])
    assert json.loads(out.read_text())["candidate"] == {"llm": "bf16", "flow": "bf16", "flow_steps": 10,
                                                              "llm_int8": False, "packed_linears": True}
    assert result["llm"]["teacher_forced_top1"] >= 0.9  # measured 98 % over 60 tokens
    for f in result["flow"].values():
        assert 0 < f["mel_rel_mean"] < 0.02 and f["mel_max_abs"] < 0.15  # measured ~0.65 %, 0.05
    assert "teacher-forced top-1" in (tmp_path / "f.md").read_text()


def test_fewer_flow_steps_move_only_the_mel(tiny_model_dir: Path, tmp_path: Path) -> None:
    md = tmp_path / "f.md"
    result = fidelity.main(["--model-dir", str(tiny_model_dir), "--llm-dtype", "fp32", "--flow-dtype", "fp32",
                            "--flow-steps", "5", "--tokens", "20", "--markdown", str(md)])
    assert result["candidate"]["flow_steps"] == 5
    assert result["llm"]["teacher_forced_top1"] == 1.0  # the LLM is untouched
    for f in result["flow"].values():
        assert f["mel_rel_mean"] > 0.001  # a different ODE solve, not the same mel
    assert "(5 ODE steps)" in md.read_text()


def test_int8_llm_is_measured_on_decode_steps(tiny_model_dir: Path) -> None:
    result = fidelity.main(["--model-dir", str(tiny_model_dir), "--llm-dtype", "fp32", "--flow-dtype", "fp32",
                            "--llm-int8", "1", "--tokens", "30"])
    assert result["candidate"]["llm_int8"] is True
    llm = result["llm"]
    # int8 weights move the decode steps' log-probs a little (tiny model, width 64: measured 0.15, 93 %)
    assert 0 < llm["logp_max_abs_diff"] < 0.5
    assert llm["teacher_forced_top1"] >= 0.8
    for f in result["flow"].values():
        assert f["mel_rel_mean"] < 1e-5  # same reference tokens into the same fp32 flow (packed: rounding)


def test_a_short_first_chunk_moves_its_own_frames_only_by_a_little(tiny_model_dir: Path) -> None:
    result = fidelity.run(tiny_model_dir, "fp32", "fp32", tokens=30, first_chunk=10, packed_linears=False)
    (first,) = [v for k, v in result["flow"].items() if k.startswith("first 10 tokens")]
    assert first["frames"] == 20 and first["tokens"] == 10
    assert 0 < first["mel_rel_mean"] < 0.5  # an incomplete flow chunk: other frames, same kind of mel
    assert result["flow"]["streaming"]["mel_rel_mean"] == 0.0  # the same path otherwise
