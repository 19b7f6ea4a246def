"""The frontend's routing policy (server/backend_pool.py): pure, on a fake clock."""
from __future__ import annotations

import pytest

from server.backend_pool import BackendPool, Outcome, backend_key, parse_url


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _pool(n: int = 2, **kw: object) -> tuple[BackendPool, Clock]:
    clock = Clock()
    return BackendPool([(f"10.0.0.{i + 1}", 8001) for i in range(n)], clock=clock, **kw), clock  # type: ignore[arg-type]


def test_least_outstanding_work_spreads_jobs_and_counts_reported_load() -> None:
    pool, _ = _pool(2)
    a, b = pool.backends()
    picks = []
    for _ in range(8):
        chosen = pool.choose()
        assert chosen is not None
        pool.started(chosen)
        picks.append(chosen.key)
    assert picks.count(a.key) == picks.count(b.key) == 4
    pool.report(a, running=3, waiting=2, can_admit=True)  # a is busy with other frontends' work
    assert pool.choose() is b
    for _ in range(4):
        pool.ended(b)
    pool.report(b, running=0, waiting=0, can_admit=True)
    assert pool.choose() is b and b.outstanding == 0 and a.outstanding == 9


def test_ejected_draining_or_full_backends_get_no_jobs() -> None:
    pool, _ = _pool(3)
    a, b, c = pool.backends()
    for _ in range(pool.eject_after):
        pool.outcome(a, Outcome.REFUSED)
    pool.checked(b, 503)
    assert a.ejected and a.ejections == 1 and b.draining
    assert pool.choose() is c
    pool.report(c, 1, 5, can_admit=False)
    assert pool.choose() is None and not pool.usable()


def test_passive_ejection_needs_consecutive_failures() -> None:
    pool, _ = _pool(1, eject_after=3)
    (a,) = pool.backends()
    pool.outcome(a, Outcome.RESET)
    pool.outcome(a, Outcome.BUSY)
    pool.outcome(a, Outcome.OK)  # an answer that works resets the count
    pool.outcome(a, Outcome.REFUSED)
    pool.outcome(a, Outcome.REFUSED)
    assert not a.ejected and a.failed == 4
    pool.outcome(a, Outcome.REFUSED)
    pool.outcome(a, Outcome.REFUSED)
    assert a.ejected and a.ejections == 1  # counted once per ejection


def test_health_checks_are_due_every_interval_and_readmit_on_200() -> None:
    pool, clock = _pool(2, check_s=2.0)
    a, b = pool.backends()
    assert pool.due() == [a, b]  # new backends: checked at once
    assert pool.due() == []
    clock.now += 1.9
    assert pool.due() == []
    clock.now += 0.1
    assert pool.due() == [a, b]
    for _ in range(3):
        pool.checked(a, None)  # no answer: counts toward ejection
    assert a.ejected and pool.choose() is b and a.failed == 0  # not among the jobs' failures
    pool.checked(a, 200, running=0, waiting=0)
    assert not a.ejected and a.failures == 0
    pool.checked(b, 503)
    assert pool.choose() is a
    pool.checked(b, 200, running=7, waiting=1)  # draining is over; its load came with the answer
    assert not b.draining and b.outstanding == 8 and pool.choose() is a


def test_retry_once_before_streaming_on_another_backend() -> None:
    pool, _ = _pool(2)
    a, b = pool.backends()
    for outcome in (Outcome.REFUSED, Outcome.RESET, Outcome.BUSY):
        assert pool.retryable(outcome, attempt=0, streamed=False, tried=[a]) is b
    assert pool.retryable(Outcome.REFUSED, attempt=1, streamed=False, tried=[a, b]) is None  # once only
    assert pool.retryable(Outcome.RESET, attempt=0, streamed=True, tried=[a]) is None  # a chunk went out
    assert pool.retryable(Outcome.OK, attempt=0, streamed=False, tried=[a]) is None
    pool.checked(b, 503)
    assert pool.retryable(Outcome.REFUSED, attempt=0, streamed=False, tried=[a]) is None  # nowhere to go


def test_dns_reconcile_adds_and_removes_without_touching_the_rest() -> None:
    pool, clock = _pool(0)
    assert pool.reconcile([("10.0.0.1", 8001), ("10.0.0.2", 8001)]) == (["10.0.0.1:8001", "10.0.0.2:8001"], [])
    a = pool.get("10.0.0.1:8001")
    assert a is not None
    pool.started(a)
    assert pool.reconcile([("10.0.0.1", 8001), ("fd00::3", 8001)]) == (["[fd00::3]:8001"], ["10.0.0.2:8001"])
    assert pool.get("10.0.0.1:8001") is a and a.inflight == 1  # kept as it was
    assert [b.key for b in pool.backends()] == ["10.0.0.1:8001", "[fd00::3]:8001"]
    assert pool.reconcile([]) == ([], [])  # a failed lookup keeps the table
    assert len(pool.backends()) == 2
    clock.now += 10
    assert pool.reconcile([("10.0.0.1", 8001), ("fd00::3", 8001)]) == ([], [])


def test_keys_and_urls() -> None:
    assert backend_key("::1", 80) == "[::1]:80" and backend_key("h", 1) == "h:1"
    assert parse_url("http://[::1]:8001/") == ("::1", 8001) and parse_url("http://b") == ("b", 80)
    with pytest.raises(ValueError):
        parse_url("https://b:1")
