"""bench/load.py: percentiles, playback underruns and aggregation by hand; one real smoke run."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import requests

from bench import load, texts
from bench.load_stats import (
    Playback,
    RequestResult,
    aggregate,
    failed,
    hop_table,
    markdown,
    overload_stats,
    overload_table,
    percentile,
    ratio,
    refusal_of,
    request_result,
    simulate_playback,
    table,
)
from bench.servers import server_command, spawn_server
from tests.fakes import SAMPLE_RATE, SAMPLES_PER_CHAR, BatchFakeEngine, FakeEngine
from tests.server_helpers import TOKEN, running_server

# ---------------------------------------------------------------- percentiles


def test_percentile_interpolates_between_ranks() -> None:
    xs = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(xs, 50) == pytest.approx(2.5)  # rank 1.5
    assert percentile(xs, 95) == pytest.approx(3.85)  # rank 2.85 -> 3 + 0.85
    assert percentile(xs, 99) == pytest.approx(3.97)
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 4.0


def test_percentile_edges() -> None:
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


# ---------------------------------------------------------------- playback


def test_playback_on_time_stream_never_stalls() -> None:
    # each 1 s chunk arrives exactly when the previous one ends
    assert simulate_playback([0.0, 1.0, 2.0], [1.0, 1.0, 1.0]) == Playback(0, 0.0)


def test_playback_counts_one_late_chunk() -> None:
    # plays 0.5-1.5, queued chunk 1.5-2.5, third arrives at 3.0: 0.5 s stall, then plays 3.0-4.0
    play = simulate_playback([0.5, 1.0, 3.0], [1.0, 1.0, 1.0])
    assert play.underruns == 1
    assert play.stall_s == pytest.approx(0.5)


def test_playback_skips_empty_chunks_and_resumes_from_the_late_arrival() -> None:
    # header (no audio) at 0.1; plays 0.2-0.3; next at 0.5 (stall 0.2) plays 0.5-0.6;
    # next at 0.55 is queued (0.6-0.8); next at 1.0 stalls 0.2 more; empty stop event ignored
    arrivals = [0.1, 0.2, 0.5, 0.55, 1.0, 1.01]
    durations = [0.0, 0.1, 0.1, 0.2, 0.3, 0.0]
    play = simulate_playback(arrivals, durations)
    assert play.underruns == 2
    assert play.stall_s == pytest.approx(0.4)


def test_playback_ignores_float_noise_and_rejects_mismatch() -> None:
    assert simulate_playback([0.0, 0.1 + 0.2], [0.3, 1.0]).underruns == 0  # 0.30000000000000004
    with pytest.raises(ValueError):
        simulate_playback([0.0], [])


# ---------------------------------------------------------------- per request and per level


def test_request_result_from_timeline() -> None:
    r = request_result([0.05, 0.2, 0.9], [0.0, 0.5, 0.5], e2e_s=1.0)
    assert r.ok and r.ttfp_s == 0.2 and r.audio_s == 1.0
    assert r.rtf == pytest.approx(1.0)
    assert (r.underruns, r.stall_s) == (1, pytest.approx(0.2))  # plays 0.2-0.7, next at 0.9


def test_request_without_audio_is_an_error() -> None:
    r = request_result([0.1], [0.0], e2e_s=0.2)
    assert not r.ok and "NoAudio" in r.error


def test_aggregate_hand_computed() -> None:
    results = [
        RequestResult(ok=True, ttfp_s=0.1, e2e_s=2.0, audio_s=4.0),
        RequestResult(ok=True, ttfp_s=0.3, e2e_s=4.0, audio_s=4.0, underruns=2, stall_s=0.5),
        failed("HTTP 503: busy", 0.01),
    ]
    lv = aggregate("sse", 2, results, wall_s=4.0)
    assert (lv.requests, lv.errors) == (3, 1)
    assert lv.ttfp_ms["p50"] == pytest.approx(200.0)
    assert lv.ttfp_ms["p95"] == pytest.approx(290.0)  # 100 + 0.95 * 200
    assert lv.e2e_ms["p50"] == pytest.approx(3000.0)
    assert lv.rtf_p50 == pytest.approx(0.75)  # median of 0.5 and 1.0
    assert lv.x_realtime == pytest.approx(2.0)  # 8 audio s / 4 wall s
    assert lv.requests_per_s == pytest.approx(0.5)
    assert (lv.underruns, lv.underrun_stall_s, lv.streams_with_underrun) == (2, 0.5, 1)
    assert lv.error_samples == ["HTTP 503: busy"]


def test_all_failed_level_serialises_nan_as_null() -> None:
    row = aggregate("ws", 1, [failed("x", 1.0)], wall_s=1.0).to_json()
    assert row["ttfp_ms"]["p50"] is None and row["rtf_p50"] is None
    json.dumps(row, allow_nan=False)


def test_ratio() -> None:
    assert ratio(3.0, 1.5) == 2.0
    assert math.isnan(ratio(1.0, 0.0)) and math.isnan(ratio(math.nan, 1.0))


def test_table_has_ratio_columns_against_baseline() -> None:
    mine = [aggregate("sse", 4, [RequestResult(True, 0.1, 1.0, 4.0)], wall_s=1.0)]
    base = [aggregate("sse", 4, [RequestResult(True, 0.3, 1.0, 2.0)], wall_s=1.0)]
    text = table(mine, {"baseline": base})
    assert "×RT vs baseline" in text.splitlines()[0]
    assert text.splitlines()[-1].endswith("| 2.00× | 3.00× |")  # xRT 4/2, TTFP 300/100


def test_hop_table_gives_the_split_levels_cost_against_role_all() -> None:
    direct = [aggregate("sse", 1, [RequestResult(True, 0.300, 1.0, 4.0)], wall_s=1.0),
              aggregate("sse", 8, [RequestResult(True, 0.500, 1.0, 10.0)], wall_s=1.0)]  # fmt: skip
    split = [aggregate("sse", 1, [RequestResult(True, 0.304, 1.0, 4.0)], wall_s=1.0),
             aggregate("sse", 8, [RequestResult(True, 0.520, 1.0, 9.7)], wall_s=1.0),
             aggregate("ws", 1, [RequestResult(True, 0.400, 1.0, 4.0)], wall_s=1.0)]  # fmt: skip
    rows = hop_table(direct, split).splitlines()[2:]
    assert rows == [
        "| sse | 1 | 300 | 304 | +4.0 | 4.00 | 4.00 | +0.0 % |",
        "| sse | 8 | 500 | 520 | +20.0 | 10.00 | 9.70 | +3.0 % |",
    ]  # ws C1 has no role-all level to compare with: left out


# ---------------------------------------------------------------- texts, prompt, server command


# ---------------------------------------------------------------- overload (--overload K)


def test_refusal_of_names_the_refusal_or_none() -> None:
    assert refusal_of(failed('HTTP 429: {"code": "Overloaded"}', 0.01, 429, "Overloaded")) == "429"
    assert refusal_of(failed("upgrade refused: HTTP 503: {}", 0.01, 503, "Overloaded")) == "503"
    assert refusal_of(failed("task-failed Overloaded: too many", 0.01, code="Overloaded")) == "Overloaded"
    for other in (failed("HTTP 400: bad", 0.01, 400, "InvalidParameter"), failed("ReadTimeout: slow", 5.0),
                  failed("stream error: busy", 1.0, 200, "Overloaded"),  # mid-stream: it had been admitted
                  failed("task-failed NotFound: voice", 0.01, code="NotFound"), RequestResult(True, 0.1, 1.0, 1.0)):
        assert refusal_of(other) is None


def test_overload_stats_hand_computed() -> None:
    unloaded = aggregate("sse", 2, [RequestResult(True, 0.200, 1.0, 2.0), RequestResult(True, 0.300, 1.0, 2.0)],
                         wall_s=1.0)  # fmt: skip
    burst = [
        RequestResult(ok=True, ttfp_s=0.300, e2e_s=1.0, audio_s=2.0),
        RequestResult(ok=True, ttfp_s=0.700, e2e_s=1.5, audio_s=2.0),
        failed("HTTP 429: too many", 0.010, 429, "Overloaded"),
        failed("HTTP 429: too many", 0.030, 429, "Overloaded"),
        failed("HTTP 503: queue full", 0.020, 503, "Overloaded"),
        failed("ReadTimeout: no answer", 5.0),  # not a clean refusal: kept apart, its time not counted
    ]
    o = overload_stats("sse", 2, 3, burst, unloaded)
    assert (o.sent, o.admitted, o.refused, o.other_errors) == (6, 2, {"429": 2, "503": 1}, 1)
    assert o.refusal_ms["p50"] == pytest.approx(20.0)
    assert o.refusal_ms["p99"] == pytest.approx(29.8)  # 20 + 0.98 * 10
    assert o.admitted_ttfp_ms["p50"] == pytest.approx(500.0)
    assert o.unloaded_ttfp_ms == pytest.approx(250.0) and o.ttfp_ratio == pytest.approx(2.0)
    assert o.error_samples == ["ReadTimeout: no answer"]
    row = overload_table([o]).splitlines()[-1]
    assert row == "| sse | 2 | 6 | 2 | 2× 429, 1× 503 | 1 | 20.0 | 29.8 | 500 | 696 | 250 | 2.00× |"
    json.dumps(o.to_json(), allow_nan=False)


def test_overload_with_nothing_admitted_has_no_ratio() -> None:
    unloaded = aggregate("ws", 1, [RequestResult(True, 0.1, 1.0, 1.0)], wall_s=1.0)
    o = overload_stats("ws", 1, 10, [failed("task-failed Overloaded: full", 0.005, code="Overloaded")] * 10, unloaded)
    assert o.refused == {"Overloaded": 10} and o.admitted == 0 and math.isnan(o.ttfp_ratio)
    assert o.to_json()["ttfp_ratio"] is None
    assert "| 0 | 10× Overloaded | 0 |" in overload_table([o])


def test_cli_overload_burst_refuses_the_excess(tmp_path: Path) -> None:
    """`--overload 3` at C2 against a server admitting 2 (a short real run on a fake engine): the unloaded
    level, then 6 at once, 4 of them refused with 429."""
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    engine = BatchFakeEngine(delay_s=0.2, batch=2, max_waiting=10, chunk_chars=8)
    with running_server(tmp_path / "data", engine, max_inflight=2) as srv:
        load.main(["--url", srv.url, "--token", TOKEN, "--protocol", "sse", "--concurrency", "2", "--requests", "2",
                   "--texts", "short", "--warmup", "0", "--quiet", "--overload", "3", "--json", str(out_json),
                   "--markdown", str(out_md)])  # fmt: skip
    result = json.loads(out_json.read_text())
    [row] = result["overload"]
    assert (row["sent"], row["factor"], row["concurrency"]) == (6, 3, 2)
    assert row["admitted"] >= 2 and row["refused"].get("429", 0) >= 2 and row["other_errors"] == 0
    assert row["admitted"] + row["refused"]["429"] == 6
    assert row["refusal_ms"]["p99"] < row["admitted_ttfp_ms"]["p50"]  # refused before any audio could come
    assert "### overload: 3× the level's concurrency at once (main)" in out_md.read_text()
    assert engine.peak_batch <= 2


def test_markdown_without_overload_has_no_overload_section() -> None:
    lv = aggregate("sse", 1, [RequestResult(True, 0.1, 1.0, 1.0)], wall_s=1.0)
    meta = {"date": "d", "machine": "m", "commit": "c", "model": "x", "loop": "closed", "rate": None,
            "texts": "short", "sample_rate": 24000}  # fmt: skip
    assert "overload" not in markdown({"meta": meta}, {"main": [lv]}, {})


def test_split_pieces_rejoins_to_the_text() -> None:
    for mix in texts.TEXTS.values():
        for text in mix:
            for n in (1, 2, 3):
                pieces = texts.split_pieces(text, n)
                assert "".join(pieces) == text and 1 <= len(pieces) <= n and all(pieces)
    assert len(texts.split_pieces("Hello, thanks for calling.", 3)) == 3


def test_prompt_wav_is_deterministic_3s_16k() -> None:
    import io
    import wave

    data = load.prompt_wav()
    assert data == load.prompt_wav()
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getframerate(), w.getnframes(), w.getnchannels()) == (16000, 48000, 1)


def test_baseline_server_command_turns_batching_off() -> None:
    cmd = server_command(9, Path("/d"), "tok", max_batch=1)
    assert cmd[cmd.index("--max-batch") + 1] == "1"
    assert "--max-batch" not in server_command(9, Path("/d"), "tok")


def test_cli_rejects_bad_arguments() -> None:
    with pytest.raises(SystemExit):
        load.parse_args(["--spawn", "--split", "0"])
    with pytest.raises(SystemExit):
        load.parse_args(["--url", "http://x", "--null-engine"])  # only spawned servers can be null
    with pytest.raises(SystemExit):
        load.parse_args(["--protocol", "grpc", "--url", "http://x"])
    with pytest.raises(SystemExit):
        load.parse_args([])  # neither --url nor --spawn
    with pytest.raises(SystemExit):
        load.parse_args(["--url", "http://x", "--overload", "1"])  # K x C with K = 1 is no overload


# ---------------------------------------------------------------- real server, real CLI


def test_smoke_run_against_real_tiny_server(tmp_path: Path) -> None:
    """Two requests (one SSE, one WebSocket) through the CLI against `python -m server` on the tiny model."""
    with spawn_server(startup_timeout_s=90) as srv:
        out_json, out_png, out_md = tmp_path / "r.json", tmp_path / "r.png", tmp_path / "r.md"
        argv = ["--url", srv.url, "--token", srv.token, "--protocol", "sse,ws", "--concurrency", "1",
                "--requests", "1", "--texts", "short", "--warmup", "0", "--quiet", "--model", "tiny",
                "--json", str(out_json), "--plot", str(out_png), "--markdown", str(out_md)]  # fmt: skip
        load.main(argv)
        left = requests.get(f"{srv.url}/api/v1/audio/reference_audio", headers={"Authorization": f"Bearer {srv.token}"},
                            timeout=10).json()  # fmt: skip
    assert left == []  # the bench deleted its voice
    result = json.loads(out_json.read_text())
    assert [(lv["protocol"], lv["concurrency"]) for lv in result["levels"]] == [("sse", 1), ("ws", 1)]
    for lv in result["levels"]:
        assert lv["requests"] == 1 and lv["errors"] == 0, lv["error_samples"]
        assert 0 < lv["ttfp_ms"]["p50"] <= lv["e2e_ms"]["p50"]
        assert lv["x_realtime"] > 0 and lv["rtf_p50"] > 0 and lv["underruns"] >= 0
    assert set(result["meta"]) >= {"date", "machine", "commit", "model"}
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| sse | 1 | 1 | 0 |" in out_md.read_text()


def test_openai_request_times_each_streamed_piece(tmp_path: Path) -> None:
    """`openai`: raw pcm from /v1/audio/speech, its seconds exact and its pieces timed as they came."""
    text = "hello world, this is a test"
    with running_server(tmp_path, FakeEngine(chunk_chars=6, delay_s=0.02)) as srv, requests.Session() as session:
        target = load.Target("main", srv.url, TOKEN)
        voice = load.upload_voice(target)
        result = load.one_request("openai", session, target, voice, text, time.perf_counter(), 10.0)
        refused = load.one_request("openai", session, target, "no-such-voice", text, time.perf_counter(), 10.0)
    assert result.ok, result.error
    assert result.audio_s == pytest.approx(len(text) * SAMPLES_PER_CHAR / SAMPLE_RATE)
    assert 0 < result.ttfp_s < result.e2e_s  # the first of five engine chunks, not the whole body
    assert not refused.ok and refused.error.startswith("HTTP 400")


def test_cli_compares_the_openai_route_with_sse_in_one_run(tmp_path: Path) -> None:
    out_json = tmp_path / "r.json"
    with running_server(tmp_path / "data", FakeEngine(chunk_chars=6)) as srv:
        load.main(["--url", srv.url, "--token", TOKEN, "--protocol", "sse,openai", "--concurrency", "1",
                   "--requests", "1", "--texts", "short", "--warmup", "0", "--quiet", "--json", str(out_json)])
    levels = json.loads(out_json.read_text())["levels"]
    assert [lv["protocol"] for lv in levels] == ["sse", "openai"]
    assert all(lv["errors"] == 0 and lv["ttfp_ms"]["p50"] > 0 for lv in levels), levels
    assert levels[0]["audio_s"] == pytest.approx(levels[1]["audio_s"])  # the same text, the same audio


def test_split_setup_runs_through_a_frontend_and_reports_the_hop(tmp_path: Path) -> None:
    """`--spawn --split 1`: a --role all server and a frontend over one backend, one request each."""
    out_json = tmp_path / "r.json"
    argv = ["--spawn", "--split", "1", "--protocol", "sse", "--concurrency", "1", "--requests", "1",
            "--texts", "short", "--warmup", "0", "--quiet", "--json", str(out_json)]  # fmt: skip
    load.main(argv)
    result = json.loads(out_json.read_text())
    assert result["split-1"]["backends"] == 1
    assert result["split-1"]["url"] != result["meta"]["url"]
    for lv in (result["levels"][0], result["split-1"]["levels"][0]):
        assert lv["requests"] == 1 and lv["errors"] == 0, lv["error_samples"]
        assert lv["x_realtime"] > 0


def test_null_engine_split_sweeps_the_serving_path_alone(tmp_path: Path) -> None:
    """`--null-engine`: the same setups with bench.null_server (no model time), WebSocket this time."""
    out_json = tmp_path / "r.json"
    argv = ["--spawn", "--null-engine", "--split", "1", "--protocol", "ws", "--concurrency", "2",
            "--requests", "4", "--texts", "short", "--warmup", "0", "--quiet", "--json", str(out_json)]  # fmt: skip
    load.main(argv)
    result = json.loads(out_json.read_text())
    assert result["meta"]["model"].startswith("null engine")
    for lv in (result["levels"][0], result["split-1"]["levels"][0]):
        assert lv["requests"] == 4 and lv["errors"] == 0, lv["error_samples"]
        assert lv["audio_s"] > 0


def test_cli_baseline_levels_default_to_the_main_sweep() -> None:
    args = load.parse_args(
        ["--url", "http://x", "--protocol", "sse,ws", "--spawn-baseline", "--baseline-protocol", "sse"]
    )
    assert (args.protocol, args.baseline_protocol, args.baseline_concurrency) == (
        ["sse", "ws"],
        ["sse"],
        None,
    )
    with pytest.raises(SystemExit):
        load.parse_args(["--url", "http://x", "--baseline-protocol", "grpc"])
