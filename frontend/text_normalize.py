"""Text normalisation and the text frontend (spec §3.1, §3.2).

`TextFrontend(model_dir)` bundles the Qwen tokenizer and the normaliser. Normalisation follows
upstream `CosyVoiceFrontEnd.text_normalize`: markup (`<|...|>`) skips it; text with CJK characters
takes the "zh" path (wetext zh TN, blank/bracket/punctuation rules), anything else the "en" path
(wetext en TN, digits spelled out); then `split_paragraph`, then punctuation-only pieces are dropped.
`wetext` is optional: with `use_wetext=False` (or when it cannot load) only the built-in rules run,
which is how the reference fixtures were made.
"""

from __future__ import annotations

import logging
import re
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from frontend.numbers import spell_out_digits
from frontend.split import MAX_PIECE_LEN, split_paragraph
from frontend.tokenizer import TextTokenizer
from frontend.wetext_guard import normalize_en, normalize_zh

log = logging.getLogger(__name__)

_CJK = re.compile(r"[\u4e00-\u9fff]")
_TRAILING_COMMAS = re.compile(r"[，,、]+$")
_SENTENCE_DOT = re.compile(r"\.(?![0-9A-Za-z])|(?<![0-9A-Za-z])\.")  # not the dots of example.com, v1.2
_ASCII_LINE_BREAK = re.compile(r"(?<=[!-~])\s*\n\s*(?=[!-~])")  # "wrapped\nEnglish" -> "wrapped English"


def contains_chinese(text: str) -> bool:
    return _CJK.search(text) is not None


def is_markup(text: str) -> bool:
    """Upstream skips normalisation for any text with `<|` and `|>` (special-token markup)."""
    return "<|" in text and "|>" in text


def is_only_punctuation(text: str) -> bool:
    """True for "" and strings made only of Unicode punctuation (P*) and symbols (S*)."""
    return all(unicodedata.category(ch)[0] in "PS" for ch in text)


def replace_blank(text: str) -> str:
    """Drop spaces unless both neighbours are non-space ASCII (keeps "Hello world", drops "25 元")."""
    out: list[str] = []
    for i, ch in enumerate(text):
        if ch != " ":
            out.append(ch)
            continue
        prev = text[i - 1] if i > 0 else " "
        nxt = text[i + 1] if i + 1 < len(text) else " "
        if prev.isascii() and prev != " " and nxt.isascii() and nxt != " ":
            out.append(ch)
    return "".join(out)


def zh_rules(text: str) -> str:
    """The built-in zh clean-up, in upstream order (order matters: blanks go before " - ").

    Two deviations: a line break between two ASCII characters becomes a space (upstream glued the
    English words on either side: "line\nbreak" -> "linebreak"), and a dot inside an ASCII word stays a
    dot (upstream made "example.com" "example。com", a sentence end that split URLs and addresses)."""
    text = _ASCII_LINE_BREAK.sub(" ", text)
    text = text.replace("\n", "")
    text = replace_blank(text)
    text = text.replace("²", "平方").replace("³", "立方")
    text = _SENTENCE_DOT.sub("。", text)
    text = text.replace(" - ", "，")
    for bracket in ("（", "）", "【", "】", "`"):
        text = text.replace(bracket, "")
    text = text.replace("——", " ")
    return _TRAILING_COMMAS.sub("。", text)


class _Wetext:
    """Lazily loaded wetext normalisers (zh keeps erhua, as upstream); None when unavailable."""

    _lock = threading.Lock()
    _loaded: tuple[Any, Any] | None = None
    _failed = False

    @classmethod
    def get(cls) -> tuple[Any, Any] | None:
        with cls._lock:
            if cls._loaded is None and not cls._failed:
                try:
                    from wetext import Normalizer

                    cls._loaded = (
                        Normalizer(lang="zh", operator="tn", remove_erhua=False),
                        Normalizer(lang="en", operator="tn"),
                    )
                    log.info("text normalisation: wetext loaded")
                except Exception as exc:  # noqa: BLE001 - any failure means "built-in rules only"
                    cls._failed = True
                    log.warning("text normalisation: wetext unavailable (%s); built-in rules only", exc)
            return cls._loaded

    @classmethod
    def zh(cls, text: str) -> str:
        loaded = cls.get()
        return cls.normalize(loaded[0], text) if loaded is not None else text

    @classmethod
    def en(cls, text: str) -> str:
        loaded = cls.get()
        return cls.normalize(loaded[1], text) if loaded is not None else text

    @classmethod
    def normalize(cls, model: Any, text: str) -> str:
        with cls._lock:  # FST objects are not documented as thread-safe
            try:
                return str(model.normalize(text))
            except Exception as exc:  # noqa: BLE001 - a TN bug must not fail the request
                log.warning("wetext failed on %r (%s); built-in rules only", text[:80], exc)
                return text


@dataclass(frozen=True)
class SplitText:
    """A text normalised (`normalized`) and cut into `parts`, which concatenate to it exactly, plus the
    sentence ender appended to a text that ends without one. A part made only of punctuation and symbols
    (emoji included: "🎉🎉🎉。") has nothing to say: it is silent, dropped by design as upstream does; the
    others are `spoken`, in order."""

    normalized: str
    parts: tuple[str, ...]

    @property
    def spoken(self) -> list[str]:
        return [p for p in self.parts if not is_only_punctuation(p)]

    @property
    def silent(self) -> list[str]:
        return [p for p in self.parts if is_only_punctuation(p)]


class TextFrontend:
    """Qwen tokenizer + CosyVoice2 text normalisation of one model directory. Thread-safe."""

    def __init__(self, model_dir: Path, use_wetext: bool = True) -> None:
        self.tokenizer = TextTokenizer(Path(model_dir))
        self.use_wetext = use_wetext and _Wetext.get() is not None
        self.special_ids: dict[str, int] = dict(self.tokenizer.special_ids)
        self.endofprompt_id: int = self.tokenizer.endofprompt_id

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special tokens recognised, no BOS/EOS."""
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def normalize(self, text: str, split: bool = True) -> list[str]:
        """Normalised text pieces to speak. split=False gives one piece: the whole normalised text.

        Deviation: empty/blank text gives [] (upstream returns [""] or fails on blank text).
        """
        if not split:
            whole = text if is_markup(text) else self._normalized(text.strip())[1]
            return [whole] if whole else []
        return self.split(text).spoken

    def split(self, text: str) -> SplitText:
        """The text normalised and cut into pieces, the silent ones included (see SplitText)."""
        if is_markup(text):  # not normalised (upstream); split only where one piece would be too long
            lang = "zh" if contains_chinese(text) else "en"
            length = len if lang == "zh" else self._count_tokens
            fits = length(text) <= MAX_PIECE_LEN
            return SplitText(text, (text,) if fits else tuple(split_paragraph(text, lang, self._count_tokens)))
        lang, normalized = self._normalized(text.strip())
        return SplitText(normalized, tuple(split_paragraph(normalized, lang, self._count_tokens)))

    def normalize_one(self, text: str) -> str:
        """The whole text normalised without splitting (how the prompt transcript is treated)."""
        pieces = self.normalize(text, split=False)
        return pieces[0] if pieces else ""

    def encode_pieces(self, text: str) -> list[list[int]]:
        """Token ids of each normalised sentence piece (empty pieces dropped): text to be spoken."""
        return [ids for ids in map(self.encode, self.normalize(text, split=True)) if ids]

    def encode_whole(self, text: str) -> list[int]:
        """Token ids of the text normalised as one piece: a prompt transcript."""
        return self.encode(self.normalize_one(text))

    def _count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def _normalized(self, text: str) -> tuple[str, str]:
        """(lang, normalised text) of stripped `text`; lang "zh" when it holds any CJK character."""
        if not text:
            return "en", ""
        if contains_chinese(text):
            return "zh", self._normalize_zh(text)
        return "en", self._normalize_en(text)

    def _normalize_zh(self, text: str) -> str:
        if self.use_wetext:
            text = normalize_zh(_Wetext.zh, text)
        return zh_rules(text)

    def _normalize_en(self, text: str) -> str:
        if self.use_wetext:
            text = normalize_en(_Wetext.en, text)
        return spell_out_digits(text)
