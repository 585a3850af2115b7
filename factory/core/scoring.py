"""Grading reasoning steps with the MDLM itself: no rollouts, no external model.

Answer-conditioned score: for each prefix of k steps, keep the question and the first k steps,
mask the rest of the reasoning and the answer slots, and read log p(gold answer). A step's score
is the change it causes. Two estimators for multi-token answers: the product of per-slot marginals
(one pass per prefix) and the chain rule (answer tokens revealed one at a time, one pass each).

Self-consistency: two reads per step, needing neither the answer nor a rollout. The result read
masks the step's result (and all later reasoning) and asks whether the arithmetic is right; the
operand read masks the whole step and asks whether its operands and operation are what the
question calls for. A step the model would not have written scores low on one of them.
Answer consistency: the same two reads with the gold answer visible, p(step | question, earlier
steps, gold answer): the answer-conditioned step likelihood, read on canvases of their own.
All inputs of all traces are independent canvases, so they batch into as few passes as possible.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from factory.core.template import ReasoningTemplate
from factory.models.adapter import ModelAdapter

ESTIMATORS = ("marginal", "chain")
# Which per-step score PRM labels are thresholded from: label source -> TraceScores attribute.
LABEL_SOURCES = {"self_consistency": "self_consistency", "answer_delta": "step_scores"}
# Scored (`score(..., answer_consistency=True)`) and benchmarked, not a build's label source: it
# separates no better than self-consistency and reads two canvases per step of its own.
ANSWER_CONSISTENCY_SOURCE = {"answer_consistency": "answer_consistency"}


def equals_offset(template: ReasoningTemplate, step_ids: list[int]) -> int:
    """Offset of a step's last '=' token, -1 if it has none; found by text, as BPE fuses ' ='."""
    return max((i for i, t in enumerate(step_ids) if template.is_result_mark(t)), default=-1)


@dataclass(frozen=True)
class Trace:
    question_ids: list[int]
    reasoning_ids: list[int]  # the full reasoning region, filler included
    answer_ids: list[int]  # the gold answer region (number, close, filler)


@dataclass
class TraceScores:
    prefix_logp: list[float]  # log p(gold answer | question, steps[:k]) for k = 0..n
    step_scores: list[float]  # prefix_logp[k] - prefix_logp[k-1] for k = 1..n
    result_consistency: list[float]  # mean log p of each step's result, its operands visible
    operand_consistency: list[float]  # mean log p of each step's operands and operator, the step masked
    forward_passes: float  # passes spent on this trace (shared batches counted by row share)
    # The same two reads with the gold answer visible; None when `score` was not asked for them.
    answer_result_consistency: list[float] | None = field(default=None)
    answer_operand_consistency: list[float] | None = field(default=None)
    # Distinct canvases this trace was the first to read: one canvas through one forward, the unit a
    # sampler row's passes (nfe) count in, so scoring and sampling costs add up.
    canvases: int = 0

    @property
    def self_consistency(self) -> list[float]:
        return [a + b for a, b in zip(self.result_consistency, self.operand_consistency)]

    @property
    def answer_consistency(self) -> list[float]:
        if self.answer_result_consistency is None or self.answer_operand_consistency is None:
            raise ValueError("answer consistency was not read: score(..., answer_consistency=True)")
        return [a + b for a, b in zip(self.answer_result_consistency, self.answer_operand_consistency)]

    @property
    def final_score(self) -> float:
        return self.prefix_logp[-1]

    @property
    def min_step_score(self) -> float:
        return min(self.step_scores, default=0.0)


class StepScorer:
    def __init__(self, adapter: ModelAdapter, template: ReasoningTemplate, estimator: str = "marginal", batch_size: int = 128):
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator {estimator!r} is not one of {ESTIMATORS}")
        self.adapter, self.template, self.estimator, self.batch_size = adapter, template, estimator, batch_size
        self.stats = {"forward_passes": 0, "canvases": 0}

    # ---- canvases ------------------------------------------------------------------------

    def visible_end(self, reasoning_ids: list[int], k: int) -> int:
        spans = self.template.step_spans(reasoning_ids)
        if not spans:
            return 0
        return spans[k][0] if k < len(spans) else spans[-1][1]

    def prefix_rows(self, trace: Trace) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Canvases for every prefix (and, for the chain rule, every answer token), each with the
        (answer slot, gold token) pairs whose log-probabilities it contributes."""
        tpl, mask = self.template, self.adapter.mask_id
        n_steps = len(tpl.step_spans(trace.reasoning_ids))
        m = self.template.written_length(trace.answer_ids)
        rows = []
        for k in range(n_steps + 1):
            end = self.visible_end(trace.reasoning_ids, k)
            reasoning = trace.reasoning_ids[:end] + [mask] * (len(trace.reasoning_ids) - end)
            if self.estimator == "marginal":
                rows.append(self.answer_row(trace.question_ids, reasoning, trace.answer_ids))
            else:
                for j in range(m):
                    answer = trace.answer_ids[:j] + [mask] * (len(trace.answer_ids) - j)
                    rows.append((tpl.canvas(trace.question_ids, reasoning, answer), [(j, trace.answer_ids[j])]))
        return rows

    def answer_row(self, question_ids: list[int], reasoning_ids: list[int], answer_ids: list[int]) -> tuple[list[int], list[tuple]]:
        """One canvas with the answer masked, and the (answer slot, gold token) pairs read from it in one pass."""
        scored = range(self.template.written_length(answer_ids))
        return self.template.canvas(question_ids, reasoning_ids, None), [(j, answer_ids[j]) for j in scored]

    def consistency_rows(self, trace: Trace, answer_visible: bool = False) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Two canvases per step, in step order: the result read (the step up to its last '='
        visible, the result masked) and the operand read (the whole step masked, read at the tokens
        before '='). All later reasoning is masked in both: a later step that reuses a slipped result
        would show it, and the model would read it back (stage 7, 77 traces: slips recomputed from
        scored 0.751 with the later steps visible, 1.0 with them masked). A wrong operand or operation
        is computed correctly, so only the operand read sees it (held out, stage 7: the result read
        alone separated them at 0.802 / 0.731). A step without '=' is read whole in both.
        `answer_visible`: the gold answer written in the answer slots (answer consistency), else masked."""
        tpl, mask = self.template, self.adapter.mask_id
        answer = trace.answer_ids if answer_visible else None
        rows = []
        for start, end in tpl.step_spans(trace.reasoning_ids):
            step = trace.reasoning_ids[start:end]
            eq = equals_offset(tpl, step)
            result = range(start + eq + 1, end) if eq + 1 < len(step) else range(start, end)
            head = range(start, start + eq) if eq > 0 else range(start, end)
            for hidden_from, read in ((result.start, result), (start, head)):
                reasoning = [mask if i >= hidden_from else t for i, t in enumerate(trace.reasoning_ids)]
                rows.append((tpl.canvas(trace.question_ids, reasoning, answer), [(-1 - i, trace.reasoning_ids[i]) for i in read]))
        return rows

    # ---- batched reading -----------------------------------------------------------------

    def read_logprobs(self, rows: list[tuple[list[int], list[tuple[int, int]]]]) -> list[list[float]]:
        """Per row, the log-probabilities of its (slot, token) pairs. Slot j >= 0 is answer slot j;
        slot -1-i is reasoning slot i. Rows with the same canvas share one forward pass: the answer read
        after k steps and the operand read of step k+1 are the same canvas (question, k steps, the
        rest masked), and a duplicate trace repeats all of its canvases."""
        merged, where = share_canvases(rows)
        values = self.read_unique(merged)
        return [values[u][offset : offset + len(pairs)] for (u, offset), (_, pairs) in zip(where, rows)]

    def read_unique(self, rows: list[tuple[list[int], list[tuple[int, int]]]]) -> list[list[float]]:
        """`read_logprobs` over rows that are all different canvases."""
        tpl = self.template
        out: list[list[float]] = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            ids, attention = tpl.collate([r[0] for r in chunk])
            spans = tpl.spans(ids.shape[1])
            read = [
                (b, spans.answer.start + slot if slot >= 0 else spans.reasoning.start + (-1 - slot), token)
                for b, (_, pairs) in enumerate(chunk)
                for slot, token in pairs
            ]
            batch_rows, positions, tokens = (torch.tensor(c) for c in zip(*read)) if read else (torch.empty(0, dtype=torch.long),) * 3
            logits = self.adapter.logits(ids, attention)
            self.stats["forward_passes"] += 1
            self.stats["canvases"] += len(chunk)
            # Normalise only the slots read: a full [B, L, V] log-softmax is ~26 GB at LLaDA's vocabulary.
            picked = logits[batch_rows.to(logits.device), positions.to(logits.device)].float().log_softmax(-1)
            values = iter(picked.gather(1, tokens.to(logits.device)[:, None]).squeeze(1).tolist())
            out.extend([next(values) for _ in pairs] for _, pairs in chunk)
        return out

    def score(self, traces: list[Trace], self_consistency: bool = True, answer_consistency: bool = False) -> list[TraceScores]:
        """Every trace's scores from one batched read. The answer-visible reads (`answer_consistency`)
        come after all the others, so the rows and batches of the other scores are the ones they
        would be without them."""
        prefix = [self.prefix_rows(t) for t in traces]
        consistency = [self.consistency_rows(t) if self_consistency else [] for t in traces]
        answered = [self.consistency_rows(t, answer_visible=True) if answer_consistency else [] for t in traces]
        flat = [row for p, c in zip(prefix, consistency) for row in p + c] + [row for a in answered for row in a]
        values = self.read_logprobs(flat)
        answered_values = iter(values[len(flat) - sum(map(len, answered)) :])
        # A forward pass is charged once, to the first trace that reads its canvas (the answer-visible
        # canvases are never among the others: those mask the answer).
        seen, owned = set(), []
        for p, c, a in zip(prefix, consistency, answered):
            keys = {tuple(canvas) for canvas, _ in p + c + a} - seen
            owned.append(len(keys))
            seen |= keys
        unique = len(seen)
        per_row_passes = (-(-unique // self.batch_size) if unique else 0) / max(1, unique)
        mean = lambda v: sum(v) / max(1, len(v))  # noqa: E731
        results, start = [], 0
        for t, p, c, own_answered, rows_owned in zip(traces, prefix, consistency, answered, owned):
            pv, cv = values[start : start + len(p)], values[start + len(p) : start + len(p) + len(c)]
            start += len(p) + len(c)
            if self.estimator == "marginal":
                logp = [sum(v) for v in pv]
            else:
                m = max(1, self.template.written_length(t.answer_ids))
                logp = [sum(sum(v) for v in pv[k : k + m]) for k in range(0, len(pv), m)]
            steps = [b - a for a, b in zip(logp, logp[1:])]
            means = [mean(v) for v in cv]
            scores = TraceScores(logp, steps, means[0::2], means[1::2], per_row_passes * rows_owned, canvases=rows_owned)
            if answer_consistency:
                answered_means = [mean(next(answered_values)) for _ in own_answered]
                scores.answer_result_consistency, scores.answer_operand_consistency = answered_means[0::2], answered_means[1::2]
            results.append(scores)
        return results


def share_canvases(rows: list[tuple[list[int], list]]) -> tuple[list[tuple[list[int], list]], list[tuple[int, int]]]:
    """Rows merged by canvas: (one row per distinct canvas with every pair read from it, and for each
    input row its merged row and the offset of its pairs there)."""
    index: dict[tuple[int, ...], int] = {}
    merged: list[tuple[list[int], list]] = []
    where = []
    for canvas, pairs in rows:
        u = index.setdefault(tuple(canvas), len(merged))
        if u == len(merged):
            merged.append((canvas, []))
        where.append((u, len(merged[u][1])))
        merged[u][1].extend(pairs)
    return merged, where
