"""The build's stages as plain code, usable without Ray: seeds and identities, `TraceMaker` (a
problem's rounds of traces, each scored and filtered as it comes back) and `process_shard`.

Determinism: a problem's sampler seed derives from (spec seed, problem id), a draft's from (problem
seed, round, draft), and a trace's id from (spec hash, problem id, sample index), so none depends on
sharding, actor count or resume.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field

from factory.build.filters import drop_reason
from factory.build.provenance import code_version
from factory.build.spec import BuildSpec, ModelSpec
from factory.core.checks import step_labels, true_result
from factory.core.sampler import CanvasSampler, Request, SampleResult, seed_for
from factory.core.scoring import LABEL_SOURCES, StepScorer, Trace, TraceScores, equals_offset
from factory.core.strategies import Attempt, Attempts, Draft, first_bad_step, make_strategy, split_budget
from factory.core.template import ReasoningTemplate
from factory.models.adapter import ModelAdapter
from factory.models.adapter import load_tokenizer as load_model_tokenizer
from factory.schemas.records import Problem, Rejected, ShardPlan, ShardResult, TraceRow, Unsolved, WorkerInfo

# ---- identities and seeds ------------------------------------------------------------------


def problem_seed(seed: int, problem_id: str) -> int:
    """A problem's sampler seed: fixed by the spec seed and the problem, not by where it runs."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{problem_id}".encode()).digest()[:4], "big")


def trace_id(spec_hash: str, problem_id: str, sample_index: int) -> str:
    return hashlib.sha256(f"{spec_hash}:{problem_id}:{sample_index}".encode()).hexdigest()[:16]


# ---- read -----------------------------------------------------------------------------------


def load_tokenizer(model: ModelSpec):
    """The model's tokenizer without its weights: the driver checks rows and renders the dry run with it."""
    return load_model_tokenizer(model.id, model.kind, model.revision, model.trust_remote_code)


def driver_template(spec: BuildSpec) -> ReasoningTemplate:
    return ReasoningTemplate(load_tokenizer(spec.model), spec.template.to_config())


# ---- sample + score ---------------------------------------------------------------------------


@dataclass
class ProblemRun:
    """One problem's rounds: its canvases' ends, its attempts, the reasonings seen (for dedupe), the
    passes spent and its rows."""

    problem: Problem
    question_ids: list[int]
    answer_ids: list[int]
    seed: int
    spent: int = 0
    accepted: int = 0
    history: list[Attempt] = field(default_factory=list)
    seen: set[tuple[str, str]] = field(default_factory=set)
    rows: list[TraceRow] = field(default_factory=list)


class TraceMaker:
    """Works problems in rounds (see `core.strategies`) and scores every trace's steps; holds one model.

    Each round drafts canvases for the problems still short of `sampler.target` accepted traces,
    samples them in one batch, scores and filters them, and a problem leaves once it has its target
    or its budget is spent. A draft's seed derives from (problem seed, round, draft) and its pass cap
    from the problem's budget, so a problem's rows depend on neither its shard mates nor resume."""

    def __init__(self, spec: BuildSpec, adapter: ModelAdapter | None = None):
        self.spec, self.spec_hash = spec, spec.spec_hash()
        m = spec.model
        self.adapter = adapter or ModelAdapter.load(m.id, m.kind, m.revision, m.trust_remote_code, dtype=m.dtype)
        self.template = ReasoningTemplate(self.adapter.tokenizer, spec.template.to_config())
        self.sampler = CanvasSampler(self.adapter, self.template, spec.sampler.to_config())
        self.scorer = StepScorer(self.adapter, self.template, spec.scoring.estimator, spec.scoring.batch_size)
        self.strategy = make_strategy(spec.sampler.strategy, **spec.sampler.strategy_params)
        self.timings = {"sample_s": 0.0, "score_s": 0.0}

    def __call__(self, problems: list[Problem]) -> list[TraceRow]:
        """Every trace made for the problems, in order of (round, problem, draft), each with its
        `filter_reason` (None: accepted)."""
        cfg, tpl = self.spec.sampler, self.template
        runs = [
            ProblemRun(p, tpl.encode_question(p.question), tpl.encode_answer(p.gold_answer), problem_seed(self.spec.seed, p.problem_id))
            for p in problems
        ]
        rows: list[TraceRow] = []
        for round_ in itertools.count():
            active = [r for r in runs if r.accepted < cfg.target and r.spent < cfg.budget]
            requests, drafts = [], []
            for run in active:
                planned = self.strategy(Attempts(round_, cfg.target - run.accepted, tuple(run.history)))
                for j, (draft, cap) in enumerate(zip(planned, split_budget(cfg.budget - run.spent, len(planned)))):
                    requests.append(self.request(run, draft, seed_for(run.seed, round_, j), cap))
                    drafts.append((run, draft))
            if not requests:
                return rows
            rows += self.sample_round(round_, requests, drafts)

    def request(self, run: ProblemRun, draft: Draft, seed: int, cap: int) -> Request:
        slots = self.spec.template.reasoning_slots
        reasoning = list(draft.prefix) + [self.adapter.mask_id] * (slots - len(draft.prefix)) if draft.prefix else None
        answer = run.answer_ids if draft.clamped else None
        return Request(run.question_ids, answer_ids=answer, reasoning_ids=reasoning, seed=seed, max_nfe=cap)

    def sample_round(self, round_: int, requests: list[Request], drafts: list[tuple[ProblemRun, Draft]]) -> list[TraceRow]:
        t0 = time.perf_counter()
        samples = self.sampler.run(requests)
        t1 = time.perf_counter()
        # Every trace is scored against the gold answer, a prior one (its own answer written) too.
        traces = [Trace(r.question_ids, s.reasoning_ids, run.answer_ids) for r, s, (run, _) in zip(requests, samples, drafts)]
        scores = self.scorer.score(traces, self_consistency=self.spec.scoring.self_consistency)
        self.timings["sample_s"] += t1 - t0
        self.timings["score_s"] += time.perf_counter() - t1
        rows = []
        for sample, score, (run, draft) in zip(samples, scores, drafts):
            row = self.trace_row(run.problem, len(run.rows), sample, score, round_, draft)
            reason = drop_reason(row, self.spec.filters, run.seen)
            row = row.model_copy(update={"filter_reason": reason})
            run.spent += row.nfe
            run.accepted += reason is None
            bad = first_bad_step(self.spec.sampler.locators, row.steps, row.gold_answer, row.step_labels) if reason else None
            spans = self.template.step_spans(sample.reasoning_ids)
            calculated = self.calculated(sample.reasoning_ids, spans[bad], row.steps[bad]) if bad is not None else None
            starts = tuple(a for a, _ in spans)
            run.history.append(
                Attempt(
                    round_,
                    reason is None,
                    reason == "duplicate",
                    bad,
                    starts,
                    tuple(sample.reasoning_ids),
                    calculated,
                    draft.prefix,
                )
            )
            run.rows.append(row)
            rows.append(row)
        return rows

    def calculated(self, reasoning_ids: list[int], span: tuple[int, int], step: str) -> tuple[int, ...] | None:
        """The reasoning up to the step's last '=' followed by the true result, when its last
        equation is false; else None."""
        value = true_result(step)
        eq = equals_offset(self.template, reasoning_ids[span[0] : span[1]])
        if value is None or eq < 0:
            return None
        result = self.template.encode_text(" " + value)
        keep = span[0] + eq + 1
        return tuple(reasoning_ids[:keep]) + tuple(result) if keep + len(result) < self.spec.template.reasoning_slots else None

    def trace_row(
        self, problem: Problem, sample_index: int, sample: SampleResult, scores: TraceScores, round_: int, draft: Draft
    ) -> TraceRow:
        tpl, scoring = self.template, self.spec.scoring
        steps = tpl.split_steps(sample.reasoning_ids)
        label_scores = getattr(scores, LABEL_SOURCES[scoring.label_source])
        return TraceRow(
            **problem.model_dump(),
            trace_id=trace_id(self.spec_hash, problem.problem_id, sample_index),
            sample_index=sample_index,
            reasoning=tpl.reasoning_text(sample.reasoning_ids),
            steps=steps,
            answer=tpl.parse_answer(sample.answer_ids),
            nfe=sample.nfe,
            exited_early=sample.exited_early,
            strategy=self.spec.sampler.strategy,
            clamped=draft.clamped,
            round=round_,
            repaired_from_step=draft.repaired_from_step,
            step_scores=scores.step_scores,
            prefix_logp=scores.prefix_logp,
            self_consistency=scores.self_consistency,
            final_score=scores.final_score,
            min_step_score=scores.min_step_score,
            step_labels=step_labels(steps, problem.gold_answer, label_scores, scoring.label_threshold),
            scoring_passes=scores.forward_passes,
            scoring_canvases=scores.canvases,
            model_id=self.adapter.model_id,
            model_revision=self.adapter.revision,
            sampler=self.spec.sampler.model_dump_json(),
            scorer=scoring.model_dump_json(),
            seed=problem_seed(self.spec.seed, problem.problem_id),
            code_version=code_version(),
            spec_hash=self.spec_hash,
        )


# ---- one shard: sample + score + filter ------------------------------------------------------


def worker_info(adapter: ModelAdapter) -> WorkerInfo:
    import ray

    gpu_ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", []) if ray.is_initialized() else []
    return WorkerInfo(
        actor=f"{socket.gethostname()}:{os.getpid()}",
        device=str(adapter.device),
        dtype=str(adapter.dtype).removeprefix("torch."),
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        gpu_ids=[str(g) for g in gpu_ids],
    )


def sample_or_quarantine(maker: TraceMaker, problems: list[Problem]) -> tuple[list[TraceRow], list[Rejected]]:
    """The shard's traces. When the shard raises, its problems are retried one by one (a row's output
    does not depend on its batch) and a problem that raises alone is quarantined with its error: one
    poison row never fails a build, nor takes its shard's other problems with it."""
    try:
        return maker(problems), []
    except Exception as err:
        if len(problems) == 1:
            return [], [quarantine(problems[0], err)]
    traces, quarantined = [], []
    for problem in problems:
        try:
            traces += maker([problem])
        except Exception as err:
            quarantined.append(quarantine(problem, err))
    return traces, quarantined


def quarantine(problem: Problem, err: BaseException) -> Rejected:
    detail = " ".join(f"{type(err).__name__}: {err}".split())[:300]
    raw = problem.model_dump_json()
    return Rejected(problem_id=problem.problem_id, source=problem.source, row=-1, raw=raw, reason="shard_error", detail=detail)


def unsolved(problems: list[Problem], traces: list[TraceRow]) -> list[Unsolved]:
    """The problems that got traces but none accepted, with the passes spent on them and why each failed."""
    by_problem: dict[str, list[TraceRow]] = {}
    for t in traces:
        by_problem.setdefault(t.problem_id, []).append(t)
    out = []
    for p in problems:
        made = by_problem.get(p.problem_id, [])
        if made and all(t.filter_reason for t in made):
            out.append(
                Unsolved(
                    **p.model_dump(), passes=sum(t.nfe for t in made), traces=len(made), filter_reasons=[t.filter_reason for t in made]
                )
            )
    return out


def process_shard(maker: TraceMaker, plan: ShardPlan) -> ShardResult:
    before = dict(maker.timings)
    traces, quarantined = sample_or_quarantine(maker, plan.problems)
    kept = [t for t in traces if t.filter_reason is None]
    filtered = [t for t in traces if t.filter_reason is not None]
    return ShardResult(
        shard=plan.shard,
        increment=plan.increment,
        date=plan.date,
        problems=len(plan.problems),
        sampled=len(traces),
        accepted=len(kept),
        filtered=dict(Counter(t.filter_reason for t in filtered)),
        nfe_sum=sum(t.nfe for t in traces),
        repair_passes=sum(t.nfe for t in traces if t.repaired_from_step is not None),
        scoring_canvases=sum(t.scoring_canvases for t in traces),
        step_score_sum=sum(sum(t.step_scores) for t in traces),
        step_count=sum(len(t.step_scores) for t in traces),
        sample_s=maker.timings["sample_s"] - before["sample_s"],
        score_s=maker.timings["score_s"] - before["score_s"],
        worker=worker_info(maker.adapter),
        traces=kept,
        filtered_traces=filtered,
        unsolved=unsolved(plan.problems, traces),
        quarantined=quarantined,
    )
