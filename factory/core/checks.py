"""Checks on a written trace that need no model: the calculator, the final answer, and the step
labels of the PRM data (which combine these exact checks with a step score)."""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable
from fractions import Fraction

from factory.core.numbers import NUMBER, NUMBER_PATTERN, number_value

_NUMBER, _OP = NUMBER_PATTERN, r"[-+*/×÷]"
_AMOUNT = rf"\$?{_NUMBER}"  # an amount may be in dollars
# 'a op b op ... = c': the whole left-hand chain, so "2 + 3 + 4 = 9" is not read as "3 + 4 = 9".
EQUATION = re.compile(rf"((?:{_AMOUNT}\s*{_OP}\s*)+{_AMOUNT})\s*=\s*\$?({_NUMBER})")
TERM = re.compile(rf"\$?({_NUMBER})\s*({_OP}?)\s*")


def final_number(steps: list[str]) -> Fraction | None:
    """The last number written in the last step (its result), or None."""
    numbers = NUMBER.findall(steps[-1]) if steps else []
    return number_value(numbers[-1]) if numbers else None


def evaluate_chain(expression: str) -> Fraction | None:
    """Exact value of 'a op b op ...' with the usual precedence; None on division by zero."""
    multiply = {"*": operator.mul, "×": operator.mul, "/": operator.truediv, "÷": operator.truediv}
    total, term, pending = Fraction(0), None, "+"
    for number, op in TERM.findall(expression):
        value = number_value(number)
        if pending in multiply:
            if value == 0 and multiply[pending] is operator.truediv:
                return None
            term = multiply[pending](term, value)
        else:
            total, term = total + (term or 0), value if pending == "+" else -value
        pending = op
    return total + term


def false_equation(steps: Iterable[str]) -> bool:
    """Whether any step writes an equation 'a op b ... = c' that does not hold."""
    for step in steps:
        for expression, result in EQUATION.findall(step):
            if evaluate_chain(expression) != number_value(result):
                return True
    return False


def true_result(step: str) -> str | None:
    """The value the step's last equation should have, as integer text, when that equation is false
    and its true value is an integer; else None. What a calculator would have written."""
    equations = EQUATION.findall(step)
    if not equations:
        return None
    expression, result = equations[-1]
    value = evaluate_chain(expression)
    if value is None or value == number_value(result) or value.denominator != 1:
        return None
    return str(value.numerator)


def ungrounded_operand(question: str, steps: Iterable[str]) -> bool:
    """Whether a step computes with a number that is neither stated in the question nor a result of an
    earlier equation: how a trace reaches a clamped answer by inventing what it needs. A problem whose
    reasoning needs a constant it does not state (60 minutes in an hour) trips it too."""
    known = {number_value(n) for n in NUMBER.findall(question)}
    for step in steps:
        for expression, result in EQUATION.findall(step):
            if any(number_value(n) not in known for n, _ in TERM.findall(expression)):
                return True
            known.add(number_value(result))
    return False


def step_labels(steps: list[str], gold_answer: str, scores: list[float], threshold: float) -> list[bool]:
    """Process labels, Math-Shepherd style: a step is good while it and every step before it are.
    A step fails on a score below `threshold` or a false equation, and the last step also when it
    does not end at the gold answer. The checks are exact; the score sees what they cannot, a true
    equation that is not the step the question calls for."""
    labels, good = [], True
    for i, (step, score) in enumerate(zip(steps, scores, strict=True)):
        reaches_gold = i < len(steps) - 1 or final_number(steps) == int(gold_answer)
        good = good and score >= threshold and not false_equation([step]) and reaches_gold
        labels.append(good)
    return labels
