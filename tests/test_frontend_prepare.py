"""Text preparation before the engine: the same ids in-process and in the child process; refusals;
the transcript normalised once per voice."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from frontend.prepare import NOTHING_TO_SPEAK, TextPreparer
from frontend.prompt import llm_prompt_for
from frontend.text_normalize import TextFrontend
from frontend.text_process import TextProcess
from scheduler.jobs import Mode, SpeechJob, VoicePrompt

VOICE = VoicePrompt(speech_tokens=np.arange(30, dtype=np.int32), embedding=np.zeros(192, np.float32),
                    mel=np.zeros((60, 80), np.float32), text="希望你以后能够做的比我还好呦。")
TEXT = "第一句话，有数字123。Second sentence here! 第三句。"


@pytest.fixture(scope="module")
def frontend(tiny_model_dir: Path) -> TextFrontend:
    return TextFrontend(tiny_model_dir)


@pytest.fixture(scope="module")
def process(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    proc = TextProcess(tiny_model_dir)
    yield proc
    proc.close()


def _jobs() -> list[SpeechJob]:
    return [SpeechJob("z", Mode.ZERO_SHOT, VOICE, TEXT), SpeechJob("x", Mode.CROSS_LINGUAL, VOICE, TEXT),
            SpeechJob("i", Mode.INSTRUCT, VOICE, TEXT, instruct="用四川话说"),
            SpeechJob("d", Mode.ZERO_SHOT, VOICE, None)]


def test_prepared_ids_match_the_frontend_and_the_upstream_prompt(frontend: TextFrontend) -> None:
    prep = TextPreparer(frontend)
    for job in _jobs():
        got = prep.prepare(job)
        prompt = llm_prompt_for(job.mode, job.voice, frontend, job.instruct)
        assert got.refusal is None and got.prompt_text_ids == tuple(prompt.prompt_text_ids)
        assert got.prompt_speech_ids == tuple(prompt.prompt_speech_tokens)
        want = () if job.text is None else tuple(
            tuple(frontend.encode(p)) for p in frontend.normalize(job.text, split=True))
        assert got.pieces == want


def test_the_child_process_gives_the_same_ids(frontend: TextFrontend, process: TextProcess) -> None:
    local, remote = TextPreparer(frontend), TextPreparer(frontend, process)
    for job in _jobs():
        assert remote.prepare(job) == local.prepare(job)


def test_refusals_are_returned_not_raised(frontend: TextFrontend) -> None:
    prep = TextPreparer(frontend)
    assert prep.prepare(SpeechJob("e", Mode.ZERO_SHOT, VOICE, "。！")).refusal == NOTHING_TO_SPEAK
    assert "instruct" in (prep.prepare(SpeechJob("n", Mode.INSTRUCT, VOICE, TEXT, instruct=" ")).refusal or "")


def test_a_voice_transcript_is_normalised_once(frontend: TextFrontend, monkeypatch: pytest.MonkeyPatch) -> None:
    prep = TextPreparer(frontend)
    seen: list[str] = []
    original = TextFrontend.normalize
    monkeypatch.setattr(TextFrontend, "normalize",
                        lambda self, text, split=True: seen.append(text) or original(self, text, split))
    for i in range(3):
        prep.prepare(SpeechJob(f"z{i}", Mode.ZERO_SHOT, VOICE, "你好。"))
    assert seen.count(VOICE.text) == 1 and seen.count("你好。") == 3
