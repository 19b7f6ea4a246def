"""Text preparation before the engine: the same ids in-process and in the child process; refusals;
a voice's transcript never normalised at synthesis time when the voice carries its ids."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from frontend.prepare import NOTHING_TO_SPEAK, TextPreparer
from frontend.prompt import llm_prompt_for, with_transcript_ids
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


class CountingNormaliser:
    """The frontend's normalise-then-encode calls, counted by text (stands in for the child process)."""

    def __init__(self, frontend: TextFrontend) -> None:
        self.frontend = frontend
        self.whole: list[str] = []
        self.pieces: list[str] = []

    def encode_whole(self, text: str) -> list[int]:
        self.whole.append(text)
        return self.frontend.encode_whole(text)

    def encode_pieces(self, text: str) -> list[list[int]]:
        self.pieces.append(text)
        return self.frontend.encode_pieces(text)


def test_kept_transcript_ids_are_the_ids_prepare_would_derive(frontend: TextFrontend) -> None:
    kept = with_transcript_ids(VOICE, frontend)
    assert kept.text_ids == tuple(frontend.encode_whole(VOICE.text)) and kept.text_ids
    assert with_transcript_ids(kept, frontend) is kept
    prep = TextPreparer(frontend)
    for job in _jobs():  # every mode gives the same ids whether the voice carries them or not
        assert prep.prepare(SpeechJob(job.request_id, job.mode, kept, job.text, job.instruct)).prompt_text_ids \
            == prep.prepare(job).prompt_text_ids


def test_a_voice_with_ids_is_never_normalised_at_synthesis(frontend: TextFrontend) -> None:
    counting = CountingNormaliser(frontend)
    prep = TextPreparer(frontend, counting)  # type: ignore[arg-type]
    ids = (11, 22, 33)  # not what the transcript normalises to: prepare must take them as they are
    voice = VoicePrompt(VOICE.speech_tokens, VOICE.embedding, VOICE.mel, VOICE.text, text_ids=ids)
    for i in range(3):
        got = prep.prepare(SpeechJob(f"z{i}", Mode.ZERO_SHOT, voice, "你好。"))
        assert got.prompt_text_ids == ids and got.prompt_speech_ids == tuple(range(30))
    assert prep.prepare(SpeechJob("d", Mode.ZERO_SHOT, voice, None)).prompt_text_ids == ids  # duplex
    # Cross-lingual takes no prompt text, instruct its instruction: the kept ids change neither.
    assert prep.prepare(SpeechJob("x", Mode.CROSS_LINGUAL, voice, "你好。")).prompt_text_ids == ()
    instruct = prep.prepare(SpeechJob("i", Mode.INSTRUCT, voice, "你好。", instruct="用四川话说"))
    assert instruct.prompt_text_ids == tuple(frontend.encode("用四川话说<|endofprompt|>"))
    assert counting.whole == [] and counting.pieces == ["你好。"] * 5  # only the text to speak


def test_a_voice_without_ids_falls_back_to_its_transcript(frontend: TextFrontend) -> None:
    counting = CountingNormaliser(frontend)
    prep = TextPreparer(frontend, counting)  # type: ignore[arg-type]
    for i in range(2):
        got = prep.prepare(SpeechJob(f"z{i}", Mode.ZERO_SHOT, VOICE, "你好。"))
        assert got.prompt_text_ids == tuple(frontend.encode_whole(VOICE.text))
    prep.prepare(SpeechJob("x", Mode.CROSS_LINGUAL, VOICE, "你好。"))
    assert counting.whole == [VOICE.text, VOICE.text]  # per zero-shot job; never for cross-lingual
