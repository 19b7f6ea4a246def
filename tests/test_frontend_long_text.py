"""A 3,000-character text (tests/long_text.py) through the real text frontend and TextPreparer (wetext when
installed, the tiny model's tokenizer): nothing of the normalised text is lost or repeated, every piece
fits the engine, and the long runs are cut where a reader would pause.

What normalisation itself may drop, by design (upstream's rules, frontend/text_normalize.py): spaces
next to non-ASCII characters, line breaks in Chinese text, the brackets （）【】 and backticks, and a text
part made only of punctuation and symbols (emoji), which is silent (`SplitText.silent`). The split drops
nothing: its parts concatenate to the normalised text, plus the ender appended to a text without one.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from frontend.long_runs import SOFT_PUNCTUATION
from frontend.prepare import TextPreparer
from frontend.split import MAX_PIECE_LEN
from frontend.text_normalize import SplitText, TextFrontend, is_only_punctuation
from scheduler.config import SchedulerConfig
from scheduler.jobs import Mode, SpeechJob, VoicePrompt
from tests.long_text import EN_RUN, EN_TEXT, TEXT, ZH_RUN

IDEOGRAPH = re.compile(r"[\u4e00-\u9fff]")
ADDRESSES = ("https://www.example.com/reports/2024-q3.html", "investor.relations@example.com",
             "https://www.example.com/investors", "ir@example.com", "support@example.org")
# The worst case one piece must fit in a KV slot (frontend/split.py, MAX_PIECE_LEN): the longest voice
# (30 s: 750 speech tokens), a long transcript, and the piece's speech read slowly (3 characters or
# 1.2 words a second, 25 speech tokens a second: <= 9 speech tokens per length unit).
PROMPT_SPEECH_MAX, PROMPT_TEXT_MAX, SPEECH_TOKENS_PER_UNIT = 750, 150, 9


@pytest.fixture(scope="module")
def frontend(tiny_model_dir: Path) -> TextFrontend:
    return TextFrontend(tiny_model_dir)


@pytest.fixture(scope="module")
def splits(frontend: TextFrontend) -> dict[str, SplitText]:
    """The mixed text (the zh path: it holds Chinese) and its English paragraphs alone (the en path)."""
    return {"zh": frontend.split(TEXT), "en": frontend.split(EN_TEXT)}


def _units(frontend: TextFrontend, lang: str, piece: str) -> int:
    return len(piece) if lang == "zh" else len(frontend.encode(piece))


def _cuts(parts: tuple[str, ...]) -> list[int]:
    """Offsets in the normalised text where one piece ends and the next begins."""
    return list(np.cumsum([len(p) for p in parts])[:-1])


def test_the_texts_are_what_the_test_says() -> None:
    assert 2_900 <= len(TEXT) <= 3_100 and len(ZH_RUN) >= 600 and len(EN_RUN) >= 600
    assert not re.search(r"[，。！？；：、,.!?;:]", ZH_RUN + EN_RUN)  # no punctuation at all


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_the_pieces_add_up_to_the_normalised_text(splits: dict[str, SplitText], lang: str) -> None:
    split = splits[lang]
    joined = "".join(split.parts)
    assert joined in (split.normalized, split.normalized + ("。" if lang == "zh" else "."))
    assert all(is_only_punctuation(p) for p in split.silent)
    assert split.silent == []  # the emoji-only line joins its neighbours: nothing here is dropped
    assert split.spoken == list(split.parts)


def test_normalisation_keeps_every_chinese_character_and_english_word_in_order(splits: dict[str, SplitText]) -> None:
    """The zh path changes digits, dates, currency and percentages into words, and removes what the module
    doc says; every ideograph and every English word of the raw text is still there, in order."""
    normalized = splits["zh"].normalized
    for pattern in (IDEOGRAPH, re.compile(r"[A-Za-z]{2,}")):
        found = pattern.findall(normalized)
        rest = iter(found)
        missing = [w for w in pattern.findall(TEXT) if not any(w == f for f in rest)]
        assert missing == [], missing[:5]
    for spoken in ("二零二四年三月十五日", "一千二百九十九点五零万元", "百分之十五点五", "下午三点三十分",
                   "二十四hours", "一千二百九十九点五零美元million"):
        assert spoken in normalized, spoken
    en = splits["en"].normalized
    for spoken in ("the fifteenth of march", "one thousand two hundred and ninety nine point five million dollars",
                   "one thousand and one employees", "twelve thousand three hundred and forty five"):
        assert spoken in en, spoken
    assert "\\" not in normalized + en  # no escapes from wetext


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_every_piece_fits_the_engine(frontend: TextFrontend, splits: dict[str, SplitText], lang: str) -> None:
    slot = SchedulerConfig().slot_len
    assert 2 + PROMPT_SPEECH_MAX + PROMPT_TEXT_MAX + MAX_PIECE_LEN * (1 + SPEECH_TOKENS_PER_UNIT) <= slot
    for piece in splits[lang].spoken:
        units = _units(frontend, lang, piece)
        assert units <= MAX_PIECE_LEN, piece
        assert 2 + PROMPT_SPEECH_MAX + PROMPT_TEXT_MAX + len(frontend.encode(piece)) \
            + SPEECH_TOKENS_PER_UNIT * units <= slot, piece


def test_the_long_runs_are_cut_where_a_reader_would_pause(frontend: TextFrontend,
                                                          splits: dict[str, SplitText]) -> None:
    for lang, run in (("zh", ZH_RUN), ("zh", EN_RUN), ("en", EN_RUN)):
        split = splits[lang]
        start = split.normalized.index(run)
        inside = [c for c in _cuts(split.parts) if start < c < start + len(run)]
        assert len(inside) >= _units(frontend, lang, run) // MAX_PIECE_LEN - 1 > 0, (lang, run[:10])
        for cut in inside:
            before, after = split.normalized[cut - 1], split.normalized[cut]
            if run is ZH_RUN:  # no punctuation, no spaces: between two ideographs
                assert IDEOGRAPH.match(before) and IDEOGRAPH.match(after)
            else:  # between two words
                assert before == " " and after != " "
        pieces = [p for p in split.parts if run[:20] in p or run[-20:] in p or p in run]
        assert min(_units(frontend, lang, p) for p in pieces) >= MAX_PIECE_LEN // 2  # balanced, no crumbs


def test_addresses_urls_and_repeated_punctuation_stay_whole(splits: dict[str, SplitText]) -> None:
    zh = splits["zh"]
    for address in ADDRESSES:
        assert any(address in p for p in zh.parts), address  # never cut across pieces
    for marks in ("？？？", "！！！", "。。。", "？！", "……", "Wow!!! Really?!"):
        assert any(marks in p for p in zh.parts), marks
    assert any("Wow!!! Really?! OK..." in p for p in splits["en"].parts)
    for cut in _cuts(zh.parts):  # a cut inside a sentence is at soft punctuation, a space or an ideograph
        before = zh.normalized[cut - 1]
        assert before in "。？！；：、?!;" or before in SOFT_PUNCTUATION or before == " " \
            or IDEOGRAPH.match(before) and IDEOGRAPH.match(zh.normalized[cut]), zh.normalized[cut - 5:cut + 5]


def test_the_preparer_hands_the_engine_every_piece_in_order(frontend: TextFrontend,
                                                            splits: dict[str, SplitText]) -> None:
    voice = VoicePrompt(np.arange(30, dtype=np.int32), np.zeros(192, np.float32), np.zeros((60, 80), np.float32),
                        "希望你以后能够做的比我还好呦。")
    prepared = TextPreparer(frontend).prepare(SpeechJob("long", Mode.ZERO_SHOT, voice, TEXT))
    assert prepared.refusal is None
    assert [frontend.decode(list(ids)) for ids in prepared.pieces] == splits["zh"].spoken
    assert "".join(frontend.decode(list(ids)) for ids in prepared.pieces).startswith(splits["zh"].normalized)
