"""The build's filters: a trace is kept only if it passes every one, and each drop is counted by reason."""

from __future__ import annotations

from factory.build.spec import FilterSpec
from factory.core.checks import false_equation, final_number
from schemas.records import TraceRow


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
