"""Sentence splitting and merging of normalised text (spec §3.1 `split_paragraph`).

Each returned piece is synthesised independently, so pieces are cut at sentence enders and then
greedily merged up to ~80 length units; a short tail (< 20) is glued to the previous piece.
Length units: characters for Chinese, Qwen tokens for English.

Deviations from upstream, so that no text is lost or cut apart:
- No piece is longer than MAX_PIECE_LEN: a longer sentence (a run without enders) is cut at soft
  punctuation, spaces or between ideographs (frontend/long_runs.py), and merging never passes the
  limit. Upstream hands such a run to the LLM whole, which runs out of KV slot before its end.
- A repeated ender ("？！", "。。。", "!!!") stays with its sentence; upstream drops all but the first.
- A "." "?" "!" ";" inside a run of ASCII (example.com/a?q=1, bob.smith@x.org) ends no sentence: upstream
  cut URLs and e-mail addresses into pieces.
The pieces therefore concatenate to the text exactly (plus the ender appended to a text without one).
"""

from __future__ import annotations

from collections.abc import Callable

from frontend.long_runs import iter_parts

ZH_ENDERS = frozenset("。？！；：、.?!;")
EN_ENDERS = frozenset(".?!;:")
CLOSING_QUOTES = frozenset('"”')  # a closing quote right after an ender stays with its sentence

TOKEN_MAX_N = 80  # a piece grows past this only while it is still <= TOKEN_MIN_N
TOKEN_MIN_N = 60
MERGE_LEN = 20  # a last piece shorter than this joins the previous one
# The engine's limit for one piece, in the same units. A piece and its speech share one KV slot with
# the prompt (scheduler.config.SchedulerConfig.slot_len, 2048 positions): 2 + a 30 s voice's 750 speech
# tokens + its transcript (~150) + 100 text tokens + the speech of 100 units (<= ~900 tokens even read
# slowly, 3 characters or 1.2 words a second) = ~1,900. tests/test_frontend_long_text.py checks the sum.
MAX_PIECE_LEN = 100


def cut_sentences(text: str, enders: frozenset[str]) -> list[str]:
    """Cut after every ender; text after the last ender is dropped (callers append one first).
    An ender right after another one joins the sentence before (or, at the start, makes its own).
    An ASCII ender between two ASCII characters with a letter or digit after it ends nothing: it is part of
    a URL, an address, a number or a version (example.com/a?q=1, bob.smith@x.org, 3.14, v1.2.3)."""
    sentences: list[str] = []
    start = 0
    for i, ch in enumerate(text):
        if ch not in enders or _inside_ascii_word(text, i):
            continue
        if i > start or not sentences:
            sentences.append(text[start:i] + ch)
        else:
            sentences[-1] += ch
        start = i + 1
        if i + 1 < len(text) and text[i + 1] in CLOSING_QUOTES:
            sentences[-1] += text[i + 1]
            start = i + 2
    return sentences


def _inside_ascii_word(text: str, i: int) -> bool:
    before = text[i - 1] if i > 0 else " "
    after = text[i + 1] if i + 1 < len(text) else " "
    return "!" <= before <= "~" and after.isascii() and after.isalnum()


def sentence_parts(text: str) -> list[str]:
    """`text` cut after each sentence ender of either language (and inside overlong runs, as the split
    does); unlike `cut_sentences`, the parts always add up to the text, its unfinished tail included."""
    enders = ZH_ENDERS | EN_ENDERS
    sentences = cut_sentences(text, enders)
    tail = text[sum(map(len, sentences)):]
    return [p for p in iter_parts([*sentences, tail], len, MAX_PIECE_LEN) if p]


def merge_sentences(
    sentences: list[str],
    length: Callable[[str], int],
    max_n: int = TOKEN_MAX_N,
    min_n: int = TOKEN_MIN_N,
    merge_len: int = MERGE_LEN,
    limit: int = MAX_PIECE_LEN,
) -> list[str]:
    pieces: list[str] = []
    current = ""
    for sentence in sentences:
        longer = length(current + sentence)
        if current and ((longer > max_n and length(current) > min_n) or longer > limit):
            pieces.append(current)
            current = ""
        current += sentence
    if current:
        if length(current) < merge_len and pieces and length(pieces[-1] + current) <= limit:
            pieces[-1] += current
        else:
            pieces.append(current)
    return pieces


def split_paragraph(text: str, lang: str, count_tokens: Callable[[str], int]) -> list[str]:
    """Split normalised `text` into synthesis pieces; `lang` is "zh" or "en"."""
    if not text:
        return []
    enders = ZH_ENDERS if lang == "zh" else EN_ENDERS
    if text[-1] not in enders:
        text += "。" if lang == "zh" else "."
    length: Callable[[str], int] = len if lang == "zh" else count_tokens
    sentences = list(iter_parts(cut_sentences(text, enders), length, MAX_PIECE_LEN))
    return merge_sentences(sentences, length)
