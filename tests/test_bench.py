import json
from types import SimpleNamespace

import pytest
import torch

from factory.build.spec import ScoringSpec
from factory.cli import main as factory_main
from factory.lab import report as bench_report
from factory.lab import samplers, scoring
from factory.models.adapter import ModelAdapter
from factory.synthetic.problems import SyntheticConfig, generate


def test_auroc_matches_pairwise_definition():
    assert bench_report.auroc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert bench_report.auroc([1.0], [2.0]) == 0.0
    assert bench_report.auroc([1.0, 2.0], [1.0, 0.0]) == pytest.approx(0.875)  # one tie counts half
    assert bench_report.auroc([], [1.0]) is None


def test_sections_are_replaced_not_appended(tmp_path):
    page = tmp_path / "benchmarks.md"
    bench_report.write_section("a", "first", page)
    bench_report.write_section("b", "other", page)
    bench_report.write_section("a", "second", page)
    text = page.read_text()
    assert "second" in text and "first" not in text and "other" in text and text.count("<!-- bench:a -->") == 1


def test_sampler_bench_reports_every_setting(tiny_adapter, template):
    problems = generate(4, seed=5, config=SyntheticConfig(2, 4))
    settings = {k: samplers.SAMPLER_SETTINGS[k] for k in ("left_to_right", "entropy", "med_prefix0.3+ee0.1", "eb1.0")}
    rules = samplers.bench_samplers(tiny_adapter, template, problems, settings, batch_size=4)
    assert set(rules) == set(settings)
    region = template.config.reasoning_slots + template.config.answer_slots
    for r in rules.values():
        assert {"accuracy", "mean_nfe", "nfe_ratio_vs_one_per_step", "wall_s", "traces_per_s", "accuracy_delta_vs_entropy_pt"} <= set(r)
        assert 1 <= r["mean_nfe"] <= region
    # one slot per pass fills every slot of the region in as many passes; the multi-slot rules need fewer
    assert rules["left_to_right"]["mean_nfe"] == rules["entropy"]["mean_nfe"] == region
    assert rules["eb1.0"]["nfe_ratio_vs_one_per_step"] >= 1.0
    batching = samplers.batching_comparison(tiny_adapter, template, problems, "med_prefix0.3+ee0.1", batch_size=2)
    assert batching["static"]["traces_per_s"] > 0 and batching["continuous"]["traces_per_s"] > 0
    # Refilling a slot as soon as its row finishes never needs more batch calls than waiting for the batch.
    assert batching["continuous"]["forward_passes"] <= batching["static"]["forward_passes"]
    assert batching["forward_call_ratio"] >= 1.0
    report = {"n": 4, "seed": 5, "model": "tiny", "batch_size": 4, "rules": rules, "batching": batching}
    table = samplers.samplers_markdown(report, "plot.png")
    assert all(f"| {name} |" in table for name in settings) and "accuracy_delta_vs_entropy_pt" in table
    assert table.startswith("## Samplers\n\n`factory bench samplers --n 4 --seed 5`")
    bf16 = samplers.samplers_markdown({**report, "dtype": "bfloat16"}, "plot.png")  # its own section, and says how it was run
    command = "`factory bench samplers --n 4 --seed 5 --dtype bfloat16 --section samplers-bfloat16`"
    assert bf16.startswith(f"## Samplers (bfloat16 weights)\n\n{command}")


def test_scoring_bench_reports_every_method_and_kind(tiny_adapter, template):
    problems = generate(3, seed=6, config=SyntheticConfig(2, 3))
    report = scoring.bench_scoring(tiny_adapter, template, problems, seed=0, rollouts=1, own_k=2, batch_size=64)
    assert set(report["methods"]) == {
        "one_pass",
        "chain_rule",
        "result_consistency",
        "self_consistency",
        "combined",
        "med_completion",
        "rollout_1",
    }
    for m in report["methods"].values():
        assert set(m["auroc_by_kind"]) == set(scoring.SCORING_KINDS) and m["nfe_per_step"] > 0
    methods = report["methods"]  # self-consistency reads every step twice, the result read once; shared canvases count once
    passes = {name: m["nfe_per_step"] for name, m in methods.items()}
    assert passes["result_consistency"] < passes["self_consistency"] <= 2 * passes["result_consistency"] + 1e-9
    # the answer read after k steps is the operand read of step k + 1: combined reads fewer canvases than both apart
    assert max(passes["one_pass"], passes["self_consistency"]) < passes["combined"] < passes["one_pass"] + passes["self_consistency"]
    own = report["own_traces"]  # the model's own traces: every sample counted, each labelled by its first departure
    assert own["sampled"] == 6 and own["traces"] == sum(own["by_kind"].values()) <= 6
    assert set(report["lookahead"]) <= set(scoring.STEPS_LEFT)
    assert sum(r["prefixes"] for r in report["lookahead"].values()) == sum(len(p.steps) for p in problems)
    assert set(own["methods"]) == {"one_pass", "chain_rule", "result_consistency", "self_consistency", "combined"}
    assert all(set(m["auroc_by_kind"]) == set(scoring.OWN_KINDS) for m in own["methods"].values())
    assert set(own["prm_labels"]) == {"self_consistency", "answer_delta", "exact_checks_only"}
    assert set(own["sft_filter"]) == {"passed_checks", "wrong_among_them", "passed_step_labels", "wrong_after_step_labels"}
    for by in (own["prm_labels"][source] for source in ("self_consistency", "answer_delta")):
        assert by["at_default"]["threshold"] == ScoringSpec().label_threshold
        assert by.get("best", by["at_default"])["threshold"] in scoring.LABEL_THRESHOLD_GRID


def test_partial_prefixes_are_also_reported_by_the_steps_they_leave_masked():
    cases = [
        {"steps": ["a", "b", "c"], "first_error": None, "kind": "clean"},
        {"steps": ["a", "b", "c"], "first_error": 0, "kind": "slip_kept"},
    ]
    values = [[1.0, 1.0, 1.0], [0.0, 2.0, 0.0]]  # prefixes k = 1, 2, 3; the full one (k = 3) is not partial
    report = scoring.summarise(cases, values, [None, None], passes=1.0)
    assert report["auroc_partial"] == 0.5
    assert report["auroc_partial_by_steps_left"] == {"1": 0.0, "2": 1.0, "3+": None}
    # a wrong trace's lowest step: at its first error, or after it
    wrong = [{"steps": ["a", "b", "c"], "first_error": e, "kind": "slip_kept"} for e in (0, 0, 1)]
    report = scoring.summarise(wrong, [[0.0] * 3] * 3, [[-5.0, 0.0, 0.0], [0.0, 0.0, -5.0], [0.0, -1.0, -5.0]], passes=1.0)
    assert report["first_error_accuracy"] == pytest.approx(1 / 3) and report["lowest_after_first_error"] == pytest.approx(2 / 3)


class CanvasOracle(ModelAdapter):
    """Predicts every slot of a canvas from a table of whole canvases keyed by their question; one
    that knows nothing predicts the mask token everywhere."""

    def __init__(self, template, canvases: dict[tuple, list[int]]):
        super().__init__(None, template.tokenizer, "masked_lm", template.mask_id, "oracle")
        self.template, self.canvases = template, canvases

    def logits(self, input_ids, attention_mask):
        out = torch.zeros(*input_ids.shape, len(self.tokenizer))
        for b, (row, keep) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
            row = row[len(row) - sum(keep) :]
            target = self.canvases.get(tuple(row[: len(row) - self.template.suffix_length]), [self.mask_id] * len(row))
            out[b, len(input_ids[b]) - len(row) :] = torch.nn.functional.one_hot(torch.tensor(target), len(self.tokenizer)).float()
        return out


def test_lookahead_counts_what_one_pass_spells_ahead_by_steps_left(template):
    problems = generate(6, seed=8, config=SyntheticConfig(1, 4))
    gold = {}
    for p in problems:
        question = template.encode_question(p.question)
        gold[tuple(question)] = template.canvas(question, template.encode_reasoning(p.steps), template.encode_answer(str(p.answer)))
    report = scoring.lookahead_report(CanvasOracle(template, gold), template, problems, batch_size=4)
    # one prefix per step: k = 0..n-1 steps visible, leaving n-k masked
    expected = {left: 0 for left in scoring.STEPS_LEFT}
    for p in problems:
        for k in range(len(p.steps)):
            expected[scoring.STEPS_LEFT[min(len(p.steps) - k, 3) - 1]] += 1
    assert {left: r["prefixes"] for left, r in report.items()} == {k: v for k, v in expected.items() if v}
    shares = ("operands_and_operator", "result", "answer", "result_one_operand_masked")
    assert all(r[k] == 1.0 for r in report.values() for k in shares)
    blind = scoring.lookahead_report(CanvasOracle(template, {}), template, problems, batch_size=4)
    assert all(r[k] == 0.0 for r in blind.values() for k in shares)
    # an oracle that knows one problem is right on its prefixes only
    first = problems[0]
    one = scoring.lookahead_report(CanvasOracle(template, dict(list(gold.items())[:1])), template, problems, batch_size=4)
    assert sum(r["answer"] * r["prefixes"] for r in one.values()) == pytest.approx(len(first.steps))


def test_prm_label_quality_counts_good_steps_kept_and_bad_steps_caught():
    steps = ["3 * 4 = 12", "12 + 5 = 17", "17 - 2 = 15"]
    problem = SimpleNamespace(answer=15, steps=steps)
    cases = [
        {"problem": problem, "steps": steps, "first_error": None},
        {"problem": problem, "steps": steps, "first_error": 1},  # step 1 departs from the gold steps
        {"problem": problem, "steps": steps[:2], "first_error": None},  # stops short: its last step is the wrong one
    ]
    self_consistency = ([0.0, -0.1, -0.1], [0.0, -3.0, 0.0], [0.0, -0.1])
    scores = [SimpleNamespace(self_consistency=sc, step_scores=[0.0] * len(sc)) for sc in self_consistency]
    perfect = {"threshold": -0.7, "accuracy": 1.0, "good_steps_kept": 1.0, "bad_steps_caught": 1.0, "first_error_found": 1.0}
    assert scoring.label_quality(cases, scores, "self_consistency", -0.7) == perfect
    # flat answer deltas pass every step: the exact checks alone catch the short trace, not the departure
    flat_labels = {**perfect, "accuracy": 6 / 8, "bad_steps_caught": 1 / 3, "first_error_found": 0.5}
    assert scoring.label_quality(cases, scores, "answer_delta", -0.7) == flat_labels
    assert scoring.label_quality(cases, scores, "self_consistency", -5.0)["bad_steps_caught"] == 1 / 3  # too lenient: checks only
    # into the SFT data: two traces pass the exact checks, one with a wrong step; the labels drop it
    expected = {"passed_checks": 2, "wrong_among_them": 1, "passed_step_labels": 1, "wrong_after_step_labels": 0}
    assert scoring.sft_filter_report(cases, scores) == expected
    report = scoring.prm_label_report(cases, scores)
    assert report["self_consistency"]["best"]["bad_steps_caught"] == 1.0 and report["self_consistency"]["at_default"] == perfect
    assert report["exact_checks_only"]["no_score"] == {**flat_labels, "threshold": None}  # the checks see only the short trace


def test_eval_command_writes_the_report(tmp_path, capsys):
    out = tmp_path / "eval.json"
    factory_main(["eval", "--n", "6", "--seed", "3", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["n"] == 6 and 0 <= report["accuracy"] <= 1 and report["mean_nfe"] > 0
    assert set(report["accuracy_by_steps"]) <= {"2", "3", "4"}
    assert sum(report["errors"].values()) == round(report["n"] * (1 - report["accuracy"]))  # every miss has a cause


def test_gsm8k_like_questions_follow_gsm8ks_word_counts():
    from factory.lab.padding import GSM8K_WORDS, gsm8k_like_questions

    words = sorted(len(q.split()) for q in gsm8k_like_questions(400, seed=1))
    assert GSM8K_WORDS["min"] <= words[0] and words[-1] <= GSM8K_WORDS["max"]
    assert abs(words[200] - GSM8K_WORDS["median"]) <= 5 and abs(words[380] - GSM8K_WORDS["p95"]) <= 10


def test_a_bench_run_in_a_users_directory_writes_only_what_it_was_asked_to(tmp_path, monkeypatch):
    from factory.lab import padding

    monkeypatch.chdir(tmp_path)
    padding.cli_padding(["--n", "8", "--batch-size", "4", "--json", "report.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no docs/ appears beside it
    padding.cli_padding(["--n", "8", "--batch-size", "4", "--docs", "page.md"])
    assert "<!-- bench:padding -->" in (tmp_path / "page.md").read_text()
