"""Checks on a written trace that need no model: the calculator, the final answer, the build's
filters, and the step labels of the PRM data (which combine these exact checks with a step score)."""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable
from fractions import Fraction

from schemas.records import TraceRow
from schemas.spec import FilterSpec

# A number may carry thousands commas and decimals (GSM8k: "0.5 * 10 = 5", "10 / 4 = 2.5") and is
# never read from inside another one, so "0.5" is not taken for "5". An amount may be in dollars.
_NUMBER, _OP = r"(?<![\d.])-?\d[\d,]*(?:\.\d+)?", r"[-+*/×÷]"
_AMOUNT = rf"\$?{_NUMBER}"
NUMBER = re.compile(_NUMBER)
# 'a op b op ... = c': the whole left-hand chain, so "2 + 3 + 4 = 9" is not read as "3 + 4 = 9".
EQUATION = re.compile(rf"((?:{_AMOUNT}\s*{_OP}\s*)+{_AMOUNT})\s*=\s*\$?({_NUMBER})")
TERM = re.compile(rf"\$?({_NUMBER})\s*({_OP}?)\s*")


def number_value(text: str) -> Fraction:
    return Fraction(text.replace(",", ""))


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


def drop_reason(trace: TraceRow, filters: FilterSpec, seen: set[tuple[str, str]]) -> str | None:
    """Why a trace is dropped (the first filter it fails), or None to keep it. A repeat of any
    earlier trace of the problem, kept or not, is a duplicate: the data holds each reasoning once."""
    if filters.dedupe and (trace.problem_id, trace.reasoning) in seen:
        return "duplicate"
    if len(trace.steps) < filters.min_steps:
        return "too_few_steps"
    if filters.max_steps is not None and len(trace.steps) > filters.max_steps:
        return "too_many_steps"
    if filters.answer_match and final_number(trace.steps) != int(trace.gold_answer):
        return "wrong_answer"
    if filters.verify_arithmetic and false_equation(trace.steps):
        return "arithmetic_error"
    if filters.min_step_score is not None and trace.min_step_score < filters.min_step_score:
        return "low_step_score"
    if filters.step_labels and not all(trace.step_labels):
        return "bad_step"
    return None


def filter_traces(traces: list[TraceRow], filters: FilterSpec) -> tuple[list[TraceRow], list[TraceRow]]:
    """(kept, filtered): every filtered trace carries its `filter_reason`, none is dropped unseen."""
    kept, filtered, seen = [], [], set()
    for trace in traces:
        reason = drop_reason(trace, filters, seen)
        if reason:
            filtered.append(trace.model_copy(update={"filter_reason": reason}))
        else:
            kept.append(trace)
        seen.add((trace.problem_id, trace.reasoning))
    return kept, filtered
