"""`factory bench precision`: the same model in float32 and bfloat16 in one run: eval accuracy and
speed, whether a row's output depends on its batch, and the scorers' AUROCs. (`factory eval` itself
is a product command: `factory.train.evaluate`.)"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from factory.build.spec import SamplerSpec
from factory.core.sampler import CanvasSampler, Request, SamplerConfig, SampleResult, seed_for
from factory.core.template import ReasoningTemplate
from factory.lab import scoring
from factory.lab.report import DOCS_HELP, emit, markdown_table, write_section
from factory.models.adapter import ModelAdapter
from factory.synthetic import problems as synthetic
from factory.train.evaluate import dtype_name, evaluate

# ---- factory bench precision ------------------------------------------------------------------

PRECISIONS = ("float32", "bfloat16")


def same_output(a: SampleResult, b: SampleResult) -> bool:
    return a.reasoning_ids == b.reasoning_ids and a.answer_ids == b.answer_ids and a.nfe == b.nfe


def forward_seconds(adapters: dict, template: ReasoningTemplate, questions: list[str], reps: int) -> dict[str, float]:
    """Median seconds of one forward pass over a batch of these questions' canvases (reasoning and
    answer masked), the precisions interleaved so that both see the same machine load."""
    ids, attention = template.collate([template.canvas(template.encode_question(q)) for q in questions])
    times: dict[str, list[float]] = {name: [] for name in adapters}
    for rep in range(reps + 1):
        for name, adapter in adapters.items():
            started = time.perf_counter()
            adapter.logits(ids, attention)
            if rep:  # the first round warms up
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def logit_shift(adapter: ModelAdapter, template: ReasoningTemplate, questions: list[str], alone: int) -> float:
    """The largest change of a logit between reading a canvas (reasoning and answer masked) inside a
    batch of these questions and reading it alone, over the first `alone` canvases."""
    rows = [template.canvas(template.encode_question(q)) for q in questions]
    together = adapter.logits(*template.collate(rows))
    shift = 0.0
    for i, row in enumerate(rows[:alone]):
        single = adapter.logits(*template.collate([row]))[0]
        shift = max(shift, float((single - together[i, -len(row) :]).abs().max()))
    return shift


def requests(template: ReasoningTemplate, problems, posterior: bool, seed: int) -> list[Request]:
    """One canvas per problem (the gold answer clamped when `posterior`), seeded by its index."""
    return [
        Request(
            template.encode_question(p.question),
            answer_ids=template.encode_answer(str(p.answer)) if posterior else None,
            seed=seed_for(seed, i, 0),
            key=(i, 0),
        )
        for i, p in enumerate(problems)
    ]


def decode_together(sampler: CanvasSampler, batch: list[Request]) -> list[SampleResult]:
    """The requests decoded as one batch."""
    return CanvasSampler(sampler.adapter, sampler.template, SamplerConfig(**{**vars(sampler.config), "batch_size": len(batch)})).run(batch)


def rows_changed_by_batch(sampler: CanvasSampler, batch: list[Request], together: list[SampleResult], alone: int) -> int:
    """Of the first `alone` rows decoded together in one batch, how many come out different decoded alone (a batch of one)."""
    single = CanvasSampler(sampler.adapter, sampler.template, SamplerConfig(**{**vars(sampler.config), "batch_size": 1}))
    return sum(not same_output(single.run([r])[0], t) for r, t in zip(batch[:alone], together))


def scoring_aurocs(adapter: ModelAdapter, template: ReasoningTemplate, cases: dict[str, list[dict]], kinds: dict) -> dict:
    """The no-rollout scorers' AUROCs on each table of cases (the scoring bench's methods)."""
    report = {}
    for table, table_cases in cases.items():
        methods, _ = scoring.no_rollout_methods(adapter, template, table_cases, 128, kinds[table], answer_consistency=True)
        report[table] = {name: {k: m[k] for k in ("auroc_partial", "auroc_all")} for name, m in methods.items()}
    return report


def bench_precision(
    model: str, problems, scoring_problems, batch_size: int, alone: int, own_k: int, seed: int, reps: int, progress=lambda report: None
) -> dict:
    """float32 against bfloat16 on the same problems, every figure from this one run; `progress` is
    handed the report after each part."""
    adapters = {name: ModelAdapter.load(model, dtype=name) for name in PRECISIONS}
    template = ReasoningTemplate(adapters["float32"].tokenizer)
    greedy = {name: CanvasSampler(a, template, SamplerConfig(rule="left_to_right", batch_size=batch_size)) for name, a in adapters.items()}
    build = {name: CanvasSampler(a, template, SamplerSpec().to_config()) for name, a in adapters.items()}
    report: dict = {"auto_here": dtype_name(ModelAdapter.load(model, dtype="auto")), "device": str(adapters["float32"].device)}
    report["forward_s"] = forward_seconds(adapters, template, [p.question for p in problems[:batch_size]], reps)
    questions = [p.question for p in problems[:batch_size]]
    report["max_logit_shift"] = {name: logit_shift(a, template, questions, min(alone, 16)) for name, a in adapters.items()}
    # eval: batches of problems, the precisions taking turns, so that both see the same machine load
    batches = [
        requests(template, problems[start : start + batch_size], posterior=False, seed=seed)
        for start in range(0, len(problems), batch_size)
    ]
    results: dict[str, list[SampleResult]] = {name: [] for name in PRECISIONS}
    seconds = dict.fromkeys(PRECISIONS, 0.0)
    for batch in batches:
        for name in PRECISIONS:
            started = time.perf_counter()
            results[name] += greedy[name].run(batch)
            seconds[name] += time.perf_counter() - started
    report["eval"] = {}
    for name in PRECISIONS:
        evaluation = evaluate(greedy[name], problems, results[name])
        canvases = sum(r.nfe for r in results[name])
        report["eval"][name] = {**evaluation, "seconds": round(seconds[name], 1), "canvases_per_s": round(canvases / seconds[name], 1)}
    report["eval_rows_differing_between_precisions"] = sum(not same_output(a, b) for a, b in zip(*results.values()))
    progress(report)
    # batch invariance: the first batch (mixed question lengths) decoded together, then its first `alone` rows each alone
    head = problems[: len(batches[0])]
    posterior = requests(template, head, posterior=True, seed=seed)
    report["rows_changed_by_batch"] = {}
    for name in PRECISIONS:
        report["rows_changed_by_batch"][name] = {
            "greedy_left_to_right": rows_changed_by_batch(greedy[name], batches[0], results[name], alone),
            "build_sampler": rows_changed_by_batch(build[name], posterior, decode_together(build[name], posterior), alone),
            "rows": min(alone, len(head)),
        }
        progress(report)
    if not scoring_problems:
        return report
    # the scorers on the scoring bench's synthetic table and on own traces sampled once (float32)
    cases = {"synthetic": scoring.encodable(template, scoring.scoring_cases(scoring_problems, seed))}
    kinds = {"synthetic": scoring.SCORING_KINDS, "own_traces": scoring.OWN_KINDS}
    if own_k:
        own = scoring.own_trace_cases(adapters["float32"], template, scoring_problems, own_k, seed)
        cases["own_traces"] = [c for c in scoring.encodable(template, own) if c["steps"]]
    report["scoring_traces"] = {table: len(c) for table, c in cases.items()}
    report["scoring"] = {}
    for name in PRECISIONS:
        report["scoring"][name] = scoring_aurocs(adapters[name], template, cases, kinds)
        progress(report)
    return report


def precision_markdown(report: dict, command: str) -> str:
    f32, b16 = (report["eval"][name] for name in PRECISIONS)
    eval_rows = [
        {
            "dtype": name,
            "accuracy": e["accuracy"],
            **{f"{k} steps": v for k, v in e["accuracy_by_steps"].items()},
            "mean_nfe": e["mean_nfe"],
            "canvases/s": e["canvases_per_s"],
            "forward_s (batch)": report["forward_s"][name],
        }
        for name, e in report["eval"].items()
    ]
    step_columns = [f"{k} steps" for k in f32["accuracy_by_steps"]]
    invariance_rows = [{"dtype": name, **v} for name, v in report["rows_changed_by_batch"].items()]
    tables = list(report.get("scoring_traces", {}))
    scoring_columns = [f"{table} {name}" for table in tables for name in PRECISIONS]
    scoring_rows = [
        {
            "method": method,
            **{f"{table} {name}": report["scoring"][name][table][method]["auroc_partial"] for table in tables for name in PRECISIONS},
        }
        for method in (report["scoring"]["float32"]["synthetic"] if tables else [])
    ]
    return (
        f"## Precision\n\n`{command}` on {report['device']} (`auto` resolves to {report['auto_here']} here): the same model "
        "loaded in float32 and bfloat16, every figure from this one run.\n\n"
        f"`factory eval` (greedy, left to right, batches of {report['eval_batch']}, the precisions taking turns batch by batch); "
        f"`forward_s`: the median of one forward pass over a batch of {report['eval_batch']} canvases. bfloat16 runs "
        f"{b16['canvases_per_s'] / f32['canvases_per_s']:.2f}x the canvases/s of float32 "
        f"({report['forward_s']['float32'] / report['forward_s']['bfloat16']:.2f}x on the bare forward pass); "
        f"{report['eval_rows_differing_between_precisions']} of {f32['n']} decoded rows differ between the two.\n\n"
        + markdown_table(eval_rows, ["dtype", "accuracy", *step_columns, "mean_nfe", "canvases/s", "forward_s (batch)"])
        + "\n\nBatch invariance: rows whose output (reasoning, answer, passes) differs between decoding the problem inside "
        f"one batch of {report['eval_batch']} problems of mixed question lengths and decoding it alone. `greedy_left_to_right` "
        "is `factory eval`'s decoding; `build_sampler` the default build's (the gold answer clamped, the spec's rule and "
        "temperature, each row's own seeded generator).\n\n"
        + markdown_table(invariance_rows, ["dtype", "greedy_left_to_right", "build_sampler", "rows"])
        + "\n\n"
        + precision_decision(report["rows_changed_by_batch"])
        + (
            " The largest change of a logit between reading a canvas alone and inside the batch (its first pass, "
            f"{min(report['alone'], 16)} canvases): "
            + ", ".join(f"{name} {shift:.2g}" for name, shift in report["max_logit_shift"].items())
            + "."
            if "max_logit_shift" in report
            else ""
        )
        + " Every rule in bfloat16: the section Samplers (bfloat16 weights), `factory bench samplers --dtype bfloat16`."
        + (
            f"\n\nThe step scorers' `auroc_partial` on the scoring bench's tables: its first {report['scoring_n']} problems "
            f"(2–5 steps, seed 2026), corrupted and sampled with seed {report['seed']}, {report['own_k']} own traces per problem "
            f"sampled once, in float32 ({report['scoring_traces']} traces), every trace scored in each precision:\n\n"
            + markdown_table(scoring_rows, ["method", *scoring_columns])
            + "\n"
            if tables
            else "\n"
        )
    )


def precision_decision(changed: dict) -> str:
    """The default the batch-invariance figures call for, in words."""
    moved = {name: v["greedy_left_to_right"] + v["build_sampler"] for name, v in changed.items()}
    b16 = changed["bfloat16"]
    if moved["bfloat16"] and not moved["float32"]:
        return (
            f"In bfloat16 a row's output depends on its batch ({b16['greedy_left_to_right']} of {b16['rows']} greedy rows and "
            f"{b16['build_sampler']} of {b16['rows']} build-sampler rows change when decoded alone); in float32 none does. "
            + (
                "Greedy decoding stayed batch-invariant on these rows, but that is no guarantee: the batch moves a row's "
                "bfloat16 logits (see below), which flips a greedy argmax only at a near-tie and a sampled token or a "
                "commit decision more often. "
                if not b16["greedy_left_to_right"]
                else ""
            )
            + "The "
            "factory promises that a trace does not depend on its batch, shard or resume, so `model.dtype` stays `float32` by "
            "default (the default build's rows as before); `bfloat16`, and `auto` (bfloat16 where the hardware runs it fast), "
            "are opt-ins for speed whose traces may change with what they were batched with."
        )
    if not any(moved.values()):
        return (
            "No row changed with its batch in either precision on these rows; `model.dtype` stays `float32` by default all the "
            "same, so the default build's rows are the ones it wrote before, and `auto` is an opt-in."
        )
    return f"Rows changed by their batch: {moved}; `model.dtype` stays `float32` by default."


def cli_precision(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="factory bench precision", description="float32 against bfloat16 weights, in one run.")
    ap.add_argument("--n", type=int, default=256, help="eval problems")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--min-steps", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--alone", type=int, default=64, help="rows of the first batch decoded again alone")
    ap.add_argument("--scoring-n", type=int, default=48, help="problems for the scoring bench's tables (0: skip)")
    ap.add_argument("--own-k", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5, help="timed forward passes per precision")
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--docs", type=Path, help=DOCS_HELP)
    args = ap.parse_args(argv)
    problems = synthetic.generate(args.n, args.seed, synthetic.SyntheticConfig(args.min_steps, args.max_steps))
    scoring_problems = synthetic.generate(args.scoring_n, 2026, synthetic.SyntheticConfig(2, 5))
    report = {
        "model": args.model,
        "n": args.n,
        "seed": args.seed,
        "eval_batch": args.batch_size,
        "alone": args.alone,
        "scoring_n": args.scoring_n,
        "own_k": args.own_k,
    }
    partial = lambda part: emit({**report, **part}, args.json)  # noqa: E731
    report.update(
        bench_precision(args.model, problems, scoring_problems, args.batch_size, args.alone, args.own_k, args.seed, args.reps, partial)
    )
    emit(report, args.json)
    command = " ".join(["factory bench precision", *argv]).replace(f" --json {args.json}", "").replace(f" --docs {args.docs}", "")
    if args.docs:
        write_section("precision", precision_markdown(report, command), args.docs)
