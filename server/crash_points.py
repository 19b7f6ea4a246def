"""Named points on the stores' write and delete paths: where a crash leaves the most interesting state.

In the server `reached` does nothing. The crash tests (tests/test_server_store_crashes.py) replace it, in a child
process, with a hook that SIGKILLs the process at the k-th point, for every k: the points are the map of
what a crash can interrupt, and the tests prove that every one of them recovers.
"""
from __future__ import annotations


def reached(point: str) -> None:
    """The store just finished `point` (e.g. "audio renamed", "row committed")."""
