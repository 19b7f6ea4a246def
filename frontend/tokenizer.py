"""Qwen2 byte-level BPE text tokenizer with the CosyVoice2 special tokens (spec §3.2).

Built directly with the `tokenizers` library from `CosyVoice-BlankEN/vocab.json` + `merges.txt`
(no `transformers`): NFC normaliser, the Qwen2 pre-tokenizer regex (single digits), byte-level
mapping, BPE. Special tokens are matched before BPE, so `<|endofprompt|>` inside text is one id.
"""

from __future__ import annotations

import json
from pathlib import Path

from frontend.model_files import QWEN_DIR

# The Qwen2 pre-tokenizer split (isolated): contractions, letter runs with one optional leading
# non-letter, ONE digit at a time, punctuation runs, newlines, whitespace.
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2's own specials (ids from tokenizer_config.json, appended after the BPE vocab).
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# CosyVoice2Tokenizer adds these, in this order, after the Qwen specials (new ones get consecutive ids).
COSYVOICE2_SPECIALS = (
    "<|endofprompt|>",
    "[breath]",
    "<strong>",
    "</strong>",
    "[noise]",
    "[laughter]",
    "[cough]",
    "[clucking]",
    "[accent]",
    "[quick_breath]",
    "<laughter>",
    "</laughter>",
    "[hissing]",
    "[sigh]",
    "[vocalized-noise]",
    "[lipsmack]",
    "[mn]",
)
ENDOFPROMPT = "<|endofprompt|>"


class TokenizerError(ValueError):
    """The tokenizer files of a model directory are missing or inconsistent."""


def _qwen_special_order(qwen_dir: Path) -> list[str]:
    """Qwen specials in id order as tokenizer_config.json lists them (fallback: the known three)."""
    path = qwen_dir / "tokenizer_config.json"
    if not path.is_file():
        return list(QWEN_SPECIALS)
    decoder = json.loads(path.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
    ordered = [entry["content"] for _, entry in sorted(decoder.items(), key=lambda kv: int(kv[0]))]
    return ordered or list(QWEN_SPECIALS)


def build_tokenizer(qwen_dir: Path):  # -> tokenizers.Tokenizer
    """The fast tokenizer equivalent of `AutoTokenizer(CosyVoice-BlankEN)` + CosyVoice2 specials."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab, merges = qwen_dir / "vocab.json", qwen_dir / "merges.txt"
    for path in (vocab, merges):
        if not path.is_file():
            raise TokenizerError(f"{QWEN_DIR}/{path.name}: not found")
    bpe = models.BPE.from_file(str(vocab), str(merges), unk_token=None, fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = _qwen_special_order(qwen_dir)
    specials += [s for s in COSYVOICE2_SPECIALS if s not in specials]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


class TextTokenizer:
    """encode/decode with the exact ids of upstream `CosyVoice2Tokenizer` (no BOS/EOS added)."""

    def __init__(self, model_dir: Path) -> None:
        qwen_dir = Path(model_dir) / QWEN_DIR
        self._tok = build_tokenizer(qwen_dir)
        self.special_ids: dict[str, int] = {}
        for name in QWEN_SPECIALS + COSYVOICE2_SPECIALS:
            token_id = self._tok.token_to_id(name)
            if token_id is None:
                raise TokenizerError(f"{QWEN_DIR}: special token {name} got no id")
            self.special_ids[name] = token_id
        self._check_consecutive()
        self.endofprompt_id = self.special_ids[ENDOFPROMPT]
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def _check_consecutive(self) -> None:
        # Upstream relies on add_special_tokens giving new tokens consecutive ids after <|im_end|>.
        ids = [self.special_ids[name] for name in COSYVOICE2_SPECIALS]
        first = self.special_ids["<|im_end|>"] + 1
        if ids != list(range(first, first + len(ids))):
            raise TokenizerError(
                f"{QWEN_DIR}: CosyVoice2 special ids not consecutive after <|im_end|>: {ids}"
            )

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
