"""`factory bench yield`: what each sampling strategy buys per forward pass, on the problems the model
gets wrong.

The problems a model already solves greedily teach it little; the ones it gets wrong are where data
can teach. Every strategy runs on the same greedy-wrong problems with `target: 1` and the same
budget of sampler passes per problem, and a problem counts as covered at budget B when one of its
traces was accepted by the build's filters within its first B passes (the traces in the order they
were made). A run at budget B differs from this only in the cap of the trace that crosses B, which
there must write every slot left in its last pass (a lower bound, tight in practice: such a trace
rarely passes). The ungrounded filter is off here so the rationalization shares are measured, not
hidden: `grounded` is the share of accepted traces whose operands all come from the question or
earlier results, `gold_steps` the share equal to the generator's gold steps.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from factory.build.spec import SamplerSpec, validate_spec
from factory.build.stages import TraceMaker
from factory.core.checks import ungrounded_operand
from factory.core.sampler import CanvasSampler
from factory.core.template import ReasoningTemplate
from factory.lab.report import DOCS_HELP, emit, markdown_table, write_section
from factory.models.adapter import DTYPES, ModelAdapter
from factory.synthetic import problems as synthetic

BUDGETS = (8, 16, 32, 64)
# A trace that passes the exact checks (gold answer, every equation true) whatever the model's own step
# labels say: what counts as covered when the labels' threshold was not calibrated for the model.
EXACT_PASS = (None, "bad_step", "low_step_score")
# name -> sampler settings beside target 1 and the budget; fixed-k rows sample k traces in one round.
STRATEGIES = {
    "rejection_k4": {"strategy": "prior", "strategy_params": {"rounds": 1}, "target": 4},
    "posterior_k4": {"strategy": "posterior", "strategy_params": {"rounds": 1}, "target": 4},
    "prior": {"strategy": "prior"},
    "posterior": {"strategy": "posterior"},
    "prior_then_posterior": {"strategy": "prior_then_posterior"},
    "repair": {"strategy": "repair"},
    "repair_from_prior": {"strategy": "repair", "strategy_params": {"start": "prior"}},
    "repair_no_calculate": {"strategy": "repair", "strategy_params": {"calculate": False}},
}
BASELINE = "prior"


def greedy_wrong(adapter: ModelAdapter, template: ReasoningTemplate, problems: list) -> list:
    """The problems the build's rule gets wrong at temperature 0, answer masked."""
    sampler = CanvasSampler(adapter, template, SamplerSpec(temperature=0).to_config())
    results = sampler.generate([p.question for p in problems])
    return [p for p, r in zip(problems, results) if template.parse_answer(r.answer_ids) != p.gold_answer]


def run_strategy(adapter: ModelAdapter, model: str, problems: list, gold: dict, settings: dict, budgets: tuple[int, ...]) -> dict:
    spec = validate_spec(
        {
            "model": {"id": model},
            "sampler": {"target": 1, "budget": max(budgets), **settings},
            "filters": {"grounded": False},
        }
    )
    maker = TraceMaker(spec, adapter)
    start = time.perf_counter()
    traces = maker(problems)
    wall = time.perf_counter() - start
    covered_at: dict[str, int] = {}  # problem -> sampler passes spent when its first trace was accepted
    exact_at: dict[str, int] = {}  # the same for a trace that passes the exact checks (answer, calculator, grounding)
    spent: dict[str, int] = {}
    for t in traces:  # in the order they were made
        spent[t.problem_id] = spent.get(t.problem_id, 0) + t.nfe
        if t.filter_reason is None and t.problem_id not in covered_at:
            covered_at[t.problem_id] = spent[t.problem_id]
        if t.filter_reason in EXACT_PASS and not ungrounded_operand(t.question, t.steps) and t.problem_id not in exact_at:
            exact_at[t.problem_id] = spent[t.problem_id]
    accepted = [t for t in traces if t.filter_reason is None]
    passes = sum(t.nfe for t in traces)
    return {
        "coverage": {b: sum(1 for v in covered_at.values() if v <= b) for b in budgets},
        "coverage_exact": {b: sum(1 for v in exact_at.values() if v <= b) for b in budgets},
        "traces": len(traces),
        "accepted": len(accepted),
        "passes": passes,
        "repair_passes": sum(t.nfe for t in traces if t.repaired_from_step is not None),
        "scoring_passes": sum(t.scoring_canvases for t in traces),
        "accepted_per_1000_passes": round(1000 * len(accepted) / passes, 2) if passes else None,
        "duplicate_share": round(sum(t.filter_reason == "duplicate" for t in traces) / len(traces), 4) if traces else None,
        "accepted_repaired": sum(t.repaired_from_step is not None for t in accepted),
        "accepted_clamped": sum(t.clamped for t in accepted),
        "grounded": round(sum(not ungrounded_operand(t.question, t.steps) for t in accepted) / len(accepted), 4) if accepted else None,
        "ungrounded_accepted": sum(ungrounded_operand(t.question, t.steps) for t in accepted),
        "gold_steps": round(sum(t.steps == gold[t.problem_id] for t in accepted) / len(accepted), 4) if accepted else None,
        "wall_s": round(wall, 1),
    }


def bench_yield(model: str, n: int, seed: int, min_steps: int, max_steps: int, budgets: tuple[int, ...], dtype: str, only=None) -> dict:
    adapter = ModelAdapter.load(model, dtype=dtype)
    spec = validate_spec({"model": {"id": model}})
    template = ReasoningTemplate(adapter.tokenizer, spec.template.to_config())
    problems = [p.to_record() for p in synthetic.generate(n, seed, synthetic.SyntheticConfig(min_steps, max_steps))]
    wrong = greedy_wrong(adapter, template, problems)
    gold = {p.problem_id: p.gold_steps for p in wrong}
    strategies = {}
    for name, settings in STRATEGIES.items():
        if only and name not in only:
            continue
        strategies[name] = run_strategy(adapter, model, wrong, gold, settings, budgets)
        print(f"[bench yield] {name}: {strategies[name]}", flush=True)
    base = strategies.get(BASELINE)
    for row in strategies.values():
        row["coverage_vs_prior"] = {
            b: round(row["coverage"][b] / base["coverage"][b], 3) if base and base["coverage"][b] else None for b in budgets
        }
    return {
        "model": model,
        "dtype": str(adapter.dtype).removeprefix("torch."),
        "n": n,
        "seed": seed,
        "steps": [min_steps, max_steps],
        "budgets": list(budgets),
        "wrong": len(wrong),
        "strategies": strategies,
    }


# The default build before budgets: two posterior traces per problem in one round (k=2).
FIXED_K_DEFAULT = {"strategy": "posterior", "strategy_params": {"rounds": 1}, "target": 2}


def default_build_comparison(work: Path) -> dict:
    """The default build (`BuildSpec()`) and the same build with the sampler it had before budgets,
    one after the other in this process on the same problems: what the default spends and keeps."""
    from factory.build.command import build
    from factory.build.runner import run_in_process

    adapter = ModelAdapter.load("embedded")
    report = {}
    for name, sampler in (("fixed_k2", FIXED_K_DEFAULT), ("default", {})):
        spec = validate_spec({"sampler": sampler, "output": {"dir": str(work / name)}})
        start = time.perf_counter()
        m = build(spec, runner=lambda s, o, shards: run_in_process(s, o, shards, adapter), lock=False, log=lambda _: None)
        spent = m["passes"]["sampling"] + m["passes"]["repair"]
        report[name] = {
            "sampler": {k: v for k, v in spec.sampler.model_dump().items() if k in ("strategy", "strategy_params", "target", "budget")},
            "problems": m["problems"],
            "sampled": m["traces_sampled"],
            "accepted": m["accepted"],
            "filtered": m["filtered"]["by_reason"],
            "sampler_passes": spent,
            "scoring_passes": m["passes"]["scoring"],
            "passes_per_accepted": round(m["passes_per_accepted"], 3),
            "duplicate_share": round(m["duplicate_share"], 4),
            "unsolved": m["unsolved"],
            "wall_s": round(time.perf_counter() - start, 1),
        }
    old, new = report["fixed_k2"], report["default"]
    report["passes_per_accepted_ratio"] = round(new["passes_per_accepted"] / old["passes_per_accepted"], 3)
    return report


def default_markdown(report: dict) -> str:
    rows = [{"sampler": name, **{k: v for k, v in r.items() if k != "sampler"}} for name, r in report.items() if isinstance(r, dict)]
    cols = ["sampler", "problems", "sampled", "accepted", "sampler_passes", "passes_per_accepted", "duplicate_share", "unsolved"]
    cols += ["scoring_passes", "wall_s", "filtered"]
    return (
        "## Yield of the default build\n\n"
        "`factory bench yield --default-build`: the default build (`BuildSpec()`, "
        f"`{report['default']['sampler']}`) and the same build with the sampler it had before budgets "
        f"(`{report['fixed_k2']['sampler']}`: two posterior traces per problem), one after the other in one process on the same "
        "48 problems. Passes are canvases through one forward (a sampler row's pass, a scorer's read).\n\n"
        + markdown_table(rows, cols)
        + f"\n\nSampler passes per accepted trace: {report['passes_per_accepted_ratio']}x the fixed-k default's.\n"
    )


def yield_markdown(reports: list[dict], plot_name: str | None) -> str:
    parts = [
        "## Yield per pass\n\n"
        "`factory bench yield` (`factory/lab/yields.py`): every strategy on the same problems its model gets wrong greedily "
        "(the build's rule at temperature 0, answer masked), `target: 1`, the same budget of sampler passes per problem. "
        "Covered at B (`covered@B`): a trace accepted by the build's filters (the ungrounded filter off, to measure it) within "
        "the problem's first B passes; `exact@B`, where shown: a trace that passes the exact checks (gold answer, every "
        "equation true, grounded operands) whatever the step labels say, whose threshold was calibrated on the shipped model. "
        "`rejection_k4`/`posterior_k4`: four traces in one round, each capped at a quarter of the budget. "
        "`repair`: posterior first, then each failed trace remasked from its first bad step (calculator and step labels) "
        "with the answer clamped, a false equation's result written by the calculator; `repair_from_prior` starts from "
        "rejection sampling; `repair_no_calculate` lets the model rewrite the bad step whole. "
        "Passes, traces and shares are at the largest budget."
    ]
    for report in reports:
        budgets = report["budgets"]
        rows = []
        for name, r in report["strategies"].items():
            row = {"strategy": name, **{f"covered@{b}": r["coverage"][b] for b in budgets}}
            if "coverage_exact" in r:
                row |= {f"exact@{b}": r["coverage_exact"][b] for b in budgets}
            row["x prior @max"] = r["coverage_vs_prior"][budgets[-1]]
            row |= {k: r[k] for k in ("passes", "repair_passes", "accepted_per_1000_passes", "duplicate_share", "grounded", "gold_steps")}
            rows.append(row)
        cols = list(rows[0]) if rows else []
        lo, hi = report["steps"]
        parts.append(
            f"### `{report['model']}`, {lo}–{hi} steps\n\n"
            f"`factory bench yield --model {report['model']} --n {report['n']} --seed {report['seed']} --min-steps {lo} "
            f"--max-steps {hi} --dtype {report['dtype']}`: {report['wrong']} of {report['n']} problems wrong greedily.\n\n"
            + markdown_table(rows, cols)
            + "\n\nCovered (the build's filters):\n"
            + verdict(report, "coverage")
            + ("\n\nCovered (the exact checks alone):\n" + verdict(report, "coverage_exact") if "coverage_exact" in first(report) else "")
        )
    if plot_name:
        parts.append(f"![coverage vs budget]({plot_name})")
    return "\n\n".join(parts) + "\n"


REJECTION = ("prior", "rejection_k4")  # rejection sampling, adaptive and fixed-k: the baseline is the better of the two
TARGET_RATIO = 1.5


def first(report: dict) -> dict:
    return next(iter(report["strategies"].values()), {})


def verdict(report: dict, key: str) -> str:
    """Per budget: the factory's best strategy against the better rejection sampler, and whether it
    covers the target ratio of the problems that one covers (`key`: which coverage)."""
    lines = []
    for b in report["budgets"]:
        s = report["strategies"]
        base_name = max((n for n in REJECTION if n in s), key=lambda n: s[n][key][b], default=None)
        others = [n for n in s if n not in REJECTION]
        if base_name is None or not others:
            continue
        best = max(others, key=lambda n: s[n][key][b])
        base, got = s[base_name][key][b], s[best][key][b]
        if not got:
            lines.append(f"- {b} passes: no strategy covers a problem (a trace of these problems takes more passes)")
            continue
        ratio = got / base if base else float("inf")
        met = "met" if ratio >= TARGET_RATIO else "not met"
        lines.append(
            f"- {b} passes: `{best}` covers {got}, rejection sampling (`{base_name}`) {base}: {ratio:.2f}x ({met}: target {TARGET_RATIO}x)"
        )
    return "\n".join(lines)


def coverage_plot(path: Path, reports: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(6 * len(reports), 4), squeeze=False)
    for ax, report in zip(axes[0], reports):
        for name, r in report["strategies"].items():
            ax.plot(report["budgets"], [r["coverage"][b] for b in report["budgets"]], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampler passes per problem")
        ax.set_ylabel(f"covered (of {report['wrong']} wrong)")
        ax.set_title(f"{Path(report['model']).name}, {report['steps'][0]}-{report['steps'][1]} steps")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cli_yield(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="factory bench yield", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--min-steps", type=int, default=5)
    ap.add_argument("--max-steps", type=int, default=6)
    ap.add_argument("--budget", type=int, nargs="+", default=list(BUDGETS), help="passes per problem; the largest is run")
    ap.add_argument("--only", nargs="*", help="run only these strategies (the prior baseline is always run)")
    ap.add_argument("--dtype", choices=DTYPES, default="float32")
    ap.add_argument("--also", type=Path, nargs="*", default=[], help="earlier reports (JSON) to put in the same docs section")
    ap.add_argument("--default-build", action="store_true", help="only the default build against the fixed-k sampler it replaced")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--docs", type=Path, help=DOCS_HELP)
    args = ap.parse_args(argv)
    if args.default_build:
        import tempfile

        with tempfile.TemporaryDirectory() as work:
            report = default_build_comparison(Path(work))
        emit(report, args.json)
        if args.docs:
            write_section("yield-default", default_markdown(report), args.docs)
        return
    only = set(args.only) | {BASELINE} if args.only else None
    report = bench_yield(args.model, args.n, args.seed, args.min_steps, args.max_steps, tuple(sorted(args.budget)), args.dtype, only)
    emit(report, args.json)
    if args.docs:
        import json

        reports = [json.loads(p.read_text()) for p in args.also] + [report]
        for r in reports:  # JSON keys are strings
            for s in r["strategies"].values():
                for key in ("coverage", "coverage_exact", "coverage_vs_prior"):
                    if key in s:
                        s[key] = {int(b): v for b, v in s[key].items()}
        plot = args.docs.parent / "yield_coverage.png"
        coverage_plot(plot, reports)
        write_section("yield", yield_markdown(reports, plot.name), args.docs)
