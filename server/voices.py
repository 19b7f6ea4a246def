"""In-memory cache of VoicePrompts (prompt features), in front of the store.

A delete drops the cache entry; a synthesis that already holds the VoicePrompt keeps it
alive (it is an immutable object), so deleting a voice in use is safe.
A voice stored before transcript ids were kept with its features (`VoicePrompt.text_ids`) gets
them once, when it is loaded into the cache (`complete`), not on every synthesis.
"""
from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable

from scheduler.jobs import EngineProtocol, Mode, SpeechJob, VoicePrompt
from server.store_base import VoiceStoreBase


def with_text_ids(engine: EngineProtocol, voice: VoicePrompt) -> VoicePrompt:
    """The voice with its transcript's token ids (the zero-shot LLM prompt text), as the engine's own
    text frontend computes them (its `prepare` of a zero-shot job without text: no pieces, only the
    prompt). Blocking (normalisation): a worker thread. A voice that has them is returned as is."""
    if voice.text_ids is not None:
        return voice
    prepared = engine.prepare(SpeechJob("voice-transcript", Mode.ZERO_SHOT, voice, text=None))
    return dataclasses.replace(voice, text_ids=tuple(prepared.prompt_text_ids))


class VoiceCache:
    def __init__(self, store: VoiceStoreBase, capacity: int,
                 complete: Callable[[VoicePrompt], VoicePrompt] | None = None) -> None:
        """`complete`: adds what a stored voice lacks (its transcript ids) as it is loaded."""
        self._store = store
        self._capacity = capacity
        self._complete = complete
        self._items: OrderedDict[str, VoicePrompt] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, voice_id: str) -> VoicePrompt | None:
        """May read the disk: call from a worker thread on a miss (`peek` first on the loop)."""
        hit = self.peek(voice_id)
        if hit is not None:
            return hit
        prompt = self._store.load_prompt(voice_id)
        if prompt is not None:
            if prompt.text_ids is None and self._complete is not None:
                prompt = self._complete(prompt)  # an older stored voice: its ids, once per load
            self.put(voice_id, prompt)
        return prompt

    def peek(self, voice_id: str) -> VoicePrompt | None:
        with self._lock:
            prompt = self._items.get(voice_id)
            if prompt is not None:
                self._items.move_to_end(voice_id)
            return prompt

    def put(self, voice_id: str, prompt: VoicePrompt) -> None:
        with self._lock:
            self._items[voice_id] = prompt
            self._items.move_to_end(voice_id)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)

    def drop(self, voice_id: str) -> None:
        with self._lock:
            self._items.pop(voice_id, None)


class FeatureCache:
    """A backend's voices by content hash (protocol.internal.voice_sha256), bounded LRU: the frontend
    sends a voice's features once, then only its hash, and again when the backend asks (`need_voice`)."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._items: OrderedDict[str, VoicePrompt] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, sha256: str) -> VoicePrompt | None:
        with self._lock:
            prompt = self._items.get(sha256)
            if prompt is not None:
                self._items.move_to_end(sha256)
            return prompt

    def put(self, sha256: str, prompt: VoicePrompt) -> None:
        with self._lock:
            self._items[sha256] = prompt
            self._items.move_to_end(sha256)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
