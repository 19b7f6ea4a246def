"""Text -> token ids for the engine, run by the caller (the server's thread pool), never the decode thread.

Normalisation (wetext) costs ~1 s for 4,300 Chinese characters: done on the engine thread it would stall
every running stream that long. A voice's transcript is not normalised here at all when the voice carries
its ids (`VoicePrompt.text_ids`, computed once at upload and stored with its features); only a voice
without them (a tool's, or one stored before the ids were kept) has its transcript normalised per job.
"""
from __future__ import annotations

from frontend.prompt import llm_prompt_for, transcript_ids, voice_speech_ids
from frontend.text_normalize import TextFrontend
from frontend.text_process import TextProcess
from scheduler.jobs import Mode, PreparedJob, SpeechJob, VoicePrompt

NOTHING_TO_SPEAK = "text has nothing to speak after normalisation"


class TextPreparer:
    """Thread-safe; `prepare` a whole job, `encode` one duplex piece (tokenised as is, not normalised).
    With a `process`, normalisation runs in that child process (see frontend/text_process.py)."""

    def __init__(self, text: TextFrontend, process: TextProcess | None = None) -> None:
        self.text = text
        self.process = process
        self._normaliser: TextFrontend | TextProcess = process if process is not None else text

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

    def transcript_ids(self, voice: VoicePrompt) -> tuple[int, ...]:
        """The voice's zero-shot prompt text ids: its kept `text_ids`, else the transcript normalised now."""
        return transcript_ids(voice, self._normaliser)

    def encode(self, text: str) -> list[int]:
        return self.text.encode(text)

    def close(self) -> None:
        if self.process is not None:
            self.process.close()

    def _prompt_text_ids(self, job: SpeechJob) -> tuple[int, ...]:
        if job.mode == Mode.ZERO_SHOT:  # the transcript (its ids kept with the voice, or derived now)
            return self.transcript_ids(job.voice)
        # cross-lingual: none; instruct: the instruction, per request (tokenised, not normalised)
        return tuple(llm_prompt_for(job.mode, job.voice, self.text, job.instruct).prompt_text_ids)
