"""A long duplex (WebSocket) text never runs out of KV slot: its text is spread over several bistream
requests, each within what fits a slot, their audio in order, and every text token reaches the LLM."""
from __future__ import annotations

import numpy as np

from scheduler.commands import FinishText, PushTokens
from scheduler.duplex_text import DuplexText, segment_budget
from scheduler.jobs import Finished
from tests.test_scheduler_engine_loop import Harness


def _text_fed(h: Harness) -> dict[str, list[int]]:
    """The text token ids each request's prefills gave the LLM, in order."""
    fed: dict[str, list[int]] = {}
    for plan in h.runner.llm_plans:
        for item in plan.prefills:
            for seg in item.segments:
                if seg.kind == "text":
                    fed.setdefault(item.request_id, []).extend(seg.ids)
    return fed


def test_every_token_of_a_long_duplex_text_reaches_the_llm_in_order() -> None:
    h = Harness()  # slot_len 1024: room for ~85 text tokens a request
    sink = h.submit("d", duplex=True)
    text = list(range(1000, 1600))  # 600 text tokens, in pushes of 1 to 40 like a streaming client
    sizes = [1 + (i * 7) % 40 for i in range(100)]
    start = 0
    for size in sizes:
        if start >= len(text):
            break
        h.loop.post(PushTokens("d", tuple(text[start:start + size])))
        start += size
    h.loop.post(PushTokens("d", tuple(text[start:])))
    h.loop.post(FinishText("d"))
    h.run(lambda: sink.ended, max_passes=200_000)
    assert isinstance(sink.events[-1], Finished)
    fed = _text_fed(h)
    requests = sorted(fed, key=lambda rid: int(rid.split("#")[1]))
    assert [t for rid in requests for t in fed[rid]] == text  # nothing lost, nothing twice, in order
    budget = segment_budget(1024, 2)
    assert len(requests) >= len(text) // budget and all(len(fed[r]) <= budget for r in requests)
    audio = sink.audio  # piece i's audio is filled with i + 1: the requests play one after another
    assert np.all(np.diff(audio) >= 0) and set(np.unique(audio)) == {float(i + 1) for i in range(len(requests))}


def test_duplex_text_is_cut_between_pushes_and_inside_only_an_oversized_one() -> None:
    d = DuplexText(budget=10)
    for ids in ([1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], list(range(12, 37))):
        d.push(ids)
    assert d.segments == [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11], list(range(12, 22)), list(range(22, 32)),
                          list(range(32, 37))]
    assert d.take(0) == ([1, 2, 3, 4, 5, 6, 7], True) and d.take(0) == ([], False)  # closed: said once
    assert d.take(4) == (list(range(32, 37)), False)  # the last one stays open until the text ends
    d.finish()
    assert d.take(4) == ([], True)
