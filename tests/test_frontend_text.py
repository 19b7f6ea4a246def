"""Text frontend: tokenizer ids and specials, normalisation (zh/en/markup/numbers), splitting, LLM layouts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from frontend.long_runs import cut_long_sentence
from frontend.numbers import number_to_words, restore_one_thousand, spell_out_digits
from frontend.prompt import LLMPromptIds, instruct_with_endofprompt, llm_prompt_for
from frontend.split import (
    EN_ENDERS,
    MAX_PIECE_LEN,
    ZH_ENDERS,
    cut_sentences,
    merge_sentences,
    sentence_parts,
    split_paragraph,
)
from frontend.text_normalize import TextFrontend, is_only_punctuation, replace_blank, zh_rules
from frontend.tokenizer import COSYVOICE2_SPECIALS
from scheduler.jobs import Mode, VoicePrompt
from tests.conftest import REFERENCE_DIR, needs_reference

TINY = REFERENCE_DIR / "tiny"
CASES = REFERENCE_DIR / "cases"
needs_tiny = needs_reference("tiny/CosyVoice-BlankEN", "tiny/tiny_info.json")  # every test that takes `tf`
needs_cases = needs_reference("cases/frontend.json")


@pytest.fixture(scope="module")
def tf() -> TextFrontend:
    return TextFrontend(TINY, use_wetext=False)


# ---------------------------------------------------------------- tokenizer


@needs_tiny
def test_special_ids_match_tiny_info(tf: TextFrontend) -> None:
    info = json.loads((TINY / "tiny_info.json").read_text())
    assert tf.special_ids == info["special_token_ids"]
    assert tf.endofprompt_id == 643
    ids = [tf.special_ids[name] for name in COSYVOICE2_SPECIALS]
    assert ids == list(range(643, 660))


@needs_tiny
def test_specials_are_single_ids_inside_text(tf: TextFrontend) -> None:
    ids = tf.encode("[breath]你好<|endofprompt|>[laughter]")
    assert ids[0] == tf.special_ids["[breath]"]
    assert ids[-2:] == [tf.endofprompt_id, tf.special_ids["[laughter]"]]


@needs_tiny
@needs_cases
def test_encode_matches_fixture_and_round_trips(tf: TextFrontend) -> None:
    spec = json.loads((CASES / "frontend.json").read_text())
    for text, ids in spec["tokenizer_encode"].items():
        assert tf.encode(text) == ids
        assert tf.decode(ids) == text


@needs_tiny
def test_digits_are_single_tokens(tf: TextFrontend) -> None:
    # Qwen2 pre-tokenizer splits numbers into single digits.
    assert tf.encode("2025") == [tf.encode(d)[0] for d in "2025"]


# ---------------------------------------------------------------- normalisation


@needs_tiny
@needs_cases
def test_fixture_cases_builtin_rules(tf: TextFrontend) -> None:
    spec = json.loads((CASES / "frontend.json").read_text())
    for raw, expected in spec["text_normalize_split_true"].items():
        assert tf.normalize(raw) == expected, raw


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("价格是 25 元 - 便宜", "价格是25元-便宜"),  # blanks next to CJK go first, so " - " is gone
        ("你好 a - b 好", "你好a，b好"),  # ASCII on both sides keeps the " - " -> "，"
        ("面积 3m² 体积 2m³", "面积3m平方体积2m立方"),
        ("【重要】（注意）`代码`——结束", "重要注意代码 结束"),
        ("好的，，、", "好的。"),
        ("第一行\n第二行.", "第一行第二行。"),
        ("Hello world 你好", "Hello world你好"),
        # deviations: no text lost or split apart
        ("访问 www.example.com 或写信给 bob.smith@example.org.", "访问www.example.com或写信给bob.smith@example.org。"),
        ("版本 v1.2.3 发布了. 好", "版本v1.2.3发布了。好"),
        ("英文 wrapped\nline 和\n中文", "英文wrapped line和中文"),
        ("end.\n\nNext 好", "end。 Next好"),  # as upstream for "end. Next"
    ],
)
def test_zh_rules(raw: str, expected: str) -> None:
    assert zh_rules(raw) == expected


def test_replace_blank_edges() -> None:
    assert replace_blank(" a b ") == "a b"
    assert replace_blank("中 文") == "中文"
    assert replace_blank("a  b") == "ab"  # a space beside another space is dropped


@needs_tiny
def test_en_path_spells_numbers(tf: TextFrontend) -> None:
    assert tf.normalize("I paid 1234 dollars in 2024!") == [
        "I paid one thousand, two hundred and thirty-four dollars in two thousand and twenty-four!"
    ]
    assert tf.normalize("Room 101") == ["Room one hundred and one."]


@pytest.mark.parametrize(
    ("digits", "words"),
    [
        ("0", "zero"),
        ("007", "seven"),
        ("13", "thirteen"),
        ("40", "forty"),
        ("99", "ninety-nine"),
        ("100", "one hundred"),
        ("110", "one hundred and ten"),
        ("1000", "one thousand"),
        ("1001", "one thousand and one"),
        ("1100", "one thousand, one hundred"),
        ("2000000", "two million"),
        ("1000020", "one million and twenty"),
        ("1000000000", "one billion"),
    ],
)
def test_number_to_words(digits: str, words: str) -> None:
    assert number_to_words(digits) == words


def test_spell_out_digits_runs() -> None:
    assert spell_out_digits("a1b22c") == "aonebtwenty-twoc"
    assert spell_out_digits("３") == "three"  # full-width digits too
    assert number_to_words("1" * 40) == " ".join(["one"] * 40)  # beyond decillions: digit by digit


@needs_tiny
def test_markup_skips_normalisation(tf: TextFrontend) -> None:
    text = " 25 元<|endofprompt|> "
    assert tf.normalize(text) == [text]
    assert tf.normalize(text, split=False) == [text]


@needs_tiny
def test_markup_longer_than_a_piece_is_split_not_lost(tf: TextFrontend) -> None:
    # upstream hands markup to the LLM whole, however long: the end of a long one was never spoken
    text = "[breath]" + "这是一个很长的句子，里面有标记。" * 20 + "<|endofprompt|>"
    pieces = tf.normalize(text)
    assert len(pieces) > 1 and all(len(p) <= MAX_PIECE_LEN for p in pieces)
    assert "".join(pieces) == text + "。"
    assert tf.normalize(text, split=False) == [text]


@needs_tiny
def test_blank_and_punctuation_only(tf: TextFrontend) -> None:
    assert tf.normalize("") == []
    assert tf.normalize("   ") == []
    assert tf.normalize("...") == []
    assert tf.normalize("?!") == []
    assert is_only_punctuation("。！…「」$+")
    assert not is_only_punctuation("a.")


@needs_tiny
def test_split_false_is_one_piece(tf: TextFrontend) -> None:
    text = "第一句。" * 40
    assert tf.normalize(text, split=False) == [text]
    assert tf.normalize_one(" 你好 世界 ") == "你好世界"
    assert len(tf.normalize(text)) > 1


@needs_tiny
def test_zh_splitting_respects_limits(tf: TextFrontend) -> None:
    sentence = "这是一个用于测试切分的句子。"  # 14 characters
    pieces = tf.normalize(sentence * 20)
    assert "".join(pieces) == sentence * 20
    # each piece closes once it is over 60 and the next sentence would pass 80
    assert all(60 < len(p) <= 80 for p in pieces[:-1])


def test_short_tail_merges_into_previous() -> None:
    # the 18-character tail joins the previous piece even though that passes 80
    pieces = merge_sentences(["a" * 70 + "。", "b" * 15 + "。", "c。"], len)
    assert pieces == ["a" * 70 + "。" + "b" * 15 + "。c。"]
    pieces = merge_sentences(["a" * 70 + "。", "b" * 30 + "。", "c。"], len)
    assert pieces == ["a" * 70 + "。", "b" * 30 + "。c。"]
    pieces = merge_sentences(["a" * 61 + "。", "b" * 30 + "。"], len)
    assert pieces == ["a" * 61 + "。", "b" * 30 + "。"]


def test_closing_quote_sticks_to_sentence() -> None:
    assert cut_sentences("他说：“好。”然后走了。", ZH_ENDERS) == ["他说：", "“好。”", "然后走了。"]


@needs_tiny
def test_en_split_counts_tokens(tf: TextFrontend) -> None:
    text = " ".join(["This is sentence number one."] * 30)
    pieces = tf.normalize(text)
    assert len(pieces) > 1
    assert all(len(tf.encode(p)) <= 80 for p in pieces)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(alphabet="你好世界abc", min_size=1, max_size=30), st.sampled_from(sorted(ZH_ENDERS))
        ),
        min_size=1,
        max_size=12,
    )
)
def test_split_keeps_every_character(parts: list[tuple[str, str]]) -> None:
    text = "".join(body + ender for body, ender in parts)
    assert "".join(split_paragraph(text, "zh", len)) == text


@needs_tiny
def test_wetext_path_when_available() -> None:
    pytest.importorskip("wetext")
    frontend = TextFrontend(TINY, use_wetext=True)
    if not frontend.use_wetext:
        pytest.skip("wetext failed to load")
    assert frontend.normalize("价格是25元") == ["价格是二十五元。"]
    # wetext 0.0.4 alone says "thousand two hundred and ninety nine point five dollars" (no "one")
    assert frontend.normalize("He paid $1,299.50 for 1,001 nights.") == [
        "He paid one thousand two hundred and ninety nine point five dollars for one thousand and one nights."]
    # wetext alone raised on the blank line (the whole text fell back to the built-in rules: "fifteen%") and
    # glued the lines ("today.Then": one sentence)
    assert frontend.normalize("It rose 15% today.\n\nThen it fell.\n  Twice.") == [
        "It rose fifteen percent today.\n\nThen it fell.\nTwice."]  # wetext strips each line
    # wetext alone escaped the quotes: \\"Yes,\\" (backslashes the LLM would be given to read)
    assert frontend.normalize('He said "Yes, 2 times" \\o') == ['He said "Yes, two times" \\o.']
    assert frontend.normalize('他在2019年说"好"') == ['他在二零一九年说"好"。']
    # wetext alone read "二十四小时ours", "五英里llion", "十分钟utes"; a unit it reads whole stays its
    assert frontend.normalize("我们24 hours在线，融资$5 million，等10 minutes，跑5 km。") == [
        "我们二十四hours在线，融资五美元million，等十minutes，跑五公里。"]
    # wetext alone: "https://x.org/两千零二十四-q三。html?id=七" and an e-mail address read as numbers
    assert frontend.normalize("请看 https://x.org/2024-q3.html?id=7, 或写信给 bob2024@x.org 共3次") == [
        "请看https://x.org/2024-q3.html?id=7,或写信给bob2024@x.org共三次。"]
    # wetext alone: "一美元,两百九十九点五零" (one dollar, two hundred and ninety-nine...)
    assert frontend.normalize("售价$1,299.50，共12,345,678件") == ["售价一千二百九十九点五零美元，共一千二百三十四万五千六百七十八件。"]


@pytest.mark.parametrize(("source", "spoken", "fixed"), [
    ("1,000", "thousand", "one thousand"),
    ("$5 and 1,200", "five dollars and thousand two hundred", "five dollars and one thousand two hundred"),
    ("2,500 and 21,000", "two thousand five hundred and twenty one thousand", None),  # nothing missing
    ("a thousand and 1,500", "a thousand and thousand five hundred", "a thousand and one thousand five hundred"),
    ("1,500th", "one thousand five hundredth", None),  # wetext's ordinals are right
    ("1299 votes", "twelve ninety nine votes", None),
])
def test_restore_one_thousand(source: str, spoken: str, fixed: str | None) -> None:
    assert restore_one_thousand(source, spoken) == (fixed or spoken)


# ---------------------------------------------------------------- LLM prompt layouts


def _voice(text: str = "希望你以后能够做的比我还好呦。") -> VoicePrompt:
    return VoicePrompt(
        np.arange(5, dtype=np.int32), np.zeros(192, np.float32), np.zeros((10, 80), np.float32), text
    )


@needs_tiny
def test_zero_shot_layout(tf: TextFrontend) -> None:
    voice = _voice(" 希望你 以后.")
    ids = llm_prompt_for(Mode.ZERO_SHOT, voice, tf, None)
    assert ids == LLMPromptIds(tf.encode("希望你以后。"), [0, 1, 2, 3, 4])


@needs_tiny
def test_cross_lingual_layout_is_empty(tf: TextFrontend) -> None:
    assert llm_prompt_for(Mode.CROSS_LINGUAL, _voice(), tf, "ignored") == LLMPromptIds([], [])


@needs_tiny
def test_instruct_layout_appends_endofprompt_once(tf: TextFrontend) -> None:
    plain = llm_prompt_for(Mode.INSTRUCT, _voice(), tf, "用四川话说这句话")
    marked = llm_prompt_for(Mode.INSTRUCT, _voice(), tf, "用四川话说这句话<|endofprompt|>")
    assert plain == marked
    assert plain.prompt_text_ids[-1] == tf.endofprompt_id
    assert plain.prompt_speech_tokens == []
    assert instruct_with_endofprompt("x 25.") == "x 25.<|endofprompt|>"  # not normalised


@needs_tiny
def test_instruct_requires_text(tf: TextFrontend) -> None:
    with pytest.raises(ValueError):
        llm_prompt_for(Mode.INSTRUCT, _voice(), tf, None)
    with pytest.raises(ValueError):
        llm_prompt_for(Mode.INSTRUCT, _voice(), tf, "  ")


# ---------------------------------------------------------------- long runs (no text lost)


def test_a_run_without_enders_is_cut_within_the_piece_limit() -> None:
    run = "我们沿着河边一直走到天黑才回家" * 40  # 600 characters, no punctuation at all
    pieces = split_paragraph(run, "zh", len)
    assert "".join(pieces) == run + "。"
    assert all(len(p) <= MAX_PIECE_LEN for p in pieces)
    assert min(len(p) for p in pieces) >= MAX_PIECE_LEN // 2  # balanced, no crumbs


def test_long_runs_are_cut_at_soft_punctuation_then_spaces_never_inside_words() -> None:
    words = " ".join(f"word{i}" for i in range(200))
    parts = cut_long_sentence(words, len, 100)
    assert "".join(parts) == words and all(len(p) <= 100 for p in parts)
    assert all(p.endswith(" ") for p in parts[:-1])  # each cut at a space, the word whole
    clauses = "，".join(["一二三四五六七八九十"] * 30)
    parts = cut_long_sentence(clauses, len, 100)
    assert all(p.endswith("，") for p in parts[:-1])
    mixed = "中文" * 30 + "https://example.com/a/very/long/path" + "中文" * 60
    parts = cut_long_sentence(mixed, len, 100)
    assert "".join(parts) == mixed and any("https://example.com/a/very/long/path" in p for p in parts)


def test_a_cut_never_splits_a_special_token_or_an_emoji_sequence() -> None:
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
    for unit in ("[breath]", "<|endofprompt|>", family, "\U0001f44d\U0001f3fd"):
        text = (unit * 60)[:-1] if unit == "[breath]" else unit * 60
        for limit in (7, 20, 50):
            parts = cut_long_sentence(text, len, limit)
            assert "".join(parts) == text
            if len(unit) <= limit:
                assert all(p.startswith(unit[0]) for p in parts), (unit, limit, parts[:3])


def test_merging_never_passes_the_piece_limit() -> None:
    pieces = merge_sentences(["a" * 59 + "。", "b" * 90 + "。"], len)
    assert pieces == ["a" * 59 + "。", "b" * 90 + "。"]  # upstream merged them: 151 characters
    pieces = merge_sentences(["a" * 95 + "。", "b" * 10 + "。"], len)
    assert pieces == ["a" * 95 + "。", "b" * 10 + "。"]  # the short tail stays alone rather than pass 100


def test_enders_inside_urls_addresses_and_numbers_end_no_sentence() -> None:
    text = "看https://x.org/a?q=1&b=2;c!d或写信给bob.smith@x.org。版本v1.2.3发布了!好"
    assert cut_sentences(text, ZH_ENDERS) == [
        "看https://x.org/a?q=1&b=2;c!d或写信给bob.smith@x.org。", "版本v1.2.3发布了!"]
    assert cut_sentences("It is 3.14. Go to x.com? Yes.", EN_ENDERS) == ["It is 3.14.", " Go to x.com?", " Yes."]


def test_repeated_enders_stay_with_their_sentence() -> None:
    # upstream kept only the first of "？？？" (and the "！" of "？！"): the pieces lost characters
    assert cut_sentences("真的吗？？？太好了！！", ZH_ENDERS) == ["真的吗？？？", "太好了！！"]
    assert cut_sentences("他说：“好！！”然后走了。。。", ZH_ENDERS) == ["他说：", "“好！！”", "然后走了。。。"]
    assert cut_sentences("Wow?! Really...", EN_ENDERS) == ["Wow?!", " Really..."]
    assert cut_sentences("。开头。", ZH_ENDERS) == ["。", "开头。"]  # a leading ender is its own (silent) sentence


@needs_tiny
def test_silent_pieces_are_explicit(tf: TextFrontend) -> None:
    first = "好" * 69 + "。"  # full: a tail of 31 symbols becomes its own piece, with nothing to say
    split = tf.split(first + "🎉" * 30 + "。")
    assert split.parts == (first, "🎉" * 30 + "。") and "".join(split.parts) == split.normalized
    assert split.spoken == [first] and split.silent == ["🎉" * 30 + "。"]
    assert tf.normalize("🎉🎉🎉") == []  # nothing at all to say: the request is refused (prepare.NOTHING_TO_SPEAK)


def test_sentence_parts_add_up_to_the_text_tail_included() -> None:
    text = "第一句。Second one! 第三句没有结束" + "长" * 250
    parts = sentence_parts(text)
    assert "".join(parts) == text and parts[:2] == ["第一句。", "Second one!"]
    assert all(len(p) <= MAX_PIECE_LEN for p in parts) and len(parts) == 2 + 3
    assert sentence_parts("") == [] and sentence_parts("no ender") == ["no ender"]
