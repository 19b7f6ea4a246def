"""Smoke run of `python -m bench.engine` on the tiny preset: JSON shape, ratios, counts."""

from __future__ import annotations

import json

import pytest

from bench import engine as bench_engine

TOKENS = 12


@pytest.fixture(scope="module")
def result(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-engine") / "engine.json"
    md = out.with_suffix(".md")
    res = bench_engine.main(
        [
            "--model-dir",
            str(tiny_model_dir),
            "--concurrency",
            "1,2",
            "--tokens",
            str(TOKENS),
            "--requests-per-level",
            "3",
            "--json",
            str(out),
            "--markdown",
            str(md),
        ]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert "| 2 | **ratio** |" in md.read_text()
    return res


def test_runs_cover_both_modes_at_each_level(result):
    runs = result["runs"]
    assert [(r["mode"], r["concurrency"]) for r in runs] == [
        ("batched", 1),
        ("sequential", 1),
        ("batched", 2),
        ("sequential", 2),
    ]
    for r in runs:
        assert r["requests"] == 3
        assert r["llm_tokens"] == 3 * TOKENS  # fixed_tokens: exact lengths
        assert r["speech_seconds"] == pytest.approx(3 * TOKENS * 960 / 24000)
        assert r["speech_seconds_per_second"] > 0 and r["llm_tokens_per_second"] > 0
        assert 0 < r["ttfc_ms"]["p50"] <= r["ttfc_ms"]["p95"]
        assert r["decode_batch_mean"] >= 1 and r["flow_batch_mean"] >= 1 and r["vocoder_batch_mean"] >= 1
        # one engine thread: its steps fit in the wall; overlapped, the LLM and the stage thread each do
        threads = 2 if result["meta"]["overlap_stages"] else 1
        assert 0 < r["stage_seconds"]["step_s"] <= threads * r["wall_s"] + 1e-6
    seq = [r for r in runs if r["mode"] == "sequential"]
    assert all(r["decode_batch_mean"] == 1 and r["flow_batch_mean"] == 1 for r in seq)  # one at a time


def test_ratios_are_batched_over_sequential(result):
    by = {(r["mode"], r["concurrency"]): r for r in result["runs"]}
    assert set(result["ratios"]) == {"1", "2"}
    for c, row in result["ratios"].items():
        b, s = by[("batched", int(c))], by[("sequential", int(c))]
        for key in bench_engine.FIGURES:
            assert row[key] == pytest.approx(b[key] / s[key], rel=1e-2)
        assert row["ttfc_p50"] == pytest.approx(b["ttfc_ms"]["p50"] / s["ttfc_ms"]["p50"], rel=1e-2)
    assert result["ratios"]["2"]["decode_batch_mean"] > 1  # two jobs really decoded together


def test_meta(result):
    meta = result["meta"]
    assert {"date", "machine", "commit", "model", "threads"} <= set(meta)
    assert meta["threads"]["torch"] >= 1


def test_ratios_skip_missing_pairs():
    run = {
        "mode": "batched",
        "concurrency": 4,
        "ttfc_ms": {"p50": 1.0, "p95": 2.0},
        **dict.fromkeys(bench_engine.FIGURES, 1.0),
    }
    assert bench_engine.ratios([run]) == {}
    seq = {**run, "mode": "sequential", "speech_seconds_per_second": 0.5, "flow_batch_mean": None}
    row = bench_engine.ratios([run, seq])["4"]
    assert row["speech_seconds_per_second"] == 2.0 and row["flow_batch_mean"] is None


def test_llm_only_smoke(tiny_model_dir):
    res = bench_engine.main(
        ["--model-dir", str(tiny_model_dir), "--concurrency", "2", "--tokens", "6", "--llm-only"]
    )
    (b, s) = res["runs"]
    assert b["decode_batch_mean"] == 2 and s["decode_batch_mean"] == 1
    assert b["llm_tokens"] == s["llm_tokens"] == 12 and b["speech_seconds_per_second"] is None
    assert res["meta"]["llm_only"] and res["ratios"]["2"]["llm_tokens_per_second"] > 0


def test_a_baseline_path_runs_beside_each_level(tiny_model_dir, tmp_path):
    md = tmp_path / "e.md"
    res = bench_engine.main(["--model-dir", str(tiny_model_dir), "--concurrency", "2", "--tokens", str(TOKENS),
                             "--sequential-concurrency", "", "--baseline", "flow=bf16,voice_prefix=0",
                             "--markdown", str(md)])
    assert [r["mode"] for r in res["runs"]] == ["batched", "baseline"]
    assert res["baseline"] == {"llm": "fp32", "flow": "bf16", "voice_prefix": "0", "flow_steps": "10",
                               "llm_int8": "0", "packed": "1"}  # unnamed: as measured
    b, base = res["runs"]
    assert res["ratios_vs_baseline"]["2"]["llm_tokens_per_second"] == pytest.approx(
        b["llm_tokens_per_second"] / base["llm_tokens_per_second"], rel=1e-2)
    assert res["ratios"] == {} and "| 2 | **vs baseline** |" in md.read_text()


def test_a_baseline_spec_names_known_settings_only():
    assert bench_engine.parse_path("llm=bf16,voice_prefix=0") == {"llm": "bf16", "voice_prefix": "0"}
    assert bench_engine.parse_path("flow_steps=5,llm_int8=1,threads=1") == {
        "flow_steps": "5", "llm_int8": "1", "threads": "1"}
    assert bench_engine.parse_path("overlap=0,first_alone=0") == {"overlap": "0", "first_alone": "0"}
    assert bench_engine.parse_path("packed=0") == {"packed": "0"}
    for bad in ("llm=int8", "prefix=0", "voice_prefix=yes", "flow_steps=0", "threads=0", "llm_int8=2",
                "overlap=2", "first_alone=yes", "packed=2"):
        with pytest.raises(Exception, match="expected one of"):
            bench_engine.parse_path(bad)


def test_a_baseline_without_overlap_or_first_alone_configures_its_engine(tiny_model_dir):
    args = bench_engine.parse_args(["--model-dir", str(tiny_model_dir), "--baseline", "overlap=0,first_alone=0"])
    base = bench_engine.baseline_path(args, None, "cpu")
    assert base is not None and base["overlap"] is False and base["engine"] == {"first_chunk_alone": False}
    plain = bench_engine.baseline_path(bench_engine.parse_args(["--model-dir", str(tiny_model_dir), "--baseline", ""]),
                                       None, "cpu")
    assert plain is not None and plain["overlap"] is None and plain["engine"] == {}


def test_repeats_alternate_batched_and_baseline_and_merge_each_mode(tiny_model_dir):
    assert bench_engine.repeat_order(["batched", "baseline", "sequential"], 0) == ["batched", "baseline", "sequential"]
    assert bench_engine.repeat_order(["batched", "baseline", "sequential"], 1) == ["baseline", "batched", "sequential"]
    assert bench_engine.repeat_order(["batched", "sequential"], 1) == ["batched", "sequential"]
    res = bench_engine.main(["--model-dir", str(tiny_model_dir), "--concurrency", "1", "--tokens", str(TOKENS),
                             "--requests-per-level", "2", "--sequential-concurrency", "", "--repeats", "2",
                             "--baseline", "voice_prefix=0"])
    assert [(r["mode"], r["requests"], len(r["repeat_speech_s_per_s"])) for r in res["runs"]] == [
        ("batched", 4, 2), ("baseline", 4, 2)]


def test_merged_repeats_rate_over_the_summed_time_and_rank_every_first_chunk():
    def run(wall, speech, tokens, ttfc):
        return {"mode": "batched", "concurrency": 2, "requests": len(ttfc), "wall_s": wall, "speech_seconds": speech,
                "llm_tokens": tokens, "speech_seconds_per_second": speech / wall, "llm_tokens_per_second": tokens / wall,
                "llm_stage_tokens_per_second": tokens / (wall / 2), "ttfc_ms": bench_engine.percentiles(ttfc),
                "ttfc_each_s": ttfc, "decode_batch_mean": 2.0, "flow_batch_mean": 1.0, "vocoder_batch_mean": None,
                "steps": 10, "stage_seconds": {"flow_s": wall / 2}}
    merged = bench_engine.merge_runs([run(2.0, 4.0, 100, [0.1, 0.2]), run(6.0, 4.0, 100, [0.3, 0.4])])
    assert merged["requests"] == 4 and merged["wall_s"] == 8.0 and merged["steps"] == 20
    assert merged["speech_seconds_per_second"] == pytest.approx(1.0)  # 8 s of speech in 8 s, not mean(2, 0.67)
    assert merged["llm_stage_tokens_per_second"] == pytest.approx(50.0)
    assert merged["ttfc_ms"]["p50"] == pytest.approx(250.0) and merged["stage_seconds"] == {"flow_s": 4.0}
    assert merged["repeat_speech_s_per_s"] == [2.0, pytest.approx(0.6667, abs=1e-4)]
    assert merged["vocoder_batch_mean"] is None and merged["decode_batch_mean"] == 2.0


def test_a_baseline_with_other_threads_gives_its_engine_thread_those_and_restores():
    import threading

    import torch

    before = torch.get_num_threads()
    seen: list[int] = []
    with bench_engine.intra_op_threads(1):
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))  # as the engine thread
        t.start()
        t.join()
    assert seen == [1] and torch.get_num_threads() == before
    with bench_engine.intra_op_threads(0):  # 0: unchanged
        assert torch.get_num_threads() == before


def test_a_packed_0_baseline_loads_its_model_unpacked(tiny_model_dir):
    from kernels.networks.packed_linear import packed_count
    from kernels.weights.model import load_model

    measured = load_model(tiny_model_dir, packed_linears=True)
    args = bench_engine.parse_args(["--model-dir", str(tiny_model_dir), "--baseline", "packed=0"])
    base = bench_engine.baseline_path(args, measured, "cpu")
    assert base is not None and base["spec"]["packed"] == "0" and base["model"] is not measured
    assert packed_count(base["model"].flow) == 0 < packed_count(measured.flow)
