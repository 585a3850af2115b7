"""`factory eval`: decode fresh synthetic problems with the answer masked and score the answers."""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

from factory.core.sampler import CanvasSampler, SamplerConfig
from factory.core.template import ReasoningTemplate
from factory.lab.report import emit
from factory.models.adapter import ModelAdapter
from factory.synthetic import problems as synthetic


def accuracy_report(problems: list[synthetic.SyntheticProblem], answers: list[str | None], nfe: list[int]) -> dict:
    by_steps: dict[str, list[bool]] = defaultdict(list)
    correct = [a == str(p.answer) for p, a in zip(problems, answers, strict=True)]
    for p, ok in zip(problems, correct):
        by_steps[str(len(p.ops))].append(ok)
    return {
        "n": len(problems),
        "accuracy": sum(correct) / len(problems),
        "accuracy_by_steps": {k: sum(v) / len(v) for k, v in sorted(by_steps.items())},
        "mean_nfe": sum(nfe) / len(nfe),
    }


def evaluate(sampler: CanvasSampler, problems: list[synthetic.SyntheticProblem]) -> dict:
    """Accuracy, plus each wrong answer's cause at its first step that differs from the gold steps."""
    results = sampler.generate([p.question for p in problems])
    answers = [sampler.template.parse_answer(r.answer_ids) for r in results]
    causes = Counter(
        synthetic.classify_decoding(p, sampler.template.split_steps(r.reasoning_ids), a) for p, r, a in zip(problems, results, answers)
    )
    errors = {kind: causes[kind] for kind in synthetic.DECODING_ERRORS}
    return {**accuracy_report(problems, answers, [r.nfe for r in results]), "errors": errors}


def cli_eval(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="factory eval", description="Greedy decoding accuracy on fresh synthetic problems.")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--min-steps", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=4)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--rule", default="left_to_right", help="unmasking rule (default: one token per step, left to right)")
    ap.add_argument("--rule-params", type=json.loads, default={}, help="JSON, e.g. '{\"lam\": 0.3}'")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--json", type=Path, help="write the report here too")
    args = ap.parse_args(argv)
    adapter = ModelAdapter.load(args.model)
    template = ReasoningTemplate(adapter.tokenizer)
    sampler = CanvasSampler(adapter, template, SamplerConfig(rule=args.rule, rule_params=args.rule_params, batch_size=args.batch_size))
    problems = synthetic.generate(args.n, args.seed, synthetic.SyntheticConfig(args.min_steps, args.max_steps))
    report = {"model": adapter.model_id, "seed": args.seed, "rule": args.rule, **evaluate(sampler, problems)}
    emit(report, args.json)
