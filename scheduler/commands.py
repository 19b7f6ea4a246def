"""What other threads ask of the engine thread: frozen messages on its inbox, handled in order. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass

from scheduler.jobs import EventSink, PreparedJob


@dataclass(frozen=True)
class Submit:
    job: PreparedJob
    sink: EventSink


@dataclass(frozen=True)
class PushTokens:
    """Duplex: the token ids of one more text piece."""

    job_id: str
    ids: tuple[int, ...]


@dataclass(frozen=True)
class FinishText:
    job_id: str


@dataclass(frozen=True)
class Cancel:
    job_id: str


@dataclass(frozen=True)
class Stop:
    pass


Command = Submit | PushTokens | FinishText | Cancel | Stop
TextCommand = PushTokens | FinishText  # what a job still in the backlog keeps until its intake
