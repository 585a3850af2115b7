"""The build's filters: a trace is kept only if it passes every one, and each drop is counted by reason.

A filter is one registered function `(trace, FilterSpec) -> bool`, True when the trace fails it, named
by the reason it records; they run in the order they are registered and the first failed names the
drop. Adding one is its `FilterSpec` field and its function here.
"""

from __future__ import annotations

from collections.abc import Callable

from factory.build.spec import FilterSpec
from factory.core.checks import false_equation, final_number, ungrounded_operand
from factory.schemas.records import TraceRow

FILTERS: dict[str, Callable[[TraceRow, FilterSpec], bool]] = {}


def fails(reason: str):
    def register(fn: Callable[[TraceRow, FilterSpec], bool]):
        FILTERS[reason] = fn
        return fn

    return register


@fails("too_few_steps")
def too_few_steps(trace: TraceRow, filters: FilterSpec) -> bool:
    return len(trace.steps) < filters.min_steps


@fails("too_many_steps")
def too_many_steps(trace: TraceRow, filters: FilterSpec) -> bool:
    return filters.max_steps is not None and len(trace.steps) > filters.max_steps


@fails("wrong_answer")
def wrong_answer(trace: TraceRow, filters: FilterSpec) -> bool:
    """The last step ends elsewhere than the gold answer, or the answer slots do (a prior trace writes its own)."""
    gold = int(trace.gold_answer)
    reaches = final_number(trace.steps) == gold and trace.answer is not None and int(trace.answer) == gold
    return filters.answer_match and not reaches


@fails("arithmetic_error")
def arithmetic_error(trace: TraceRow, filters: FilterSpec) -> bool:
    return filters.verify_arithmetic and false_equation(trace.steps)


@fails("ungrounded")
def ungrounded(trace: TraceRow, filters: FilterSpec) -> bool:
    return filters.grounded and ungrounded_operand(trace.question, trace.steps)


@fails("low_step_score")
def low_step_score(trace: TraceRow, filters: FilterSpec) -> bool:
    return filters.min_step_score is not None and trace.min_step_score < filters.min_step_score


@fails("bad_step")
def bad_step(trace: TraceRow, filters: FilterSpec) -> bool:
    return filters.step_labels and not all(trace.step_labels)


def drop_reason(trace: TraceRow, filters: FilterSpec, seen: set[tuple[str, str]]) -> str | None:
    """Why a trace is dropped (the first filter it fails), or None to keep it; the trace joins `seen`.
    A repeat of any earlier trace of the problem, kept or not, is a duplicate: the data holds each
    reasoning once."""
    key = (trace.problem_id, trace.reasoning)
    repeat = key in seen
    seen.add(key)
    if filters.dedupe and repeat:
        return "duplicate"
    return next((reason for reason, failed in FILTERS.items() if failed(trace, filters)), None)
