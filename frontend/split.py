"""Sentence splitting and merging of normalised text (spec §3.1 `split_paragraph`).

Each returned piece is synthesised independently, so pieces are cut at sentence enders and then
greedily merged up to ~80 length units; a short tail (< 20) is glued to the previous piece.
Length units: characters for Chinese, Qwen tokens for English.
"""

from __future__ import annotations

from collections.abc import Callable

ZH_ENDERS = frozenset("。？！；：、.?!;")
EN_ENDERS = frozenset(".?!;:")
CLOSING_QUOTES = frozenset('"”')  # a closing quote right after an ender stays with its sentence

TOKEN_MAX_N = 80  # a piece grows past this only while it is still <= TOKEN_MIN_N
TOKEN_MIN_N = 60
MERGE_LEN = 20  # a last piece shorter than this joins the previous one


def cut_sentences(text: str, enders: frozenset[str]) -> list[str]:
    """Cut after every ender; text after the last ender is dropped (callers append one first)."""
    sentences: list[str] = []
    start = 0
    for i, ch in enumerate(text):
        if ch not in enders:
            continue
        if i > start:
            sentences.append(text[start:i] + ch)
        start = i + 1
        if i + 1 < len(text) and text[i + 1] in CLOSING_QUOTES:
            if sentences:
                sentences[-1] += text[i + 1]
            start = i + 2
    return sentences


def merge_sentences(
    sentences: list[str],
    length: Callable[[str], int],
    max_n: int = TOKEN_MAX_N,
    min_n: int = TOKEN_MIN_N,
    merge_len: int = MERGE_LEN,
) -> list[str]:
    pieces: list[str] = []
    current = ""
    for sentence in sentences:
        if length(current + sentence) > max_n and length(current) > min_n:
            pieces.append(current)
            current = ""
        current += sentence
    if current:
        if length(current) < merge_len and pieces:
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
    return merge_sentences(cut_sentences(text, enders), length)
