"""The build's filters: a trace is kept only if it passes every one, and each drop is counted by reason."""

from __future__ import annotations

from factory.build.spec import FilterSpec
from factory.core.checks import false_equation, final_number, ungrounded_operand
from schemas.records import TraceRow


def drop_reason(trace: TraceRow, filters: FilterSpec, seen: set[tuple[str, str]]) -> str | None:
    """Why a trace is dropped (the first filter it fails), or None to keep it; the trace joins `seen`.
    A repeat of any earlier trace of the problem, kept or not, is a duplicate: the data holds each
    reasoning once."""
    key = (trace.problem_id, trace.reasoning)
    repeat = key in seen
    seen.add(key)
    if filters.dedupe and repeat:
        return "duplicate"
    if len(trace.steps) < filters.min_steps:
        return "too_few_steps"
    if filters.max_steps is not None and len(trace.steps) > filters.max_steps:
        return "too_many_steps"
    if filters.answer_match and not reaches_gold(trace):
        return "wrong_answer"
    if filters.verify_arithmetic and false_equation(trace.steps):
        return "arithmetic_error"
    if filters.grounded and ungrounded_operand(trace.question, trace.steps):
        return "ungrounded"
    if filters.min_step_score is not None and trace.min_step_score < filters.min_step_score:
        return "low_step_score"
    if filters.step_labels and not all(trace.step_labels):
        return "bad_step"
    return None


def reaches_gold(trace: TraceRow) -> bool:
    """The last step ends at the gold answer, and so do the answer slots (a prior trace writes its own)."""
    gold = int(trace.gold_answer)
    return final_number(trace.steps) == gold and trace.answer is not None and int(trace.answer) == gold
