"""The build's stages as plain code, usable without Ray: seeds and identities, `TraceMaker` (k
posterior traces per problem, their steps scored) and `process_shard` (sample, score, filter).

Determinism: a problem's sampler seed derives from (spec seed, problem id) and a trace's id from
(spec hash, problem id, sample index), so neither depends on sharding, actor count or resume.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections import Counter

from factory.build.filters import filter_traces
from factory.build.provenance import code_version
from factory.build.spec import BuildSpec, ModelSpec
from factory.core.checks import step_labels
from factory.core.sampler import CanvasSampler, Request, SampleResult, seed_for
from factory.core.scoring import LABEL_SOURCES, StepScorer, Trace, TraceScores
from factory.core.template import ReasoningTemplate
from factory.models.adapter import ModelAdapter
from factory.models.adapter import load_tokenizer as load_model_tokenizer
from schemas.records import Problem, Rejected, ShardPlan, ShardResult, TraceRow, WorkerInfo

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


class TraceMaker:
    """Samples k posterior traces per problem and scores their steps; holds one model."""

    def __init__(self, spec: BuildSpec, adapter: ModelAdapter | None = None):
        self.spec, self.spec_hash = spec, spec.spec_hash()
        m = spec.model
        self.adapter = adapter or ModelAdapter.load(m.id, m.kind, m.revision, m.trust_remote_code, dtype=m.dtype)
        self.template = ReasoningTemplate(self.adapter.tokenizer, spec.template.to_config())
        self.sampler = CanvasSampler(self.adapter, self.template, spec.sampler.to_config())
        self.scorer = StepScorer(self.adapter, self.template, spec.scoring.estimator, spec.scoring.batch_size)
        self.timings = {"sample_s": 0.0, "score_s": 0.0}

    def requests(self, problems: list[Problem]) -> list[Request]:
        """k answer-clamped canvases per problem, each seeded from (spec seed, problem id, sample index)."""
        requests = []
        for i, p in enumerate(problems):
            question, answer = self.template.encode_question(p.question), self.template.encode_answer(p.gold_answer)
            base = problem_seed(self.spec.seed, p.problem_id)
            requests += [Request(question, answer_ids=answer, seed=seed_for(base, 0, j), key=(i, j)) for j in range(self.spec.sampler.k)]
        return requests

    def __call__(self, problems: list[Problem]) -> list[TraceRow]:
        requests = self.requests(problems)
        t0 = time.perf_counter()
        samples = self.sampler.run(requests)
        t1 = time.perf_counter()
        traces = [Trace(r.question_ids, s.reasoning_ids, r.answer_ids) for r, s in zip(requests, samples)]
        scores = self.scorer.score(traces, self_consistency=self.spec.scoring.self_consistency)
        self.timings["sample_s"] += t1 - t0
        self.timings["score_s"] += time.perf_counter() - t1
        return [self.trace_row(problems[r.key[0]], r.key[1], s, sc) for r, s, sc in zip(requests, samples, scores)]

    def trace_row(self, problem: Problem, sample_index: int, sample: SampleResult, scores: TraceScores) -> TraceRow:
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
            step_scores=scores.step_scores,
            prefix_logp=scores.prefix_logp,
            self_consistency=scores.self_consistency,
            final_score=scores.final_score,
            min_step_score=scores.min_step_score,
            step_labels=step_labels(steps, problem.gold_answer, label_scores, scoring.label_threshold),
            scoring_passes=scores.forward_passes,
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


def process_shard(maker: TraceMaker, plan: ShardPlan) -> ShardResult:
    before = dict(maker.timings)
    traces, quarantined = sample_or_quarantine(maker, plan.problems)
    kept, filtered = filter_traces(traces, maker.spec.filters)
    return ShardResult(
        shard=plan.shard,
        increment=plan.increment,
        date=plan.date,
        problems=len(plan.problems),
        sampled=len(traces),
        accepted=len(kept),
        filtered=dict(Counter(t.filter_reason for t in filtered)),
        nfe_sum=sum(t.nfe for t in traces),
        step_score_sum=sum(sum(t.step_scores) for t in traces),
        step_count=sum(len(t.step_scores) for t in traces),
        sample_s=maker.timings["sample_s"] - before["sample_s"],
        score_s=maker.timings["score_s"] - before["score_s"],
        worker=worker_info(maker.adapter),
        traces=kept,
        filtered_traces=filtered,
        quarantined=quarantined,
    )
