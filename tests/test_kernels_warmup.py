"""Warm-up against stand-in engines: failures and time-outs are logged, never raised."""
from __future__ import annotations

import io
import logging

from kernels.runtime.warmup import SPEECH_TOKENS, synthetic_voice, warm_up
from scheduler.jobs import ErrorCode, Failed, PreparedJob, SpeechJob
from tests.fakes import FakeEngine


class _Silent:
    """Accepts jobs and never answers."""

    sample_rate = 24000

    def prepare(self, job: SpeechJob) -> PreparedJob:
        return PreparedJob(job)

    def submit(self, job: PreparedJob, sink: object) -> None:
        return None


class _Failing(_Silent):
    def submit(self, job: PreparedJob, sink) -> None:  # type: ignore[no-untyped-def]
        sink(Failed(job.request_id, ErrorCode.INTERNAL_ERROR, "boom"))


def test_synthetic_voice_has_the_prompt_shapes() -> None:
    v = synthetic_voice()
    assert v.speech_tokens.shape == (50,) and v.mel.shape == (100, 80) and v.embedding.shape == (192,)
    assert v.speech_tokens.max() < 6561


def test_warm_up_over_a_working_engine_logs_its_time(caplog) -> None:
    bar = io.StringIO()
    with caplog.at_level(logging.INFO, logger="kernels.runtime.warmup"):
        warm_up(FakeEngine(), timeout_s=30, progress_file=bar)
    assert "warm-up: 2 requests in" in caplog.text
    assert f"/{2 * SPEECH_TOKENS / 25:.1f}" in bar.getvalue()


def test_a_failing_warm_up_is_logged_and_start_up_goes_on(caplog) -> None:
    with caplog.at_level(logging.ERROR, logger="kernels.runtime.warmup"):
        warm_up(_Failing(), timeout_s=5, progress_file=io.StringIO())
    assert "warm-up did not complete (boom; boom)" in caplog.text


def test_a_stuck_warm_up_times_out(caplog) -> None:
    with caplog.at_level(logging.ERROR, logger="kernels.runtime.warmup"):
        seconds = warm_up(_Silent(), timeout_s=0.2, progress_file=io.StringIO())
    assert seconds < 5 and "timed out" in caplog.text
