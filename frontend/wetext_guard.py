"""Around wetext: the faults of its grammars (wetext 0.1.x) that would lose or garble words, worked around.

- en raises on a blank line or a line break followed by spaces (the whole text then fell back to the
  built-in rules), and glues the lines of a text ("there.\\nNext" -> "there.Next", one sentence): the
  text is normalised line by line, the line breaks kept.
- both escape what they tag: a double quote comes back as \\" and a backslash doubled (en always, zh when
  the text holds a number: 'in 2019 "We"' -> 'in 两千零一十九 \\"We\\"'): unescaped.
- en drops the "one" of 1,000..1,999 ("$1,299" -> "thousand two hundred and ninety nine dollars"):
  frontend.numbers.restore_one_thousand puts it back.
"""
from __future__ import annotations

import re
from collections.abc import Callable

from frontend.numbers import restore_one_thousand

Normalize = Callable[[str], str]  # one wetext normaliser's call
_ESCAPED = re.compile(r'\\(["\\])')


def unescape(source: str, normalized: str) -> str:
    """`normalized` without the escapes wetext added (none when `source` itself holds such sequences)."""
    added = any(seq in normalized and seq not in source for seq in ('\\"', "\\\\"))
    return _ESCAPED.sub(r"\1", normalized) if added else normalized


def normalize_zh(normalize: Normalize, text: str) -> str:
    return unescape(text, normalize(text))


def normalize_en(normalize: Normalize, text: str) -> str:
    return "\n".join(_en_line(normalize, line) for line in text.split("\n"))


def _en_line(normalize: Normalize, line: str) -> str:
    if not line.strip():
        return line
    return restore_one_thousand(line, unescape(line, normalize(line)))
