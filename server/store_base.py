"""What the server needs from a reference-audio store; the local and the S3 store both satisfy it.

Every method may block (disk, network): call them on the worker pool, never on the event loop.
"""
from __future__ import annotations

from typing import Protocol

from scheduler.jobs import VoicePrompt
from server.store import VoiceRecord


class VoiceStoreBase(Protocol):
    def get(self, voice_id: str) -> VoiceRecord | None: ...

    def list(self, limit: int, order: str) -> list[VoiceRecord]: ...

    def load_prompt(self, voice_id: str) -> VoicePrompt | None: ...

    def add(self, filename: str, audio: bytes, text: str, prompt: VoicePrompt) -> VoiceRecord: ...

    def delete(self, voice_id: str) -> bool: ...

    def close(self) -> None: ...


class NoStore:
    """A backend's store: it has none (voices travel with the jobs), so every lookup misses."""

    def get(self, voice_id: str) -> VoiceRecord | None:
        return None

    def list(self, limit: int, order: str) -> list[VoiceRecord]:
        return []

    def load_prompt(self, voice_id: str) -> VoicePrompt | None:
        return None

    def add(self, filename: str, audio: bytes, text: str, prompt: VoicePrompt) -> VoiceRecord:
        raise RuntimeError("a backend keeps no voices")

    def delete(self, voice_id: str) -> bool:
        return False

    def close(self) -> None:
        pass
