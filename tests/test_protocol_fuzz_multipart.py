"""multipart/form-data under fuzzed input (tests/fuzz/drive_multipart.py): a form or a 400/413/415, never
another exception; the same answer whole, byte by byte and cut anywhere (MultipartReader fed in pieces)."""
from __future__ import annotations

import requests
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.drive_multipart import run_multipart
from tests.fuzz.splits import bytewise, cut
from tests.fuzz.strategies import cuts, examples, mutated

BOUNDARY = "B0UNDARY"
CTYPE = f"multipart/form-data; boundary={BOUNDARY}"
TOKENS = [b"\r\n", b"\r\n\r\n", b"--", b"--B0UNDARY", b"\r\n--B0UNDARY\r\n", b"\r\n--B0UNDARY--\r\n",
          b'Content-Disposition: form-data; name="text"\r\n', b'; filename="a.wav"', b"Content-Type: x/y\r\n",
          b"\x00", b"\xff\xfe", b'"', b";", b"=", b":", b"x" * 50]

names = st.text(st.characters(codec="utf-8", exclude_characters='"\\\r\n'), min_size=1, max_size=8)


def encode_form(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[str, bytes]:
    """Encoded as the document's `requests` upload example does: (Content-Type, body)."""
    req = requests.Request("POST", "http://x/", files=files, data=fields).prepare()
    return req.headers["Content-Type"], req.body  # type: ignore[return-value]


forms = st.builds(encode_form, st.dictionaries(names, st.text(max_size=20), max_size=2),
                  st.dictionaries(names, st.tuples(names, st.binary(max_size=100)), min_size=1, max_size=2))


def same_whatever_the_cuts(body: bytes, content_type: str, extra_cuts: list[int]) -> tuple:
    whole = run_multipart([body], content_type)
    assert run_multipart(bytewise(body), content_type) == whole
    assert run_multipart(cut(body, extra_cuts), content_type) == whole
    return whole


@examples(40)
@given(forms, cuts)
def test_a_form_reads_back_the_same_however_it_is_cut(form: tuple[str, bytes], extra_cuts: list[int]) -> None:
    content_type, body = form
    result = same_whatever_the_cuts(body, content_type, extra_cuts)
    assert result[0] == "form" or result[2] == 413, result  # only the size limits refuse a valid form


@examples(300)
@given(mutated(st.just(
    b"--B0UNDARY\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
    b"Content-Type: audio/wav\r\n\r\nRIFF\x00\r\n--B0UNDARY\r\n"
    b"Content-Disposition: form-data; name=\"text\"\r\n\r\nhello\r\n--B0UNDARY--\r\n"), TOKENS, max_edits=4), cuts)
def test_a_mutated_body_is_accepted_or_refused_the_same_however_it_is_cut(body: bytes, extra_cuts: list[int]) -> None:
    same_whatever_the_cuts(body, CTYPE, extra_cuts)


@examples(60)
@given(st.text(st.characters(codec="latin-1"), max_size=60), st.binary(max_size=120), cuts)
def test_any_content_type_and_body_is_accepted_or_refused(content_type: str, body: bytes,
                                                          extra_cuts: list[int]) -> None:
    """Content-Type as HttpRequest hands it over: latin-1 text, anything at all."""
    same_whatever_the_cuts(body, "multipart/form-data; boundary=" + content_type, extra_cuts)
    same_whatever_the_cuts(body, content_type, extra_cuts)
