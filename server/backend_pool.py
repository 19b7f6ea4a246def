"""The frontend's table of backends and its routing policy. Pure: no I/O, no torch, no event loop.

`RemoteEngine` (server/remote_engine.py) does the talking and tells the pool what happened; the pool
decides. Everything here runs on the event loop, so nothing is locked.

- **Choose**: a new job goes to the usable backend (not ejected, not draining, not full) with the least
  outstanding work: the jobs this frontend has in flight there plus the `running + waiting` the backend
  last reported (on every chunk / ending, and in its health answer). Ties: the one given fewest jobs.
- **Passive ejection**: `eject_after` consecutive failures (connection refused or reset, 503,
  `failed(Overloaded)`) eject a backend; any answer that works resets the count.
- **Active checks**: each backend's health check is due every `check_s` (`due(now)`); an answer 200
  re-admits it (and clears draining), 503 marks it draining (no new jobs), no answer counts as a failure.
- **Retry**: `retryable(...)`: once, before the first chunk, for the failures above, when another backend
  is usable.
- **DNS**: `reconcile(current, resolved)` says which addresses to add and remove.
"""
from __future__ import annotations

import time
import urllib.parse
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from enum import Enum


class Outcome(Enum):
    """What happened to a job's attempt on a backend, before or without its first chunk."""

    OK = "ok"  # the backend answered (a chunk, or an ending of its own)
    REFUSED = "refused"  # connection refused / unreachable
    RESET = "reset"  # connection closed or reset before the first chunk
    BUSY = "busy"  # HTTP 503/429 at the handshake, or failed(Overloaded)


RETRYABLE = frozenset({Outcome.REFUSED, Outcome.RESET, Outcome.BUSY})


def backend_key(host: str, port: int) -> str:
    """`host:port`, IPv6 hosts in brackets: the label in metrics and the key in the table."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(eq=False)
class Backend:
    host: str
    port: int
    # load
    inflight: int = 0  # this frontend's jobs there now
    running: int = 0  # as the backend last reported
    waiting: int = 0
    can_admit: bool = True
    # health
    ejected: bool = False
    draining: bool = False
    failures: int = 0  # consecutive
    next_check: float = 0.0  # clock time the next health check is due
    # counters (metrics)
    jobs: int = 0
    failed: int = 0  # job attempts that failed here (refused, reset, busy)
    retries: int = 0  # jobs retried elsewhere after failing here
    ejections: int = 0
    chunks: int = 0  # audio chunks received from it (a job with one cannot be retried elsewhere)
    sent_voices: dict[str, None] = field(default_factory=dict)  # voice hashes sent here (insertion order)

    @property
    def key(self) -> str:
        return backend_key(self.host, self.port)

    @property
    def url(self) -> str:
        return f"http://{self.key}"

    @property
    def usable(self) -> bool:
        return not self.ejected and not self.draining and self.can_admit

    @property
    def outstanding(self) -> int:
        return self.inflight + self.running + self.waiting


def parse_url(url: str) -> tuple[str, int]:
    """`http://host:port` -> (host, port); ValueError otherwise."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"backend URL must be http://host:port: {url!r}")
    return parts.hostname, parts.port or 80


class BackendPool:
    def __init__(self, addresses: Iterable[tuple[str, int]] = (), eject_after: int = 3, check_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if eject_after < 1 or check_s <= 0:
            raise ValueError("eject_after must be >= 1 and check_s > 0")
        self.eject_after = eject_after
        self.check_s = check_s
        self.clock = clock
        self._table: dict[str, Backend] = {}
        for host, port in addresses:
            self.add(host, port)

    # ---- the table ----
    def backends(self) -> list[Backend]:
        return list(self._table.values())

    def get(self, key: str) -> Backend | None:
        return self._table.get(key)

    def add(self, host: str, port: int) -> Backend:
        """A new backend is usable at once and its first health check is due now."""
        backend = self._table.get(backend_key(host, port))
        if backend is None:
            backend = self._table[backend_key(host, port)] = Backend(host, port, next_check=self.clock())
        return backend

    def remove(self, key: str) -> None:
        """Gone from routing and metrics; its jobs in flight keep their Backend object to the end."""
        self._table.pop(key, None)

    def reconcile(self, resolved: Iterable[tuple[str, int]]) -> tuple[list[str], list[str]]:
        """Make the table the resolved addresses (a DNS answer): (added keys, removed keys). An empty answer
        (a failed lookup) changes nothing: keep routing to what we had."""
        wanted = {backend_key(h, p): (h, p) for h, p in resolved}
        if not wanted:
            return [], []
        added = [k for k in wanted if k not in self._table]
        removed = [k for k in self._table if k not in wanted]
        for key in added:
            self.add(*wanted[key])
        for key in removed:
            self.remove(key)
        return added, removed

    # ---- routing ----
    def choose(self, exclude: Collection[Backend] = ()) -> Backend | None:
        """The usable backend with the least outstanding work (None: there is none)."""
        # a snapshot first: RemoteEngine.extract_prompt reads from a worker thread while the loop may edit
        usable = [b for b in tuple(self._table.values()) if b.usable and b not in exclude]
        if not usable:
            return None
        return min(usable, key=lambda b: (b.outstanding, b.jobs))

    def usable(self) -> bool:
        return any(b.usable for b in self._table.values())

    def started(self, backend: Backend) -> None:
        backend.inflight += 1
        backend.jobs += 1

    def ended(self, backend: Backend) -> None:
        backend.inflight -= 1

    def report(self, backend: Backend, running: int, waiting: int, can_admit: bool) -> None:
        """The load a backend reported (with a chunk, an ending, or its health answer)."""
        backend.running, backend.waiting, backend.can_admit = running, waiting, can_admit

    # ---- outcomes ----
    def outcome(self, backend: Backend, outcome: Outcome) -> None:
        if outcome is Outcome.OK:
            backend.failures = 0
            return
        backend.failed += 1
        self._failure(backend)

    def _failure(self, backend: Backend) -> None:
        backend.failures += 1
        if backend.failures >= self.eject_after and not backend.ejected:
            backend.ejected = True
            backend.ejections += 1

    def retryable(self, outcome: Outcome, attempt: int, streamed: bool, tried: Collection[Backend]) -> Backend | None:
        """Where to retry a failed attempt, or None: only the first attempt, only before any chunk reached
        the client, only for refused / reset / busy, only on a usable backend not tried yet."""
        if attempt > 0 or streamed or outcome not in RETRYABLE:
            return None
        return self.choose(exclude=tried)

    def retried(self, backend: Backend) -> None:
        backend.retries += 1

    # ---- active health checks ----
    def due(self) -> list[Backend]:
        """The backends whose health check is due now; each is scheduled `check_s` later."""
        now = self.clock()
        due = [b for b in self._table.values() if b.next_check <= now]
        for b in due:
            b.next_check = now + self.check_s
        return due

    def checked(self, backend: Backend, status: int | None, running: int = 0, waiting: int = 0,
                can_admit: bool = True) -> None:
        """A health answer: 200 (ready: re-admit, load), 503 (draining: no new jobs), None (no answer)."""
        if status == 200:
            backend.ejected = backend.draining = False
            backend.failures = 0
            self.report(backend, running, waiting, can_admit)
        elif status == 503:
            backend.draining = True
        else:  # counts toward ejection, not among the jobs' failures
            self._failure(backend)
