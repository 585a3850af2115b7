"""`factory bench padding`: the share of pad tokens in the sampler's forward passes, with and without
admitting requests by question length, on synthetic problems and on GSM8k-like question lengths."""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

from factory.core.sampler import CanvasSampler, SamplerConfig
from factory.core.template import ReasoningTemplate, TemplateConfig
from factory.lab.report import DOCS_HELP, emit, markdown_table, write_section
from factory.models.adapter import ModelAdapter
from factory.synthetic import problems as synthetic

# GSM8k's test questions: 15 to 164 words, median 43, 95th percentile 82 (a log-normal fits both).
GSM8K_WORDS = {"min": 15, "max": 164, "median": 43, "p95": 82}


def gsm8k_like_questions(n: int, seed: int) -> list[str]:
    """Questions of the generator's own words whose lengths follow GSM8k's word counts."""
    rng = random.Random(seed)
    sigma = math.log(GSM8K_WORDS["p95"] / GSM8K_WORDS["median"]) / 1.645
    pool = [p.question for p in synthetic.generate(200, seed, synthetic.SyntheticConfig(1, 6))]
    questions = []
    for _ in range(n):
        words = round(min(GSM8K_WORDS["max"], max(GSM8K_WORDS["min"], rng.lognormvariate(math.log(GSM8K_WORDS["median"]), sigma))))
        text = []
        while len(text) < words:
            text += rng.choice(pool).split()
        questions.append(" ".join(text[:words]))
    return questions


def pad_share(adapter, template, questions: list[str], grouped: bool, batch_size: int) -> dict:
    config = SamplerConfig(rule="med_prefix", rule_params={"lam": 0.3}, batch_size=batch_size, group_by_length=grouped)
    sampler = CanvasSampler(adapter, template, config)
    sampler.generate(questions)
    s = sampler.stats
    return {"pad_share": round(s["pad_tokens"] / s["tokens"], 4), "tokens": s["tokens"], "seconds": round(s["forward_s"], 2)}


def bench_padding(model: str, n: int, seed: int, batch_size: int) -> dict:
    adapter = ModelAdapter.load(model)
    template = ReasoningTemplate(adapter.tokenizer, TemplateConfig(max_question_tokens=512))
    workloads = {
        "synthetic 1-6 steps": [p.question for p in synthetic.generate(n, seed, synthetic.SyntheticConfig(1, 6))],
        "GSM8k-like lengths": gsm8k_like_questions(n, seed),
    }
    report = {"model": adapter.model_id, "n": n, "seed": seed, "batch_size": batch_size, "workloads": {}}
    for name, questions in workloads.items():
        report["workloads"][name] = {
            f"{'grouped' if g else 'arrival order'}": pad_share(adapter, template, questions, g, batch_size) for g in (False, True)
        }
    return report


def padding_markdown(report: dict) -> str:
    rows = [{"workload": name, "order": order, **figures} for name, runs in report["workloads"].items() for order, figures in runs.items()]
    return (
        f"## Padding\n\n`factory bench padding --n {report['n']} --seed {report['seed']}` ({report['model']}, batch {report['batch_size']},"
        " MED-prefix λ 0.3, greedy): the share of pad tokens in the sampler's forward passes, requests admitted in arrival order or"
        " shortest question first. Either way a pass leaves out the columns that every active row pads. GSM8k-like: questions of the"
        f" generator's words with GSM8k's word counts ({GSM8K_WORDS}).\n\n"
        f"{markdown_table(rows, ['workload', 'order', 'pad_share', 'tokens', 'seconds'])}\n"
    )


def cli_padding(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="factory bench padding", description=__doc__)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--docs", type=Path, help=DOCS_HELP)
    args = ap.parse_args(argv)
    report = bench_padding(args.model, args.n, args.seed, args.batch_size)
    emit(report, args.json)
    if args.docs:
        write_section("padding", padding_markdown(report), args.docs)
