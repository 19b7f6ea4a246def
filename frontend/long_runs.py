"""Cutting a sentence that is too long for one synthesis piece, at the most reasonable points it has.

A sentence longer than `limit` length units (characters for Chinese, tokens for English) would not fit
the engine's KV slot with its speech, and the LLM would stop mid-text: its end would never be spoken.
Such a sentence is cut into parts of roughly equal length, each within the limit. Where a part ends is
chosen in this order of preference, among the positions that keep the part between half a fair share
and the limit:
1. right after soft punctuation (a comma, a dash, an ellipsis, a closing bracket...);
2. at a space (between words);
3. between two CJK ideographs;
4. anywhere else that is safe.
Never (in any case) inside a run of ASCII without spaces (a word, a number, a URL, an e-mail address),
a special token (`[breath]`, `<|endofprompt|>`), a letter and its combining marks, or an emoji
sequence (ZWJ, variation selectors, skin tones).
Among the positions of the best kind, the one nearest the fair share wins. Nothing is added or dropped:
the parts concatenate to the sentence.
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterator

from frontend.tokenizer import COSYVOICE2_SPECIALS, QWEN_SPECIALS

Length = Callable[[str], int]

SOFT_PUNCTUATION = frozenset("，,、；;：:—–…)）」』】〕》〉\"”’")
_IDEOGRAPH = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_SPECIALS = re.compile("|".join(re.escape(s) for s in (*QWEN_SPECIALS, *COSYVOICE2_SPECIALS)) + r"|<\|[^|]*\|>")
_JOINERS = frozenset("\u200d\ufe0e\ufe0f")  # zero-width joiner, text/emoji variation selectors


def cut_long_sentence(sentence: str, length: Length, limit: int) -> list[str]:
    """`sentence` as parts of at most `limit` units each (one part when it already fits)."""
    parts: list[str] = []
    rest = sentence
    while length(rest) > limit:
        cut = _choose_cut(rest, length, limit)
        parts.append(rest[:cut])
        rest = rest[cut:]
    parts.append(rest)
    return parts


def _choose_cut(text: str, length: Length, limit: int) -> int:
    """Where the first part of `text` ends (0 < cut < len(text))."""
    parts_needed = -(-length(text) // limit)
    share = _longest_prefix(text, length, -(-length(text) // parts_needed))  # a balanced part's end
    end = max(1, _longest_prefix(text, length, limit))
    inside, edges = _special_tokens(text)
    allowed = [i for i in range(max(1, share // 2), end + 1) if i not in inside]
    for kind in (_after_soft_punctuation, _at_space, _between_ideographs, _safe):
        candidates = [i for i in allowed if i in edges or kind(text, i)]
        if candidates:
            return min(candidates, key=lambda i: (abs(i - share), -i))
    outside = [i for i in range(1, end + 1) if i not in inside]
    return outside[-1] if outside else end  # no safe place within reach: the last one not in a special token


def _longest_prefix(text: str, length: Length, units: int) -> int:
    """The largest n with length(text[:n]) <= units (binary search: length grows with the prefix)."""
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if length(text[:mid]) <= units:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _special_tokens(text: str) -> tuple[set[int], set[int]]:
    """(positions inside a special token such as `[breath]`, positions at the edge of one)."""
    inside: set[int] = set()
    edges: set[int] = set()
    for m in _SPECIALS.finditer(text):
        inside.update(range(m.start() + 1, m.end()))
        edges.update((m.start(), m.end()))
    return inside, edges


def _after_soft_punctuation(text: str, i: int) -> bool:
    return text[i - 1] in SOFT_PUNCTUATION and _safe(text, i)


def _at_space(text: str, i: int) -> bool:
    return text[i - 1].isspace() and not text[i].isspace()


def _between_ideographs(text: str, i: int) -> bool:
    return bool(_IDEOGRAPH.match(text[i - 1]) and _IDEOGRAPH.match(text[i]))


def _safe(text: str, i: int) -> bool:
    """Not inside a run of ASCII without spaces (a word, a number, a URL, an e-mail address), nor between
    a character and what modifies it."""
    before, after = text[i - 1], text[i]
    if _ascii_visible(before) and _ascii_visible(after):
        return False
    if before in _JOINERS or after in _JOINERS or unicodedata.combining(after):
        return False
    return not _is_emoji_modifier(after)


def _ascii_visible(ch: str) -> bool:
    return "!" <= ch <= "~"


def _is_emoji_modifier(ch: str) -> bool:
    return "\U0001f3fb" <= ch <= "\U0001f3ff" or "\U000e0020" <= ch <= "\U000e007f"  # skin tones, tag chars


def iter_parts(sentences: list[str], length: Length, limit: int) -> Iterator[str]:
    """Every sentence, the overlong ones cut (see `cut_long_sentence`)."""
    for sentence in sentences:
        yield from cut_long_sentence(sentence, length, limit)
