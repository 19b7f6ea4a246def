"""English cardinal numbers in words, in the style upstream gets from `inflect.number_to_words`.

Written here instead of importing inflect (3-4 s import). Style: "one thousand, two hundred and
thirty-four", "one thousand and one", "one hundred", "zero"; leading zeros are ignored.
"""

from __future__ import annotations

import re

_ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_SCALES = (
    "",
    " thousand",
    " million",
    " billion",
    " trillion",
    " quadrillion",
    " quintillion",
    " sextillion",
    " septillion",
    " octillion",
    " nonillion",
    " decillion",
)


def _below_hundred(n: int) -> str:
    if n < 20:
        return _ONES[n]
    tens, units = divmod(n, 10)
    return _TENS[tens] + (f"-{_ONES[units]}" if units else "")


def _below_thousand(n: int) -> str:
    hundreds, rest = divmod(n, 100)
    if not hundreds:
        return _below_hundred(rest)
    head = f"{_ONES[hundreds]} hundred"
    return f"{head} and {_below_hundred(rest)}" if rest else head


def _digit_by_digit(digits: str) -> str:
    return " ".join(_ONES[int(d)] for d in digits)


def number_to_words(digits: str) -> str:
    """Spell a run of ASCII digits; runs beyond the decillions are read digit by digit."""
    digits = digits.lstrip("0")
    if not digits:
        return "zero"
    if len(digits) > 3 * len(_SCALES):
        return _digit_by_digit(digits)
    groups: list[tuple[int, int]] = []  # (value, scale index), most significant first
    value = int(digits)
    scale = 0
    while value:
        value, group = divmod(value, 1000)
        if group:
            groups.append((group, scale))
        scale += 1
    groups.reverse()
    words = [_below_thousand(g) + _SCALES[s] for g, s in groups]
    last_value, last_scale = groups[-1]
    # inflect joins a final units group without hundreds with "and" ("one thousand and one").
    if len(words) > 1 and last_scale == 0 and last_value < 100:
        return ", ".join(words[:-1]) + " and " + words[-1]
    return ", ".join(words)


def spell_out_digits(text: str) -> str:
    """Replace every maximal run of digits in `text` by its words (upstream `spell_out_number`)."""
    out: list[str] = []
    run: list[str] = []
    for ch in text:
        if ch.isdecimal():  # also full-width / other-script decimal digits
            run.append(str(int(ch)))
            continue
        if run:
            out.append(number_to_words("".join(run)))
            run = []
        out.append(ch)
    if run:
        out.append(number_to_words("".join(run)))
    return "".join(out)


# wetext 0.0.4 (en) reads 1,000..1,999 written with digits as "thousand ..." without its "one": "$1,299"
# -> "thousand two hundred and ninety nine dollars", "1,001 people" -> "thousand and one people".
_ONE_THOUSAND_SOURCE = re.compile(r"(?<![\d,.])1,?\d{3}(?!\d|,\d)")
_THOUSAND = re.compile(r"\bthousand\b", re.IGNORECASE)
_WORD_BEFORE = re.compile(r"([A-Za-z-]+)\W*$")
# a "thousand" after one of these is whole already ("twenty-one thousand", "a few thousand")
_COUNTS_THOUSAND = frozenset([*_ONES, *_TENS[2:], "hundred", *(s.strip() for s in _SCALES[2:]),
                              "a", "an", "the", "few", "several", "many", "some", "per", "every", "each"])


def restore_one_thousand(source: str, spoken: str) -> str:
    """`spoken` (wetext's reading of `source`) with the "one" of each 1,000..1,999 in `source` put back:
    a "thousand" that no number word or determiner precedes gets it, at most once per such number."""
    missing = len(_ONE_THOUSAND_SOURCE.findall(source))
    if not missing:
        return spoken
    out: list[str] = []
    last = 0
    for match in _THOUSAND.finditer(spoken):
        before = _WORD_BEFORE.search(spoken, 0, match.start())
        word = before.group(1).lower().split("-")[-1] if before else ""
        if missing and word not in _COUNTS_THOUSAND:
            out.append(spoken[last:match.start()] + "one ")
            last = match.start()
            missing -= 1
    return "".join(out) + spoken[last:]
