"""Text -> token ids for the engine, run by the caller (the server's thread pool), never the decode thread.

Normalisation (wetext) costs ~1 s for 4,300 Chinese characters: done on the engine thread it would stall
every running stream that long. The voice transcript's prompt ids are computed once per job (every
sentence piece shares them) and kept per transcript, so a voice pays for its normalisation once.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

from frontend.prompt import llm_prompt_for, voice_speech_ids
from frontend.text_normalize import TextFrontend
from frontend.text_process import TextProcess
from scheduler.jobs import Mode, PreparedJob, SpeechJob

NOTHING_TO_SPEAK = "text has nothing to speak after normalisation"


class TextPreparer:
    """Thread-safe; `prepare` a whole job, `encode` one duplex piece (tokenised as is, not normalised).
    With a `process`, normalisation runs in that child process (see frontend/text_process.py)."""

    def __init__(self, text: TextFrontend, process: TextProcess | None = None, transcripts_kept: int = 1024) -> None:
        self.text = text
        self.process = process
        self._normaliser: TextFrontend | TextProcess = process if process is not None else text
        self._prompts: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._kept = transcripts_kept
        self._lock = threading.Lock()

    def prepare(self, job: SpeechJob) -> PreparedJob:
        try:
            prompt_text = self._prompt_text_ids(job)
        except ValueError as exc:  # e.g. instruct mode without an instruction
            return PreparedJob(job, refusal=str(exc))
        speech = tuple(voice_speech_ids(job.voice)) if job.mode == Mode.ZERO_SHOT else ()
        if job.text is None:
            return PreparedJob(job, prompt_text, speech)
        pieces = tuple(tuple(ids) for ids in self._normaliser.encode_pieces(job.text))
        if not pieces:
            return PreparedJob(job, prompt_text, speech, refusal=NOTHING_TO_SPEAK)
        return PreparedJob(job, prompt_text, speech, pieces)

    def encode(self, text: str) -> list[int]:
        return self.text.encode(text)

    def close(self) -> None:
        if self.process is not None:
            self.process.close()

    def _prompt_text_ids(self, job: SpeechJob) -> tuple[int, ...]:
        if job.mode != Mode.ZERO_SHOT:  # cross-lingual: none; instruct: the instruction, per request
            return tuple(llm_prompt_for(job.mode, job.voice, self.text, job.instruct).prompt_text_ids)
        key = job.voice.text  # the prompt text ids depend on the transcript alone
        with self._lock:
            ids = self._prompts.get(key)
            if ids is not None:
                self._prompts.move_to_end(key)
                return ids
        ids = tuple(self._normaliser.encode_whole(job.voice.text))  # as llm_prompt_for makes it
        with self._lock:
            self._prompts[key] = ids
            while len(self._prompts) > self._kept:
                self._prompts.popitem(last=False)
        return ids
