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


class BoundedLRU:
    """Voices by key, the `capacity` most recently used ones; thread-safe."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._items: OrderedDict[str, VoicePrompt] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> VoicePrompt | None:
        with self._lock:
            prompt = self._items.get(key)
            if prompt is not None:
                self._items.move_to_end(key)
            return prompt

    def put(self, key: str, prompt: VoicePrompt) -> None:
        with self._lock:
            self._items[key] = prompt
            self._items.move_to_end(key)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)

    def pop(self, key: str) -> None:
        with self._lock:
            self._items.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class VoiceCache:
    def __init__(self, store: VoiceStoreBase, capacity: int,
                 complete: Callable[[VoicePrompt], VoicePrompt] | None = None) -> None:
        """`complete`: adds what a stored voice lacks (its transcript ids) as it is loaded."""
        self._store = store
        self._complete = complete
        self._items = BoundedLRU(capacity)

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
        return self._items.get(voice_id)

    def put(self, voice_id: str, prompt: VoicePrompt) -> None:
        self._items.put(voice_id, prompt)

    def drop(self, voice_id: str) -> None:
        self._items.pop(voice_id)


class FeatureCache(BoundedLRU):
    """A backend's voices by content hash (protocol.internal.voice_sha256), bounded LRU: the frontend
    sends a voice's features once, then only its hash, and again when the backend asks (`need_voice`)."""
