"""In-memory cache of VoicePrompts (prompt features), in front of the store.

A delete drops the cache entry; a synthesis that already holds the VoicePrompt keeps it
alive (it is an immutable object), so deleting a voice in use is safe.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

from scheduler.jobs import VoicePrompt
from server.store_base import VoiceStoreBase


class VoiceCache:
    def __init__(self, store: VoiceStoreBase, capacity: int) -> None:
        self._store = store
        self._capacity = capacity
        self._items: OrderedDict[str, VoicePrompt] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, voice_id: str) -> VoicePrompt | None:
        """May read the disk: call from a worker thread on a miss (`peek` first on the loop)."""
        hit = self.peek(voice_id)
        if hit is not None:
            return hit
        prompt = self._store.load_prompt(voice_id)
        if prompt is not None:
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
