"""How the factory reads numbers, in one place: an answer's one spelling, a number inside a step,
and their exact values. The template, the checks and the sources all parse through these."""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

# An answer slot holds an integer, written one way: no sign on zero, no leading zeros, no commas.
INTEGER = re.compile(r"-?\d+")
# A number in a step may carry thousands commas and decimals (GSM8k: "0.5 * 10 = 5", "10 / 4 = 2.5")
# and is never read from inside another one, so "0.5" is not taken for "5".
NUMBER_PATTERN = r"(?<![\d.])-?\d[\d,]*(?:\.\d+)?"
NUMBER = re.compile(NUMBER_PATTERN)
# An integer as a table may spell it: '1,234', '$7', '007', 40.0 from a float column.
_INTEGER_SPELLING = re.compile(r"(-?)(\d+)(?:\.0*)?")


def is_integer(text: str) -> bool:
    return INTEGER.fullmatch(text.strip()) is not None


def number_value(text: str) -> Fraction:
    return Fraction(text.replace(",", ""))


def canonical_answer(value: Any) -> str:
    """One spelling per integer: '1,234' -> '1234', 40.0 -> '40', '$7' -> '7', '007' -> '7', '-0' -> '0'.
    Anything else is returned stripped, for the template to refuse."""
    text = str(value).strip().replace(",", "").removeprefix("$")
    match = _INTEGER_SPELLING.fullmatch(text)
    if not match:
        return text
    number = int(match[2])
    return f"-{number}" if match[1] and number else str(number)
