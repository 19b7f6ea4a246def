"""English cardinal numbers in words, in the style upstream gets from `inflect.number_to_words`.

Written here instead of importing inflect (3-4 s import). Style: "one thousand, two hundred and
thirty-four", "one thousand and one", "one hundred", "zero"; leading zeros are ignored.
"""

from __future__ import annotations

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
