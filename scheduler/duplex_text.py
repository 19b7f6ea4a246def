"""A duplex job's text as segments, each small enough for one bistream request's KV slot. Torch-free.

One bistream request holds its prompt, all its text and all its speech in one KV slot; a long text
filled the slot and the request stopped there, its remaining text never spoken (the job still ended
"finished"). So a duplex job's text is cut into segments of at most `budget` text tokens, each one
bistream request, run one after another like a prepared job's sentence pieces (scheduler/job_book.py).
A push that would overflow the open segment starts the next one: cuts fall between pushes (the server
pushes a long text sentence by sentence, server/bridge.py), only a single push longer than the budget is
cut inside.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

# KV positions one text token of a segment may need: itself, the speech it is read as (a slow reader
# makes ~9 speech tokens of one), and what the bistream feeder feeds twice after a fill.
POSITIONS_PER_TEXT_TOKEN = 12
MIN_SEGMENT_TOKENS = 5  # one bistream text group (mix ratio 5 : 15), however small the slot


def segment_budget(slot_len: int, prefix_len: int) -> int:
    """Text tokens one segment may hold: what is left of the slot after the prompt, at the rate above."""
    return max(MIN_SEGMENT_TOKENS, (slot_len - prefix_len) // POSITIONS_PER_TEXT_TOKEN)


@dataclass
class DuplexText:
    budget: int
    segments: list[list[int]] = field(default_factory=lambda: [[]])
    finished: bool = False  # the client said no more text will come
    _taken: dict[int, int] = field(default_factory=dict)  # segment -> tokens handed on
    _closed: set[int] = field(default_factory=set)  # segments whose end was handed on

    def push(self, ids: Sequence[int]) -> None:
        rest = list(ids)
        if self.segments[-1] and len(self.segments[-1]) + len(rest) > self.budget:
            self.segments.append([])
        while rest:
            room = self.budget - len(self.segments[-1])
            if room <= 0:
                self.segments.append([])
                continue
            self.segments[-1].extend(rest[:room])
            rest = rest[room:]

    def finish(self) -> None:
        self.finished = True

    def start_segment(self) -> None:
        """Later text goes to a new segment (the request of the last one no longer takes any)."""
        if self.segments[-1]:
            self.segments.append([])

    def has(self, index: int) -> bool:
        """Segment `index` has text (so a request for it has something to say)."""
        return index < len(self.segments) and bool(self.segments[index])

    def is_closed(self, index: int) -> bool:
        return self.finished or index < len(self.segments) - 1

    def take(self, index: int) -> tuple[list[int], bool]:
        """Segment `index`'s text not handed on yet, and whether it is complete now (True once)."""
        segment = self.segments[index]
        start = self._taken.get(index, 0)
        self._taken[index] = len(segment)
        close = self.is_closed(index) and index not in self._closed
        if close:
            self._closed.add(index)
        return segment[start:], close

    @property
    def done(self) -> bool:
        """All text arrived and every segment with text was handed on, closed."""
        return self.finished and all(i in self._closed for i, s in enumerate(self.segments) if s)
