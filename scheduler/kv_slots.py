"""KV-cache slot manager: N fixed slots of `slot_len` positions (the runner preallocates the pool).

A slot is owned by one request from admission until its LLM stops (then it is freed at once,
while flow/vocoder chunks may still be pending). Lowest free slot first keeps runs reproducible.
"""
from __future__ import annotations

import heapq


class KVSlotManager:
    def __init__(self, num_slots: int, slot_len: int) -> None:
        if num_slots < 1 or slot_len < 2:
            raise ValueError(f"need num_slots >= 1 and slot_len >= 2, got {num_slots}, {slot_len}")
        self.num_slots = num_slots
        self.slot_len = slot_len
        self._free: list[int] = list(range(num_slots))
        self._used_positions: dict[int, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def total_tokens(self) -> int:
        return self.num_slots * self.slot_len

    @property
    def used_tokens(self) -> int:
        return sum(self._used_positions.values())

    def allocate(self) -> int | None:
        if not self._free:
            return None
        slot = heapq.heappop(self._free)
        self._used_positions[slot] = 0
        return slot

    def set_used(self, slot: int, positions: int) -> None:
        if slot not in self._used_positions:
            raise KeyError(f"slot {slot} is not allocated")
        self._used_positions[slot] = min(positions, self.slot_len)

    def free(self, slot: int) -> None:
        if slot not in self._used_positions:
            raise KeyError(f"slot {slot} is not allocated (double free?)")
        del self._used_positions[slot]
        heapq.heappush(self._free, slot)
