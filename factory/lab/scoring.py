"""`factory bench scoring`: step scorers on clean and corrupted traces, AUROC against forward passes."""

from __future__ import annotations

import argparse
import math
import random
from collections import Counter
from pathlib import Path

from factory.build.spec import ScoringSpec
from factory.core.checks import step_labels
from factory.core.sampler import CanvasSampler, Request, SamplerConfig, seed_for
from factory.core.scoring import ANSWER_CONSISTENCY_SOURCE, LABEL_SOURCES, StepScorer, Trace, equals_offset, share_canvases
from factory.core.template import ReasoningTemplate, TemplateError
from factory.lab.report import DOCS_HELP, auroc, emit, markdown_table, scatter_plot, write_section
from factory.models.adapter import DTYPES, ModelAdapter
from factory.synthetic import problems as synthetic

SCORING_KINDS = synthetic.CORRUPTION_KINDS
OWN_KINDS = ("arithmetic_slip", "wrong_operand", "wrong_operation", "unreadable_step", "extra_steps")  # at a trace's first departure
STEPS_LEFT = ("1", "2", "3+")  # reasoning steps a partial prefix leaves masked
FIRST_ERROR_COLUMNS = ("first_error_accuracy", "lowest_after_first_error")  # where a wrong trace's lowest step falls
NFE_COLUMNS = ("nfe_per_step", "nfe_beyond_one_pass")  # a method's own distinct canvases; those it adds to the answer reads
# The consistency reads with the gold answer visible: both reads, and the result read alone.
ANSWER_CONSISTENCY = ("answer_consistency", "answer_result_consistency")
BENCH_LABEL_SOURCES = {**LABEL_SOURCES, **ANSWER_CONSISTENCY_SOURCE}  # the build's label sources and the candidate
LABEL_THRESHOLD_GRID = (-0.1, -0.2, -0.3, -0.5, -0.7, -1.0, -1.5, -2.0, -3.0, -5.0)  # nats, for PRM label calibration


def scoring_cases(problems, seed: int) -> list[dict]:
    """Clean traces and one corrupted trace of every kind per problem, each with its first error."""
    rng = random.Random(seed)
    cases = []
    for p in problems:
        cases.append({"problem": p, "kind": "clean", "steps": p.steps, "first_error": None})
        for kind in SCORING_KINDS:
            trace = synthetic.corrupt(p, kind, rng)
            if trace is not None:
                cases.append({"problem": p, "kind": kind, "steps": trace.steps, "first_error": trace.first_error})
    return cases


def _prefix_values(method: str, scores, k: int) -> float:
    """The value a method gives the prefix of k >= 1 steps."""
    if method in ("one_pass", "chain_rule"):
        return scores.prefix_logp[k]
    if method == "combined":
        return scores.prefix_logp[k] + min(scores.self_consistency[:k])
    return min(getattr(scores, method)[:k])  # a prefix is as good as its worst step


def _step_values(method: str, scores) -> list[float]:
    if method in ("self_consistency", "result_consistency", *ANSWER_CONSISTENCY):
        return getattr(scores, method)
    if method == "combined":
        return [a + b for a, b in zip(scores.step_scores, scores.self_consistency)]
    return scores.step_scores


def summarise(
    cases: list[dict], values: list[list[float]], step_values: list[list[float] | None], passes: float, kinds=SCORING_KINDS
) -> dict:
    """AUROC of prefix values separating error-free prefixes (positive) from ones holding an error."""
    pos_all, neg_all, pos_part, neg_part = [], [], [], []
    neg_by_kind: dict[str, list[float]] = {k: [] for k in kinds}
    by_left: dict[str, tuple[list[float], list[float]]] = {left: ([], []) for left in STEPS_LEFT}
    first_hits, lowest_later, first_total = 0, 0, 0
    for case, vals, steps in zip(cases, values, step_values):
        n = len(case["steps"])
        for k, v in enumerate(vals, start=1):
            bad = case["first_error"] is not None and k > case["first_error"]
            (neg_all if bad else pos_all).append(v)
            if k < n:
                (neg_part if bad else pos_part).append(v)
                by_left[STEPS_LEFT[min(n - k, len(STEPS_LEFT)) - 1]][bad].append(v)
                if bad:
                    neg_by_kind[case["kind"]].append(v)
        if case["first_error"] is not None and steps:
            first_total += 1
            lowest = min(range(len(steps)), key=steps.__getitem__)
            first_hits += lowest == case["first_error"]
            lowest_later += lowest > case["first_error"]
    return {
        "auroc_partial": auroc(pos_part, neg_part),
        "auroc_all": auroc(pos_all, neg_all),
        "auroc_by_kind": {k: auroc(pos_part, v) for k, v in neg_by_kind.items()},
        # how far ahead the prefix leaves the answer: a one-pass read must compute every step still masked
        "auroc_partial_by_steps_left": {left: auroc(pos, neg) for left, (pos, neg) in by_left.items()},
        "first_error_accuracy": first_hits / first_total if first_total else None,
        # where the lowest-scored step of a wrong trace falls after its first error instead
        "lowest_after_first_error": lowest_later / first_total if first_total else None,
        "nfe_per_step": round(passes, 3),
    }


def rollout_values(adapter, template, cases, n_rollouts: int, batch_size: int) -> tuple[list[list[float]], float]:
    """Math-Shepherd: from each prefix, N sampled completions; the value is the share reaching the gold answer."""
    sampler = CanvasSampler(
        adapter,
        template,
        SamplerConfig(rule="med_prefix", rule_params={"lam": 0.3}, temperature=1.0, batch_size=batch_size, early_exit_gamma=0.1),
    )
    scorer, requests = StepScorer(adapter, template), []
    for c_i, case in enumerate(cases):
        q = template.encode_question(case["problem"].question)
        reasoning = template.encode_reasoning(case["steps"])
        for k in range(1, len(case["steps"]) + 1):
            end = scorer.visible_end(reasoning, k)
            partial = reasoning[:end] + [adapter.mask_id] * (len(reasoning) - end)
            requests += [Request(q, reasoning_ids=partial, seed=seed_for(c_i, k, r), key=(c_i, k)) for r in range(n_rollouts)]
    results = sampler.run(requests)
    hits: dict[tuple[int, int], int] = {}
    for req, res in zip(requests, results):
        gold = str(cases[req.key[0]]["problem"].answer)
        hits[req.key] = hits.get(req.key, 0) + int(template.parse_answer(res.answer_ids) == gold)
    values = [[hits[(c_i, k)] / n_rollouts for k in range(1, len(c["steps"]) + 1)] for c_i, c in enumerate(cases)]
    total_steps = sum(len(c["steps"]) for c in cases)
    return values, sum(r.nfe for r in results) / total_steps


def med_completion_values(adapter, template, cases, batch_size: int) -> tuple[list[list[float]], float]:
    """Complete each prefix's masked remainder greedily with MED, then read log p(gold answer)."""
    sampler = CanvasSampler(adapter, template, SamplerConfig(rule="med_prefix", rule_params={"lam": 0.3}, batch_size=batch_size))
    scorer = StepScorer(adapter, template)
    requests = []
    for c_i, case in enumerate(cases):
        q = template.encode_question(case["problem"].question)
        reasoning = template.encode_reasoning(case["steps"])
        for k in range(1, len(case["steps"]) + 1):
            end = scorer.visible_end(reasoning, k)
            requests.append(Request(q, reasoning_ids=reasoning[:end] + [adapter.mask_id] * (len(reasoning) - end), key=(c_i, k)))
    results = sampler.run(requests)
    rows = [
        scorer.answer_row(req.question_ids, res.reasoning_ids, template.encode_answer(str(cases[req.key[0]]["problem"].answer)))
        for req, res in zip(requests, results)
    ]
    logps = iter(sum(v) for v in scorer.read_logprobs(rows))
    values = [[next(logps) for _ in range(len(c["steps"]))] for c in cases]
    total_steps = sum(len(c["steps"]) for c in cases)
    return values, (sum(r.nfe for r in results) + len(rows)) / total_steps


def own_trace_cases(adapter, template, problems, k: int, seed: int) -> list[dict]:
    """The model's own posterior traces (gold answer clamped; temperature 1, so the k samples differ),
    each labelled at its first step that departs from the gold steps, with what is wrong there."""
    config = SamplerConfig(rule="med_prefix", rule_params={"lam": 0.3}, temperature=1.0, batch_size=64)
    sampler = CanvasSampler(adapter, template, config)
    results = sampler.posterior([p.question for p in problems], [str(p.answer) for p in problems], k=k, seed=seed)
    cases = []
    for i, result in enumerate(results):
        problem, steps = problems[i // k], template.split_steps(result.reasoning_ids)
        j = synthetic.first_departure(problem, steps)
        kind = "clean" if j is None else "extra_steps" if j >= len(problem.steps) else synthetic.step_error(steps[j], problem.steps[j])
        cases.append({"problem": problem, "kind": kind, "steps": steps, "first_error": j})
    return cases


def encodable(template, cases: list[dict]) -> list[dict]:
    """The cases whose steps fit the canvas (the rest cannot be scored)."""
    kept = []
    for case in cases:
        try:
            template.encode_reasoning(case["steps"])
        except TemplateError:
            continue
        kept.append(case)
    return kept


def lookahead_report(adapter, template, problems, batch_size: int = 128) -> dict:
    """What one pass computes ahead of the reasoning, by the steps left masked. On clean prefixes read
    as the one-pass scorer reads them (k gold steps visible, all later slots masked): the share whose
    argmax spells the first masked step's operands and operator, its result, and the gold answer; a
    wrong visible step moves p(gold) only as far as the model computes what is masked. Then that step
    written up to its last operand token: is one hidden operand enough to lose the result?"""
    scorer, probes = StepScorer(adapter, template), []
    for p in problems:
        try:
            question, reasoning = template.encode_question(p.question), template.encode_reasoning(p.steps)
            answer = template.encode_answer(str(p.answer))
        except TemplateError:
            continue
        step_spans = template.step_spans(reasoning)
        for k, (start, end) in enumerate(step_spans):
            equals = start + equals_offset(template, reasoning[start:end])
            if equals <= start:
                continue  # a step without operands before an '=' has no result to read
            left = STEPS_LEFT[min(len(step_spans) - k, len(STEPS_LEFT)) - 1]
            for visible in (scorer.visible_end(reasoning, k), equals - 1):
                masked = reasoning[:visible] + [adapter.mask_id] * (len(reasoning) - visible)
                probes.append((template.canvas(question, masked, None), reasoning, answer, (start, equals, end), left))
    guesses = []
    for at in range(0, len(probes), batch_size):
        ids, attention = template.collate([probe[0] for probe in probes[at : at + batch_size]])
        spans = template.spans(ids.shape[1])
        predicted = adapter.logits(ids, attention).argmax(-1).cpu()
        guesses += [(row[spans.reasoning].tolist(), row[spans.answer].tolist()) for row in predicted]
    tally = {left: Counter() for left in STEPS_LEFT}
    for (prefix, prefix_answer), (one_hidden, _), probe in zip(guesses[0::2], guesses[1::2], probes[0::2]):
        _, reasoning, answer, (start, equals, end), left = probe
        scored = scorer.template.written_length(answer)
        tally[left].update(
            prefixes=1,
            operands_and_operator=prefix[start:equals] == reasoning[start:equals],
            result=prefix[equals:end] == reasoning[equals:end],
            answer=prefix_answer[:scored] == answer[:scored],
            result_one_operand_masked=one_hidden[equals:end] == reasoning[equals:end],
        )
    columns = ("operands_and_operator", "result", "answer", "result_one_operand_masked")
    return {left: {"prefixes": c["prefixes"], **{k: c[k] / c["prefixes"] for k in columns}} for left, c in tally.items() if c["prefixes"]}


def no_rollout_methods(
    adapter, template, cases: list[dict], batch_size: int, kinds=SCORING_KINDS, answer_consistency: bool = False
) -> tuple[dict, list]:
    """Every scorer that reads the model without sampling, summarised over the cases; and the
    marginal estimator's scores of each case. `answer_consistency`: the answer-visible reads too."""
    traces = [
        Trace(
            template.encode_question(c["problem"].question),
            template.encode_reasoning(c["steps"]),
            template.encode_answer(str(c["problem"].answer)),
        )
        for c in cases
    ]
    total_steps = sum(len(c["steps"]) for c in cases)
    methods = {}
    marginal_names = ("one_pass", "result_consistency", "self_consistency", "combined", *(ANSWER_CONSISTENCY if answer_consistency else ()))
    for estimator, names in (("marginal", marginal_names), ("chain", ("chain_rule",))):
        scorer = StepScorer(adapter, template, estimator=estimator, batch_size=batch_size)
        marginal = estimator == "marginal"
        scores = scorer.score(traces, self_consistency=marginal, answer_consistency=marginal and answer_consistency)
        if estimator == "marginal":
            marginal_scores = scores
        # Passes are the distinct canvases a method reads (the scorer reads each once): the answer read
        # after k steps and the operand read of step k+1 are one canvas, and so is a prefix that a clean
        # trace and its corrupted twin share before the error.
        prefix = [row for t in traces for row in scorer.prefix_rows(t)]
        consistency = [row for t in traces for row in scorer.consistency_rows(t)]
        answered = [row for t in traces for row in scorer.consistency_rows(t, answer_visible=True)]
        distinct = lambda rows: len(share_canvases(rows)[0])  # noqa: E731
        reads = {
            "one_pass": prefix,
            "chain_rule": prefix,
            "result_consistency": consistency[0::2],  # its half of the rows: one per step
            "self_consistency": consistency,
            "combined": prefix + consistency,
            "answer_result_consistency": answered[0::2],
            "answer_consistency": answered,
        }
        for name in names:
            values = [[_prefix_values(name, s, k) for k in range(1, len(c["steps"]) + 1)] for c, s in zip(cases, scores)]
            step_values = [_step_values(name, s) for s in scores]
            methods[name] = summarise(cases, values, step_values, distinct(reads[name]) / total_steps, kinds)
            # What a build pays for it on top of the answer reads it always makes (shared canvases read once).
            methods[name]["nfe_beyond_one_pass"] = round((distinct(prefix + reads[name]) - distinct(prefix)) / total_steps, 3)
    return methods, marginal_scores


def true_first_error(case: dict) -> int | None:
    """The first wrong step: the first departure from the gold steps, or the last step of a trace
    that stops before the gold steps end (each step right, the conclusion missing)."""
    if case["first_error"] is None and len(case["steps"]) < len(case["problem"].steps):
        return len(case["steps"]) - 1
    return case["first_error"]


def case_labels(case: dict, trace_scores, source: str, threshold: float | None) -> list[bool]:
    """A case's PRM step labels from one label source; threshold None: the exact checks alone."""
    scores = getattr(trace_scores, BENCH_LABEL_SOURCES[source])
    return step_labels(case["steps"], str(case["problem"].answer), scores, -math.inf if threshold is None else threshold)


def label_quality(cases: list[dict], scores: list, source: str, threshold: float | None) -> dict:
    """How well the PRM step labels (`checks.step_labels`) match the truth: a step is good when it
    comes before the trace's first wrong step. `first_error_found`: the share of traces with a wrong
    step whose first False label is at it (ProcessBench's task). None where nothing was counted.
    Threshold None: the exact checks alone."""
    counts, found, with_error = Counter(), 0, 0
    for case, trace_scores in zip(cases, scores):
        labels = case_labels(case, trace_scores, source, threshold)
        first_error = true_first_error(case)
        for j, label in enumerate(labels):
            counts[(first_error is None or j < first_error, label)] += 1
        if first_error is not None:
            with_error += 1
            found += next((j for j, label in enumerate(labels) if not label), None) == first_error
    good, bad = counts[(True, True)] + counts[(True, False)], counts[(False, True)] + counts[(False, False)]
    share = lambda hits, total: hits / total if total else None  # noqa: E731
    return {
        "threshold": threshold,
        "accuracy": share(counts[(True, True)] + counts[(False, False)], good + bad),
        "good_steps_kept": share(counts[(True, True)], good),
        "bad_steps_caught": share(counts[(False, False)], bad),
        "first_error_found": share(found, with_error),
    }


def prm_label_report(cases: list[dict], scores: list, sources=LABEL_SOURCES) -> dict:
    """Per label source: the labels at the spec's default threshold, and the threshold of the grid
    with the best balanced accuracy (to calibrate another model; only with both good and bad steps).
    Then the exact checks alone, which every source builds on: what a score adds."""
    report = {}
    for source in sources:
        report[source] = {"at_default": label_quality(cases, scores, source, ScoringSpec().label_threshold)}
        sweep = [label_quality(cases, scores, source, t) for t in LABEL_THRESHOLD_GRID]
        if all(q["good_steps_kept"] is not None and q["bad_steps_caught"] is not None for q in sweep):
            report[source]["best"] = max(sweep, key=lambda q: q["good_steps_kept"] + q["bad_steps_caught"])
    report["exact_checks_only"] = {"no_score": label_quality(cases, scores, "self_consistency", None)}
    return report


def sft_filter_report(cases: list[dict], scores: list) -> dict:
    """What reaches the SFT data under the default filters: the traces that pass the exact checks
    (gold answer reached, every equation true) and how many of them hold a wrong step; then the
    same after the step-label filter."""
    spec = ScoringSpec()
    checked = [(c, s) for c, s in zip(cases, scores) if all(case_labels(c, s, spec.label_source, None))]
    labelled = [(c, s) for c, s in checked if all(case_labels(c, s, spec.label_source, spec.label_threshold))]
    wrong = lambda pairs: sum(true_first_error(c) is not None for c, _ in pairs)  # noqa: E731
    return {
        "passed_checks": len(checked),
        "wrong_among_them": wrong(checked),
        "passed_step_labels": len(labelled),
        "wrong_after_step_labels": wrong(labelled),
    }


def bench_scoring(
    adapter, template, problems, seed: int, rollouts: int, own_k: int = 0, batch_size: int = 128, answer_consistency: bool = False
) -> dict:
    cases = encodable(template, scoring_cases(problems, seed))
    methods, _ = no_rollout_methods(adapter, template, cases, batch_size, answer_consistency=answer_consistency)
    values, passes = med_completion_values(adapter, template, cases, batch_size=64)
    methods["med_completion"] = summarise(cases, values, [None] * len(cases), passes)
    if rollouts:
        values, passes = rollout_values(adapter, template, cases, rollouts, batch_size=64)
        methods[f"rollout_{rollouts}"] = summarise(cases, values, [None] * len(cases), passes)
    report = {
        "traces": len(cases),
        "by_kind": {k: sum(c["kind"] == k for c in cases) for k in ("clean", *SCORING_KINDS)},
        "methods": methods,
        "lookahead": lookahead_report(adapter, template, problems, batch_size),
    }
    if own_k:
        own = [c for c in encodable(template, own_trace_cases(adapter, template, problems, own_k, seed)) if c["steps"]]
        own_methods, own_scores = no_rollout_methods(adapter, template, own, batch_size, OWN_KINDS, answer_consistency)
        report["own_traces"] = {
            "sampled": len(problems) * own_k,
            "traces": len(own),
            "by_kind": {k: sum(c["kind"] == k for c in own) for k in ("clean", *OWN_KINDS)},
            "methods": own_methods,
            "prm_labels": prm_label_report(own, own_scores, BENCH_LABEL_SOURCES if answer_consistency else LABEL_SOURCES),
            "sft_filter": sft_filter_report(own, own_scores),
        }
    return report


def scoring_table(methods: dict, kinds) -> str:
    rows = [
        {"method": k, **{c: v.get(c, "") for c in ("auroc_partial", "auroc_all", *FIRST_ERROR_COLUMNS, *NFE_COLUMNS)}, **v["auroc_by_kind"]}
        for k, v in methods.items()
    ]
    return markdown_table(rows, ["method", "auroc_partial", "auroc_all", *kinds, *FIRST_ERROR_COLUMNS, *NFE_COLUMNS])


def steps_left_table(methods: dict) -> str:
    rows = [{"method": k, **{f"{left} left": v["auroc_partial_by_steps_left"][left] for left in STEPS_LEFT}} for k, v in methods.items()]
    return markdown_table(rows, ["method", *(f"{left} left" for left in STEPS_LEFT)])


def lookahead_table(report: dict) -> str:
    rows = [{"steps left": left, **shares} for left, shares in report.items()]
    return markdown_table(rows, ["steps left", "prefixes", "operands_and_operator", "result", "answer", "result_one_operand_masked"])


def prm_label_table(report: dict) -> str:
    rows = [{"label_source": source, "setting": setting, **q} for source, by in report.items() for setting, q in by.items()]
    columns = ["label_source", "setting", "threshold", "accuracy", "good_steps_kept", "bad_steps_caught", "first_error_found"]
    return markdown_table(rows, columns)


def cli_scoring(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="factory bench scoring")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--min-steps", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=5)
    ap.add_argument("--rollouts", type=int, default=8, help="N completions per prefix for the rollout baseline (0: skip)")
    ap.add_argument("--own-k", type=int, default=4, help="the model's own posterior traces per problem, scored too (0: skip)")
    ap.add_argument(
        "--answer-consistency", action="store_true", help="also the consistency reads with the gold answer visible (2 canvases a step)"
    )
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--dtype", choices=DTYPES, default="float32", help="the model's weights (auto: bfloat16 where it runs fast)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--docs", type=Path, help=DOCS_HELP)
    args = ap.parse_args(argv)
    adapter = ModelAdapter.load(args.model, dtype=args.dtype)
    template = ReasoningTemplate(adapter.tokenizer)
    problems = synthetic.generate(args.n, args.seed, synthetic.SyntheticConfig(args.min_steps, args.max_steps))
    report = {
        "n": args.n,
        "seed": args.seed,
        "model": adapter.model_id,
        "dtype": str(adapter.dtype).removeprefix("torch."),
        **bench_scoring(adapter, template, problems, args.seed, args.rollouts, args.own_k, answer_consistency=args.answer_consistency),
    }
    emit(report, args.json)
    if not args.docs:
        return
    methods = report["methods"]
    plot = args.docs.parent / "scoring_auroc.png"
    scatter_plot(
        plot,
        {k: (v["nfe_per_step"], v["auroc_partial"]) for k, v in methods.items()},
        "canvas passes per step",
        "AUROC (partial prefixes)",
        "step scoring",
    )
    md = (
        f"## Step scoring\n\n`factory bench scoring --n {args.n} --seed {args.seed} --rollouts {args.rollouts} --own-k {args.own_k}"
        + (" --answer-consistency" if args.answer_consistency else "")
        + (f" --dtype {args.dtype}" if args.dtype != "float32" else "")
        + "` "
        f"on `{adapter.model_id}`: "
        f"{report['traces']} traces ({report['by_kind']}) from {args.min_steps}–{args.max_steps} step problems. "
        "A prefix is positive when it holds no error; `auroc_partial` counts only prefixes that stop before the last step. "
        "Passes are canvas evaluations (one row of one forward pass) per reasoning step: `nfe_per_step` the distinct canvases a "
        "method reads, `nfe_beyond_one_pass` those it adds to the answer reads (`one_pass`) a build makes anyway."
        + (
            " `answer_consistency` is self-consistency's two reads with the gold answer visible in the answer slots, "
            "p(step | question, earlier steps, gold answer); `answer_result_consistency` its result read alone."
            if args.answer_consistency
            else ""
        )
        + "\n\n"
        + scoring_table(methods, SCORING_KINDS)
        + f"\n\n![AUROC vs passes]({plot.name})\n"
        + "\n`auroc_partial` by the steps a prefix leaves masked (one pass must compute all of them to move p(gold)):\n\n"
        + steps_left_table(methods)
        + "\n\nWhat one pass computes ahead: on the clean prefixes of the same problems, read as one pass reads them, the "
        "share whose argmax spells the first masked step's operands and operator, its result, and the gold answer; and the result "
        "again with that step written up to its last operand token (that token and all after it masked):\n\n"
        + lookahead_table(report["lookahead"])
        + "\n"
    )
    if args.own_k:
        own = report["own_traces"]
        md += (
            f"\nThe model's own posterior traces of the same problems ({args.own_k} per problem, temperature 1, gold answer clamped; "
            f"{own['traces']} of {own['sampled']} with readable steps, {own['by_kind']}), each step judged against the gold steps "
            "at the trace's first departure from them. Synthetic corruptions are out of the model's distribution; these "
            "errors are the ones the factory has to catch.\n\n" + scoring_table(own["methods"], OWN_KINDS) + "\n"
            "\nThe `prm` config's step labels on these traces, against the truth (a step is good before the first departure): "
            "a label turns False at the first step whose score is below the threshold, whose equation is false, or (the last "
            "step) that misses the gold answer. A trace that stops short of the gold steps errs at its last step. "
            "`at_default` is the default `scoring.label_threshold`; `best` the grid's best balanced accuracy; "
            "`exact_checks_only` the calculator and the gold answer alone, which every label source builds on.\n\n"
            + prm_label_table(own["prm_labels"])
            + "\n\nThe same traces through the build's filters: {passed_checks} pass the exact checks (gold answer reached, "
            "every equation true), {wrong_among_them} of them with a wrong step; the step-label filter keeps "
            "{passed_step_labels}, {wrong_after_step_labels} of them with a wrong step.\n".format(**own["sft_filter"])
        )
    write_section("scoring", md, args.docs)
