"""Budgets, rounds, strategies and repair (#26): every pass counted, none beyond a problem's budget."""

from functools import partial

import pyarrow.parquet as pq
import pytest
import torch

from factory.build import stages
from factory.build.command import build
from factory.build.runner import run_in_process
from factory.build.spec import SpecError, validate_spec
from factory.build.stages import TraceMaker
from factory.core.checks import true_result, ungrounded_operand
from factory.core.sampler import CanvasSampler, Request, SamplerConfig
from factory.core.strategies import Attempt, Attempts, Draft, first_bad_step, make_strategy, split_budget
from factory.lab import yields
from factory.synthetic.problems import SyntheticConfig, generate

torch.set_num_threads(1)


def problems(n=4, steps=(2, 3), seed=3):
    return [p.to_record() for p in generate(n, seed=seed, config=SyntheticConfig(*steps))]


def spec(out="out", **sampler):
    return validate_spec({"sampler": {"budget": 12, **sampler}, "output": {"dir": str(out), "shard_size": 2}})


def spec_error(data) -> str:
    with pytest.raises(SpecError) as err:
        validate_spec(data)
    return str(err.value)


# ---- strategies, pure ------------------------------------------------------------------------


def attempt(round_, accepted=False, duplicate=False, bad=1, calculated=None, prefix=()):
    return Attempt(round_, accepted, duplicate, bad, (0, 5, 9), tuple(range(100, 112)), calculated, prefix)


def test_strategies_draft_from_what_earlier_rounds_showed():
    assert make_strategy("prior")(Attempts(0, 2)) == [Draft(clamped=False)] * 2
    assert make_strategy("posterior")(Attempts(3, 1)) == [Draft(clamped=True)]
    assert make_strategy("posterior", rounds=1)(Attempts(1, 1)) == []  # fixed k: one round
    then = make_strategy("prior_then_posterior")
    assert then(Attempts(0, 1)) == [Draft(False)] and then(Attempts(1, 1)) == [Draft(True)]
    repair = make_strategy("repair")
    assert repair(Attempts(0, 1)) == [Draft(True)] and make_strategy("repair", start="prior")(Attempts(0, 1)) == [Draft(False)]
    history = (attempt(0, bad=0), attempt(1, bad=1), attempt(1, duplicate=True), attempt(1, accepted=True, bad=None))
    # failed, located, non-duplicate traces are repaired, newest first; the rest of the want is sampled afresh
    assert repair(Attempts(2, 2, history)) == [Draft(True, tuple(range(100, 105)), 1), Draft(True)]
    # a draft already tried is not drafted again: the repair backs off a step
    again = (attempt(0, bad=2), attempt(1, bad=2, prefix=tuple(range(100, 109))))
    assert repair(Attempts(2, 1, again)) == [Draft(True, tuple(range(100, 105)), 1)]
    assert repair(Attempts(3, 1, (*again, attempt(2, bad=1, prefix=tuple(range(100, 105)))))) == [Draft(True)]  # all tried
    # a false equation: its operands kept and the calculator's result written, only what follows is new
    fixed = (attempt(0, bad=2, calculated=(100, 101, 7)),)
    assert repair(Attempts(1, 1, fixed)) == [Draft(True, (100, 101, 7), 2)]
    assert make_strategy("repair", calculate=False)(Attempts(1, 1, fixed)) == [Draft(True, tuple(range(100, 109)), 2)]


def test_locators_find_the_first_bad_step():
    steps = ["2 + 3 = 5", "5 * 4 = 21", "21 - 1 = 20"]
    assert first_bad_step(("calculator",), steps, "20", [True, True, True]) == 1
    assert first_bad_step(("step_labels",), steps, "20", [True, True, False]) == 2
    assert first_bad_step(("calculator", "step_labels"), steps, "20", [False, True, True]) == 0
    # every equation true but the last result is not the gold answer: the last step is the bad one
    assert first_bad_step(("calculator",), ["2 + 3 = 5"], "6", [True]) == 0
    assert first_bad_step(("calculator",), ["2 + 3 = 5"], "5", [True]) is None


def test_the_calculator_writes_a_false_equations_true_result_and_grounding_is_checked():
    assert true_result("5 * 4 = 21") == "20" and true_result("2 + 3 + 4 = 8") == "9"
    assert true_result("5 * 4 = 20") is None and true_result("7 / 2 = 3") is None and true_result("no equation") is None
    question = "Tom has 5 apples. He buys 3 bags with 4 apples in each bag."
    assert not ungrounded_operand(question, ["3 * 4 = 12", "5 + 12 = 17"])
    assert ungrounded_operand(question, ["3 * 4 = 12", "5 + 13 = 18"])  # 13 is neither stated nor computed
    assert ungrounded_operand(question, ["60 * 5 = 300"])  # an unstated constant trips it too


def test_the_budget_is_split_over_a_rounds_drafts_and_never_overdrawn():
    assert split_budget(10, 3) == [4, 3, 3] and split_budget(2, 3) == [1, 1] and split_budget(0, 2) == []
    for left in range(0, 30):
        for n in range(1, 6):
            assert sum(split_budget(left, n)) == left and all(c >= 1 for c in split_budget(left, n))


def test_bad_settings_are_refused_before_any_compute_in_one_line():
    assert "cannot be bought with budget 2" in spec_error({"sampler": {"target": 3, "budget": 2}})
    assert "strategy" in spec_error({"sampler": {"strategy": "beam"}}) and "repair" in spec_error({"sampler": {"strategy": "beam"}})
    assert "needs at least one locator" in spec_error({"sampler": {"locators": []}})
    assert "takes no parameter ['k']" in spec_error({"sampler": {"strategy": "repair", "strategy_params": {"k": 2}}})
    assert "start must be" in spec_error({"sampler": {"strategy_params": {"start": "middle"}}})
    assert "locators" in spec_error({"sampler": {"locators": ["oracle"]}})
    for message in (spec_error({"sampler": {"target": 3, "budget": 2}}), spec_error({"sampler": {"locators": []}})):
        assert len(message.splitlines()) == 2  # the origin, then one line naming the key


# ---- the sampler's cap and the kept prefix --------------------------------------------------


def test_a_capped_row_finishes_within_its_cap_and_a_written_prefix_is_kept(tiny_adapter, template):
    sampler = CanvasSampler(tiny_adapter, template, SamplerConfig(rule="left_to_right"))
    question = template.encode_question("Tom has 5 apples. He buys 3 more apples. How many apples does Tom have now?")
    region = template.config.reasoning_slots + template.config.answer_slots
    free, capped = sampler.run([Request(question, seed=1), Request(question, seed=1, max_nfe=3)])
    assert free.nfe == region and capped.nfe == 3
    assert template.mask_id not in capped.reasoning_ids + capped.answer_ids  # the last pass writes every slot left
    prefix = template.encode_text("3 + 5 = 8")
    kept = prefix + [template.mask_id] * (template.config.reasoning_slots - len(prefix))
    (out,) = sampler.run([Request(question, template.encode_answer("8"), kept, seed=2)])
    assert out.reasoning_ids[: len(prefix)] == prefix and out.nfe == template.config.reasoning_slots - len(prefix)


# ---- rounds in a build ----------------------------------------------------------------------


def test_rounds_spend_no_more_than_the_budget_and_the_accounting_adds_up(tmp_path, tiny_adapter):
    """The tiny model's traces never pass, so every problem works its rounds to the end of its budget."""
    s = validate_spec(
        {
            "source": {"kind": "synthetic", "n": 4},
            "sampler": {"budget": 30, "rule": "llada", "rule_params": {"steps": 4}},
            "output": {"dir": str(tmp_path / "out"), "shard_size": 2},
        }
    )
    manifest = build(s, log=lambda _: None, runner=partial(run_in_process, adapter=tiny_adapter))
    root = tmp_path / "out"
    rows = [r for name in manifest["files"]["filtered"] for r in pq.read_table(root / name).to_pylist()]
    by_problem = {}
    for r in rows:
        by_problem.setdefault(r["problem_id"], []).append(r)
    assert len(by_problem) == 4 and manifest["accepted"] == 0
    for made in by_problem.values():
        assert sum(r["nfe"] for r in made) <= 30  # never beyond the budget
        assert max(r["round"] for r in made) >= 2  # rounds went on while the budget lasted
        assert [r["sample_index"] for r in made] == list(range(len(made)))
    unsolved = [r for name in manifest["files"]["unsolved"] for r in pq.read_table(root / name).to_pylist()]
    assert manifest["unsolved"] == len(unsolved) == 4
    assert {u["problem_id"]: u["passes"] for u in unsolved} == {p: sum(r["nfe"] for r in made) for p, made in by_problem.items()}
    assert all(len(u["filter_reasons"]) == u["traces"] == len(by_problem[u["problem_id"]]) for u in unsolved)
    spent = manifest["passes"]["sampling"] + manifest["passes"]["repair"]
    assert spent == sum(r["nfe"] for r in rows) and manifest["passes"]["repair"] == sum(
        r["nfe"] for r in rows if r["repaired_from_step"] is not None
    )
    assert manifest["duplicate_share"] == pytest.approx(sum(r["filter_reason"] == "duplicate" for r in rows) / len(rows))
    assert manifest["passes_per_accepted"] is None and "4 problems got no accepted trace" in (root / "README.md").read_text()


def test_rounds_are_deterministic_and_a_shard_killed_mid_round_resumes_to_the_same_rows(tmp_path, tiny_adapter, monkeypatch):
    def spec_at(out):
        return validate_spec(
            {
                "source": {"kind": "synthetic", "n": 4},
                "sampler": {"budget": 20, "rule": "llada", "rule_params": {"steps": 4}},
                "output": {"dir": str(out), "shard_size": 2},
            }
        )

    runner = partial(run_in_process, adapter=tiny_adapter)
    reference = build(spec_at(tmp_path / "ref"), log=lambda _: None, runner=runner)
    original, calls = stages.TraceMaker.sample_round, []

    def dies_in_the_second_shards_third_round(self, round_, requests, drafts):
        calls.append(round_)
        if calls.count(2) == 2:  # the second shard, mid-way through its rounds
            raise KeyboardInterrupt
        return original(self, round_, requests, drafts)

    monkeypatch.setattr(stages.TraceMaker, "sample_round", dies_in_the_second_shards_third_round)
    with pytest.raises(KeyboardInterrupt):
        build(spec_at(tmp_path / "a"), log=lambda _: None, runner=runner)
    monkeypatch.setattr(stages.TraceMaker, "sample_round", original)
    resumed = build(spec_at(tmp_path / "a"), log=lambda _: None, runner=runner)
    assert resumed["fingerprint"] == reference["fingerprint"] and resumed["passes"] == reference["passes"]

    def parquet(root, manifest):
        return {name: (root / name).read_bytes() for names in manifest["files"].values() for name in names}

    assert parquet(tmp_path / "a", resumed) == parquet(tmp_path / "ref", reference)


def test_a_repaired_trace_keeps_its_prefix_token_for_token(embedded_adapter):
    """On the shipped model's hard problems: every repair starts from a failed trace of the round
    before, keeps its steps before the bad one exactly, and the repaired trace is checked like any."""
    s = spec(budget=40, strategy_params={"calculate": False})
    maker = TraceMaker(s, embedded_adapter)
    hard = problems(24, steps=(5, 6), seed=11)
    seen_prefixes = []
    original = maker.sample_round

    def watch(round_, requests, drafts):
        rows = original(round_, requests, drafts)
        for request, (run, draft), row in zip(requests, drafts, rows):
            if draft.prefix:
                seen_prefixes.append((request.reasoning_ids[: len(draft.prefix)], draft, row, run))
        return rows

    maker.sample_round = watch
    rows = maker(hard)
    repaired = [r for r in rows if r.repaired_from_step is not None]
    assert repaired and seen_prefixes, "no trace was repaired"
    for prefix, draft, row, run in seen_prefixes:
        assert list(draft.prefix) == prefix
        k = row.repaired_from_step
        parent = next(  # a failed trace of an earlier round, cut at the start of its step k, at or before its first bad one
            i
            for i, a in enumerate(run.history)
            if a.round < row.round
            and not a.accepted
            and a.reasoning_ids[: len(prefix)] == tuple(prefix)
            and a.step_starts[k] == len(prefix)
        )
        assert k <= run.history[parent].bad_step
        written = run.history[[r.trace_id for r in run.rows].index(row.trace_id)].reasoning_ids
        assert written[: len(prefix)] == tuple(prefix)  # the kept tokens came back untouched
        assert row.steps[:k] == run.rows[parent].steps[:k]  # so are the steps before the bad one
    for made in {r.problem_id: [x for x in rows if x.problem_id == r.problem_id] for r in rows}.values():
        assert sum(r.nfe for r in made) <= 40
        assert sum(r.filter_reason is None for r in made) <= 1  # target 1: a problem leaves once it has one


def test_bench_yield_reports_coverage_per_budget(tiny_adapter, monkeypatch):
    monkeypatch.setattr(yields.ModelAdapter, "load", classmethod(lambda cls, *a, **k: tiny_adapter))
    monkeypatch.setattr(yields, "greedy_wrong", lambda adapter, template, ps: ps[:3])
    monkeypatch.setattr(yields, "STRATEGIES", {"prior": {"strategy": "prior"}, "repair": {"strategy": "repair"}})
    report = yields.bench_yield("embedded", 6, 0, 2, 3, (4, 8), "float32")
    assert report["wrong"] == 3 and set(report["strategies"]) == {"prior", "repair"}
    for r in report["strategies"].values():
        assert set(r["coverage"]) == {4, 8} and r["coverage"][4] <= r["coverage"][8] <= 3
        assert r["passes"] <= 3 * 8 and r["traces"] >= 3
    table = yields.yield_markdown([report], None)
    assert "| prior |" in table and "covered@8" in table and "3 of 6 problems wrong greedily" in table
