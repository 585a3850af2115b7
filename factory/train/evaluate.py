"""`factory eval`: decode fresh synthetic problems with the answer masked and score the answers, on
the canvas the model was trained on (a fine-tuned model's config.json records it as `factory_template`;
any other model decodes on the default canvas)."""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path

from factory.core.sampler import CanvasSampler, SamplerConfig, SampleResult
from factory.core.template import ReasoningTemplate, TemplateConfig
from factory.models.adapter import DTYPES, ModelAdapter
from factory.synthetic import problems as synthetic


def emit(report: dict, json_path: Path | None) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text + "\n")


def model_template(adapter: ModelAdapter) -> TemplateConfig:
    """The canvas a model was fine-tuned on (`factory finetune` writes it into config.json), else the default."""
    recorded = getattr(adapter.model.config, "factory_template", None)
    return TemplateConfig(**recorded) if recorded else TemplateConfig()


def dtype_name(adapter: ModelAdapter) -> str:
    return str(adapter.dtype).removeprefix("torch.")


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


def evaluate(sampler: CanvasSampler, problems: list[synthetic.SyntheticProblem], results: list[SampleResult] | None = None) -> dict:
    """Accuracy, plus each wrong answer's cause at its first step that differs from the gold steps
    (`results`: the problems already decoded, in order)."""
    results = sampler.generate([p.question for p in problems]) if results is None else results
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
    ap.add_argument("--dtype", choices=DTYPES, default="float32", help="the model's weights (auto: bfloat16 where it runs fast)")
    ap.add_argument("--json", type=Path, help="write the report here too")
    args = ap.parse_args(argv)
    adapter = ModelAdapter.load(args.model, dtype=args.dtype)
    template = ReasoningTemplate(adapter.tokenizer, model_template(adapter))
    sampler = CanvasSampler(adapter, template, SamplerConfig(rule=args.rule, rule_params=args.rule_params, batch_size=args.batch_size))
    problems = synthetic.generate(args.n, args.seed, synthetic.SyntheticConfig(args.min_steps, args.max_steps))
    started = time.perf_counter()
    report = {"model": adapter.model_id, "dtype": dtype_name(adapter), "seed": args.seed, "rule": args.rule}
    report |= {"template": asdict(template.config), **evaluate(sampler, problems)}
    report["canvases_per_s"] = round(report["mean_nfe"] * len(problems) / (time.perf_counter() - started), 1)
    emit(report, args.json)
