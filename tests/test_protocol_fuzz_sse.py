"""SSE events under any text (tests/fuzz/drive_sse.py): one `data:` line each, read back unchanged by a real
SSE client (sseclient-py) from a stream cut anywhere, whatever the text holds."""
from __future__ import annotations

from functools import partial

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.sse import sse_event
from tests.fuzz.drive_sse import check_one_event, read_back, run_sse
from tests.fuzz.splits import bytewise, cut
from tests.fuzz.strategies import cuts, examples

LINE_BREAKS = "\n\r\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e"  # SSE ends lines at CR/LF; str.splitlines at all of them
texts = st.text(st.one_of(st.characters(codec="utf-8"), st.sampled_from(LINE_BREAKS + "\x00:")), max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3), max_leaves=10)


@examples(80)
@given(texts, cuts)
def test_every_event_reads_back_whatever_its_text(text: str, extra_cuts: list[int]) -> None:
    run_sse(text, partial(cut, cuts=extra_cuts))


@examples(40)
@given(st.lists(st.dictionaries(texts, json_values, max_size=4), min_size=1, max_size=4), cuts)
def test_any_json_object_is_one_event(objects: list[dict], extra_cuts: list[int]) -> None:
    encoded = [sse_event(obj) for obj in objects]
    for event in encoded:
        check_one_event(event)
    assert read_back(cut(b"".join(encoded), extra_cuts)) == objects


@pytest.mark.parametrize("text", ["a\nb", "a\r\nb", "\r", "\n\n", "data: x\n\ndata: y", "\u2028", "\x00", "😀"])
def test_line_breaks_in_text_stay_inside_the_one_line(text: str) -> None:
    event = sse_event({"t": text})
    check_one_event(event)
    assert read_back(bytewise(event)) == [{"t": text}]
