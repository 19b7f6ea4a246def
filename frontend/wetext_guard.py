"""Around wetext: the faults of its grammars (wetext 0.1.x) that would lose or garble words, worked around.

- en raises on a blank line or a line break followed by spaces (the whole text then fell back to the
  built-in rules), and glues the lines of a text ("there.\\nNext" -> "there.Next", one sentence): the
  text is normalised line by line, the line breaks kept.
- both escape what they tag: a double quote comes back as \\" and a backslash doubled (en always, zh when
  the text holds a number: 'in 2019 "We"' -> 'in 两千零一十九 \\"We\\"'): unescaped.
- zh reads a unit abbreviation at the start of an English word after a number: "24 hours" -> "二十四小时ours",
  "$5 million" -> "五英里llion": a zero-width space keeps such a word apart while wetext runs (a word it
  reads whole as a unit, "5 km" -> "五公里", is left to it).
- zh reads a thousands separator as a pause between two numbers ("$1,299.50" -> "一美元,两百九十九点五零",
  one dollar, two hundred and ninety-nine point five zero): the separators go before wetext zh runs.
- zh reads the digits of a URL or an e-mail address as Chinese numbers, and its dots become sentence
  ends ("example.com/2024-q3.html" -> "example.com/两千零二十四-q三。html"): they pass wetext zh untouched.
- en drops the "one" of 1,000..1,999 ("$1,299" -> "thousand two hundred and ninety nine dollars"):
  frontend.numbers.restore_one_thousand puts it back.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache

from frontend.numbers import restore_one_thousand

Normalize = Callable[[str], str]  # one wetext normaliser's call
_ESCAPED = re.compile(r'\\(["\\])')


def unescape(source: str, normalized: str) -> str:
    """`normalized` without the escapes wetext added (none when `source` itself holds such sequences)."""
    added = any(seq in normalized and seq not in source for seq in ('\\"', "\\\\"))
    return _ESCAPED.sub(r"\1", normalized) if added else normalized


_NUMBER_THEN_WORD = re.compile(r"(\d\s*)([A-Za-z]{2,})")
_ASCII_LETTER = re.compile(r"[A-Za-z]")
_THOUSANDS_SEPARATOR = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_APART = "\u200b"  # zero-width space: wetext keeps it, and no unit rule reaches across it


_ADDRESS = re.compile(
    r"(?:https?://|ftp://|www\.)[A-Za-z0-9\-._~:/?#@!$&'*+,;=%]*[A-Za-z0-9/_~#=%\-]"  # a URL, no end punctuation
    r"|[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+", re.IGNORECASE)  # an e-mail address


def normalize_zh(normalize: Normalize, text: str) -> str:
    """`normalize` (wetext zh) on `text`, URLs and e-mail addresses as they are, numbers without thousands
    separators, the English words after numbers kept whole. Zero-width spaces are removed from the result (those of `text` too: they say
    nothing)."""
    def keep_apart(m: re.Match[str]) -> str:
        number, word = m.group(1), m.group(2)
        return number + word if _is_unit(normalize, word) else number + _APART + word

    def guarded(part: str) -> str:
        return normalize(_NUMBER_THEN_WORD.sub(keep_apart, _THOUSANDS_SEPARATOR.sub("", part)))

    return unescape(text, _around_addresses(guarded, text)).replace(_APART, "")


def _around_addresses(normalize: Normalize, text: str) -> str:
    """`normalize` on `text` with each URL and e-mail address stood in for by a mark it leaves alone."""
    addresses = _ADDRESS.findall(text)
    if not addresses:
        return normalize(text)
    mark = next(chr(c) for c in range(0xE000, 0xF900) if chr(c) not in text)  # a private-use character
    out = normalize(_ADDRESS.sub(mark, text))
    if out.count(mark) != len(addresses):  # wetext dropped or repeated a mark: normalise them too
        return normalize(text)
    restore = iter(addresses)
    return re.sub(mark, lambda _: next(restore), out)


@lru_cache(maxsize=4096)
def _is_unit(normalize: Normalize, word: str) -> bool:
    """wetext reads `word` after a number as a unit, whole ("km" -> "公里"; not "hours" -> "小时ours")."""
    return _ASCII_LETTER.search(normalize(f"1 {word}")) is None


def normalize_en(normalize: Normalize, text: str) -> str:
    return "\n".join(_en_line(normalize, line) for line in text.split("\n"))


def _en_line(normalize: Normalize, line: str) -> str:
    if not line.strip():
        return line
    return restore_one_thousand(line, unescape(line, normalize(line)))
