"""`factory build`: spec validation, sources, stages without Ray, and end-to-end builds with Ray."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from huggingface_hub import DatasetCard

import factory
from factory.build import output, provenance
from factory.build.command import build, cli_build
from factory.build.filters import drop_reason
from factory.build.output import BuildDir, BuildError, prm_rows, size_category
from factory.build.runner import require_cuda_if_gpus_held
from factory.build.sources import SourceError, load_problems
from factory.build.spec import BuildSpec, FilterSpec, ResourceSpec, SpecError, load_spec, validate_spec
from factory.build.stages import TraceMaker, problem_seed, process_shard
from factory.build.storage import TMP_MARK
from factory.core.checks import false_equation, final_number, step_labels
from factory.core.numbers import canonical_answer
from factory.core.sampler import SampleResult
from factory.core.scoring import Trace
from factory.core.strategies import Draft
from factory.lab.pipeline import bench_pipeline
from factory.models import adapter as model_adapter
from factory.models.embedded import EMBEDDED_MODEL_DIR
from factory.schemas.arrow import arrow_schema, from_table, to_table
from factory.schemas.records import Problem, SFTRow, ShardPlan, TraceRow
from factory.synthetic import problems as synthetic

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def small_spec(out: Path, **sections) -> dict:
    """A spec dict for a few problems that keeps every trace the arbitrary tiny model writes."""
    spec = {
        "source": {"kind": "synthetic", "n": 4},
        "sampler": {"target": 2, "rule": "med_prefix", "rule_params": {"lam": 0.3}, "temperature": 0.7},
        "filters": {"answer_match": False, "step_labels": False, "grounded": False, "min_steps": 0},
        "output": {"dir": str(out), "shard_size": 2},
    }
    return {**spec, **sections}


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


# ---- spec ------------------------------------------------------------------------------------


def spec_error(data) -> str:
    with pytest.raises(SpecError) as err:
        validate_spec(data)
    return str(err.value)


def test_spec_errors_name_the_key_and_the_allowed_values():
    message = spec_error({"sampler": {"rule": "medd"}})
    assert "sampler.rule" in message and "'med_prefix'" in message and "'eb'" in message and "'medd'" in message
    message = spec_error({"sampler": {"temprature": 0.7}})
    assert "sampler.temprature: unknown key" in message and "temperature" in message
    assert "bogus: unknown key; allowed keys: seed, limit, source" in spec_error({"bogus": 1})
    assert "expected tags: 'synthetic', 'hf', 'local'" in spec_error({"source": {"kind": "s3"}})
    assert "source.pathh: unknown key" in spec_error({"source": {"kind": "local", "path": "x.jsonl", "pathh": 1}})
    assert "'marginal' or 'chain'" in spec_error({"scoring": {"estimator": "rollout"}})
    assert "it takes ['lam', 'max_per_step']" in spec_error({"sampler": {"rule": "med_prefix", "rule_params": {"gamma": 1}}})
    assert "pinned revision" in spec_error({"model": {"id": "GSAI-ML/LLaDA-8B-Base", "trust_remote_code": True}})
    assert "min_steps <= max_steps" in spec_error({"source": {"min_steps": 4, "max_steps": 2}})
    assert "label_source 'self_consistency' needs self_consistency: true" in spec_error({"scoring": {"self_consistency": False}})
    assert "'self_consistency' or 'answer_delta'" in spec_error({"scoring": {"label_source": "rollout"}})


def test_spec_values_that_would_fail_inside_the_actors_are_refused_up_front():
    """Each of these once passed validation and failed (or wrote nonsense) only after Ray had started."""
    llada = spec_error({"sampler": {"rule": "llada", "rule_params": {"block_length": 8}}})
    assert "does not run on the 44-slot region" in llada and "multiple of the number of blocks" in llada
    assert "does not run on the 44-slot region" in spec_error({"sampler": {"rule_params": {"lam": "abc"}}})
    assert "batch_size must be >= 1" in spec_error({"sampler": {"batch_size": 0}})
    assert "top_p must be in (0, 1]" in spec_error({"sampler": {"top_p": -1.0}})
    assert "top_k must be >= 1" in spec_error({"sampler": {"top_k": 0}})
    assert "temperature must be >= 0" in spec_error({"sampler": {"temperature": float("nan")}})
    assert "scoring.label_threshold: Input should be a finite number" in spec_error({"scoring": {"label_threshold": float("nan")}})
    assert "would never fire" in spec_error({"sampler": {"early_exit_gamma": 0.1}})
    # six additions of at least 1 from a start of at least 5 cannot stay within 10: the generator once looped forever
    assert "no 6-step problem fits max_value=10" in spec_error(
        {"source": {"min_steps": 6, "max_steps": 6, "max_value": 10, "operations": ["+"]}}
    )
    # the same settings on a region they fit are accepted
    fits = validate_spec(
        {"sampler": {"rule": "llada", "rule_params": {"block_length": 11, "steps": 44}}, "template": {"reasoning_slots": 40}}
    )
    assert fits.sampler.rule_params == {"block_length": 11, "steps": 44}


def test_spec_file_errors_name_the_file(tmp_path):
    path = write_spec(tmp_path / "bad.yaml", {"filters": {"min_stepz": 1}})
    with pytest.raises(SpecError, match=r"bad.yaml: invalid build spec\n  - filters.min_stepz: unknown key"):
        load_spec(path)
    with pytest.raises(SystemExit, match="filters.min_stepz"):
        cli_build([str(path), "--dry-run"])


def test_default_spec_and_hash():
    spec = load_spec()
    assert spec.model.id == "embedded" and spec.source.kind == "synthetic" and spec.source.n == 48
    assert (spec.source.min_steps, spec.source.max_steps) == (2, 4)
    assert (spec.sampler.strategy, spec.sampler.target, spec.sampler.budget) == ("repair", 1, 32)
    assert spec.sampler.rule == "med_prefix" and spec.sampler.rule_params == {"lam": 0.3, "max_per_step": None}
    assert spec.sampler.temperature == 0.7 and spec.scoring.estimator == "marginal" and spec.scoring.self_consistency
    # Where the output goes and how many workers run do not change the data, so not the hash either.
    assert spec.with_overrides(output_dir="elsewhere").spec_hash() == spec.spec_hash()
    assert validate_spec({**spec.model_dump(), "resources": {"num_actors": 4}}).spec_hash() == spec.spec_hash()
    assert validate_spec({**spec.model_dump(), "seed": 1}).spec_hash() != spec.spec_hash()
    assert spec.with_overrides(limit=3).limit == 3


def test_a_partial_spec_takes_the_default_builds_values():
    """Defaults live on the spec classes alone: a spec with only a source samples like the default build,
    and greedy decoding with target > 1 (which can only write duplicates) is refused before any compute."""
    partial = validate_spec({"source": {"n": 5}})
    assert partial.sampler == BuildSpec().sampler and partial.sampler.temperature > 0
    assert partial.output.shard_size == BuildSpec().output.shard_size and partial.resources == BuildSpec().resources
    assert "greedy decoding writes the same trace every round" in spec_error({"sampler": {"temperature": 0, "target": 2}})
    assert validate_spec({"sampler": {"temperature": 0, "target": 1}}).sampler.target == 1


def test_dry_run_prints_spec_and_first_canvas(capsys, tmp_path):
    cli_build([str(write_spec(tmp_path / "s.yaml", small_spec(tmp_path / "out"))), "--dry-run"])
    printed = capsys.readouterr().out
    assert "sampler:" in printed and "rule: med_prefix" in printed
    assert "[MASK] [MASK]" in printed and "The answer is \\boxed{" in printed and "How many" in printed
    assert not (tmp_path / "out").exists()
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"question": GOOD.replace("5", str(n)), "answer": a}) + "\n" for n, a in ((6, "9"), (7, "#### 10"))))
    cli_build(
        [str(write_spec(tmp_path / "l.yaml", small_spec(tmp_path / "out", source={"kind": "local", "path": str(rows)}))), "--dry-run"]
    )
    assert (
        "# 1 usable problems, 1 rows rejected\n#   non_numeric_answer: 1 (e.g. row 1: answer '#### 10' is not an integer)"
        in capsys.readouterr().out
    )
    with pytest.raises(SystemExit, match="factory build: cannot read source local:nope.jsonl"):
        cli_build(
            [
                str(write_spec(tmp_path / "m.yaml", small_spec(tmp_path / "out", source={"kind": "local", "path": "nope.jsonl"}))),
                "--dry-run",
            ]
        )


# ---- records and Arrow -----------------------------------------------------------------------


def test_arrow_schema_is_derived_from_the_records():
    schema = arrow_schema(TraceRow)
    assert schema.names == list(TraceRow.model_fields)
    assert schema.field("steps").type == pa.list_(pa.field("item", pa.string(), nullable=False))
    assert schema.field("answer").nullable and not schema.field("nfe").nullable
    assert schema.field("nfe").type == pa.int64() and schema.field("final_score").type == pa.float64()
    assert pa.types.is_struct(arrow_schema(SFTRow).field("messages").type.value_type)
    assert from_table(to_table([trace()], TraceRow), TraceRow) == [trace()]


# ---- sources ---------------------------------------------------------------------------------

GOOD = "Tom has 5 apples. He buys 3 more apples. How many apples does Tom have now?"


def test_local_jsonl_rows_become_problems_or_rejections(tmp_path, template):
    rows = [
        json.dumps({"question": GOOD, "answer": "8"}),
        json.dumps({"question": GOOD.replace("5", "6"), "answer": "1,009"}),
        json.dumps({"question": GOOD}),
        json.dumps({"question": GOOD.replace("3", "4"), "answer": "eight"}),
        json.dumps({"question": "   ", "answer": "1"}),
        json.dumps({"question": "Tom has 5 zorblax. How many zorblax?", "answer": "5"}),
        json.dumps({"question": GOOD * 10, "answer": "8"}),
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"question": GOOD, "answer": 8}),
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(rows) + "\n")
    source = validate_spec({"source": {"kind": "local", "path": str(path)}}).source
    problems, rejected = load_problems(source, template)
    assert [p.gold_answer for p in problems] == ["8", "1009"]
    assert [(r.row, r.reason) for r in rejected] == [
        (2, "missing_answer"),
        (3, "non_numeric_answer"),
        (4, "empty_question"),
        (5, "unknown_tokens"),
        (6, "question_too_long"),
        (7, "invalid_row"),
        (8, "invalid_row"),
        (9, "duplicate_problem"),
    ]
    assert "zorblax" in rejected[3].detail and rejected[5].raw == '"{not json"'
    assert len(problems) + len(rejected) == len(rows)  # nothing dropped silently
    assert load_problems(source, template, limit=1)[0] == problems[:1]


def test_local_parquet_with_a_column_mapping(tmp_path, template):
    table = pa.table({"q": [GOOD, GOOD.replace("5", "7")], "a": [8, None], "s": [["5 + 3 = 8"], None]})
    pq.write_table(table, tmp_path / "rows.parquet")
    spec = {"source": {"kind": "local", "path": str(tmp_path / "rows.parquet"), "columns": {"question": "q", "answer": "a", "steps": "s"}}}
    problems, rejected = load_problems(validate_spec(spec).source, template)
    assert [(p.gold_answer, p.gold_steps, p.source) for p in problems] == [("8", ["5 + 3 = 8"], "local:rows.parquet")]
    assert [r.reason for r in rejected] == ["missing_answer"]


def test_a_malformed_steps_value_rejects_its_row_not_the_source(tmp_path, template):
    rows = [{"question": GOOD, "answer": 8, "s": 3}, {"question": GOOD.replace("5", "7"), "answer": 10, "s": "7 + 3 = 10"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"source": {"kind": "local", "path": str(tmp_path / "rows.jsonl"), "columns": {"steps": "s"}}}
    problems, rejected = load_problems(validate_spec(spec).source, template)
    assert [(p.gold_answer, p.gold_steps) for p in problems] == [("10", ["7 + 3 = 10"])]
    assert [(r.row, r.reason, r.detail) for r in rejected] == [(0, "invalid_steps", "steps must be text or a list, got int")]


def test_hf_source_reads_gsm8k_format(tmp_path, template):
    rows = [
        {"question": GOOD, "answer": "He buys 3 more: 5 + 3 = <<5+3=8>>8 apples.\nSo he has 8.\n#### 8"},
        {"question": GOOD.replace("3", "995"), "answer": "5 + 995 = <<5+995=1000>>1000\n#### 1,000"},
        {"question": GOOD.replace("5", "9"), "answer": "the answer is 12"},
        {"question": GOOD.replace("5", "4"), "answer": "4 + 3 = 7\n#### "},
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = validate_spec({"source": {"kind": "hf", "path": str(tmp_path), "split": "train"}}).source
    problems, rejected = load_problems(source, template)
    assert [p.gold_answer for p in problems] == ["8", "1000"]
    assert problems[0].gold_steps == ["He buys 3 more: 5 + 3 = 8 apples.", "So he has 8."]
    assert problems[0].problem_id == synthetic.problem_id(GOOD, "8")
    assert [(r.row, r.reason, r.detail) for r in rejected] == [
        (2, "missing_answer", "no '####' before the final answer"),
        (3, "missing_answer", "nothing after '####'"),
    ]


# ---- stages without Ray ----------------------------------------------------------------------


def trace(problem_id="p", steps=("1 + 1 = 2",), gold="2", scores=(0.0,), reasoning=None) -> TraceRow:
    problem = Problem(problem_id=problem_id, source="t", question="q", gold_answer=gold)
    fields = dict(trace_id="t", sample_index=0, nfe=1, exited_early=False, final_score=0.0, scoring_passes=1.0, scoring_canvases=2)
    fields |= dict(strategy="posterior", clamped=True, round=0, repaired_from_step=None)
    provenance = dict(model_id="m", model_revision=None, sampler="{}", scorer="{}", seed=0, code_version="0", spec_hash="h")
    return TraceRow(
        **problem.model_dump(),
        **fields,
        **provenance,
        reasoning=reasoning or "\n".join(steps),
        steps=list(steps),
        answer=gold,
        step_scores=list(scores),
        prefix_logp=[0.0] * (len(scores) + 1),
        self_consistency=list(scores),
        min_step_score=min(scores, default=0.0),
        step_labels=step_labels(list(steps), gold, list(scores)[: len(steps)], threshold=-0.7),
    )


def test_filters_count_every_drop_by_reason():
    assert final_number(["3 * 4 = 12"]) == 12 and final_number(["so 1,000 left"]) == 1000 and final_number(["x = -5"]) == -5
    assert final_number([]) is None and final_number(["no number"]) is None
    assert not false_equation(["6 / 3 = 2", "so 1,000 + 5 = 1,005", "x = 4"]) and false_equation(["3 * 4 = 13"])
    assert false_equation(["7 / 2 = 3"]) and false_equation(["1 / 0 = 0"])
    assert not false_equation(["2 + 3 + 4 = 9", "10 - 2 * 3 = 4", "8 / 2 / 2 = 2"]) and false_equation(["2 + 3 + 4 = 7"])
    # GSM8k's decimals and dollars: "0.5" is never read as "5", nor "2.5" as "2"
    gsm8k = ["Half of it is 0.5 * 10 = 5.", "10 / 4 = 2.5 each", "She earns 12/60 = $0.2 per minute.", "$1.50 + $2 = $3.50"]
    assert not false_equation(gsm8k) and false_equation(["0.5 * 10 = 6"]) and false_equation(["$1.50 + $2 = $3"])
    assert final_number(["each gets 10 / 4 = 2.5"]) == 2.5 and final_number(["so 5."]) == 5
    traces = [
        trace(),
        trace(),  # same reasoning for the same problem
        trace(problem_id="q"),  # same reasoning, another problem: kept
        trace(steps=("1 + 1 = 3",)),
        trace(steps=("1 + 1 = 3",)),  # a repeat of a filtered trace is a duplicate too, not a second PRM negative
        trace(steps=()),
        trace(steps=("1 = 1", "1 = 1", "1 + 1 = 2"), scores=(0.0, 0.0, 0.0)),
        trace(steps=("2 = 2", "1 + 1 = 2"), scores=(-5.0, 0.0)),
        trace(steps=("9 / 2 = 30", "21 / 5 = 2"), scores=(0.0, 0.0)),  # ends at the gold answer by luck
        trace(problem_id="r", scores=(-1.0,)),  # true and at the gold answer, but the model would not write it
    ]
    seen: set = set()
    reasons = [drop_reason(t, FilterSpec(min_step_score=-2.0, max_steps=2, grounded=False), seen) for t in traces]
    assert [t.problem_id for t, r in zip(traces, reasons) if r is None] == ["p", "q"]
    expected = ["duplicate", "wrong_answer", "duplicate", "too_few_steps", "too_many_steps", "low_step_score"]
    expected += ["arithmetic_error", "bad_step"]
    assert [r for r in reasons if r] == expected
    # a prior trace (answer masked) must write the gold answer in its answer slots too
    assert drop_reason(trace(problem_id="s").model_copy(update={"answer": "3"}), FilterSpec(), set()) == "wrong_answer"
    # an operand the question never states: ungrounded (the question of `trace` is "q", with no numbers)
    grounded = trace(problem_id="g").model_copy(update={"question": "Tom has 1 apple and finds 1 more."})
    assert drop_reason(grounded, FilterSpec(step_labels=False), set()) is None
    assert drop_reason(trace(problem_id="g"), FilterSpec(step_labels=False), set()) == "ungrounded"
    # PRM data: the accepted traces and the filtered ones with a False label, never a duplicate or an empty one
    judged = [t.model_copy(update={"filter_reason": r}) for t, r in zip(traces, reasons)]
    kept, filtered = [t for t in judged if t.filter_reason is None], [t for t in judged if t.filter_reason]
    prm = prm_rows(kept + filtered, validate_spec(small_spec(Path("out"))))
    assert [(r.completions, r.labels, r.accepted) for r in prm] == [
        (["1 + 1 = 2"], [True], True),
        (["1 + 1 = 2"], [True], True),
        (["1 + 1 = 3"], [False], False),
        (["2 = 2", "1 + 1 = 2"], [False, False], False),  # low_step_score, and its labels say so too
        (["9 / 2 = 30", "21 / 5 = 2"], [False, False], False),
        (["1 + 1 = 2"], [False], False),
    ]


def test_step_labels_turn_false_at_the_first_step_that_fails_and_stay_false():
    steps = ["3 * 4 = 12", "12 + 5 = 17", "17 - 2 = 15"]
    assert step_labels(steps, "15", [-0.1, -0.2, -0.3], threshold=-0.7) == [True, True, True]
    assert step_labels(steps, "15", [-0.1, -2.0, -0.3], threshold=-0.7) == [True, False, False]  # a low score
    assert step_labels(steps, "15", [-0.1, -2.0, -0.3], threshold=-3.0) == [True, True, True]
    assert step_labels(["3 * 4 = 13", *steps[1:]], "15", [0.0] * 3, threshold=-0.7) == [False, False, False]  # the calculator
    assert step_labels(steps, "16", [0.0] * 3, threshold=-0.7) == [True, True, False]  # does not reach the gold answer
    assert step_labels([], "15", [], threshold=-0.7) == []
    with pytest.raises(ValueError):
        step_labels(steps, "15", [0.0, 0.0], threshold=-0.7)  # a score per step, or the labels would be cut short


def test_stages_compose_without_ray_and_do_not_depend_on_sharding(tmp_path, tiny_adapter, template):
    spec = validate_spec(small_spec(tmp_path / "out", source={"kind": "synthetic", "n": 3}))
    problems, rejected = load_problems(spec.source, template)
    maker = TraceMaker(spec, adapter=tiny_adapter)
    together = maker(problems)
    alone = maker(problems[2:]) + maker(problems[:2])
    assert {t.trace_id: t.reasoning for t in together} == {t.trace_id: t.reasoning for t in alone}
    assert len({t.trace_id for t in together}) == len(problems) * spec.sampler.target
    first = together[0]
    assert first.seed == problem_seed(spec.seed, first.problem_id) and first.spec_hash == spec.spec_hash()
    assert json.loads(first.sampler)["rule"] == "med_prefix" and first.model_id == "tiny-random"
    assert len(first.step_scores) == len(first.steps) and len(first.prefix_logp) == len(first.steps) + 1
    # stray tokens the model left after the end never reach the text the SFT data is made of
    tpl, problem = maker.template, problems[0]
    written = tpl.encode_text(problem.gold_steps[0])
    strays = written[-1:] + [tpl.filler_id] + tpl.encode_text("\n7 + 1 = 9")
    reasoning = written + [tpl.filler_id] + strays
    reasoning += [tpl.filler_id] * (tpl.config.reasoning_slots - len(reasoning))
    answer = tpl.encode_answer(problem.gold_answer)
    scores = maker.scorer.score([Trace(tpl.encode_question(problem.question), reasoning, answer)])[0]
    row = maker.trace_row(problem, 0, SampleResult(None, reasoning, answer, nfe=1, exited_early=False), scores, 0, Draft(True))
    assert row.reasoning == problem.gold_steps[0] and row.steps == [problem.gold_steps[0]]

    out, root = BuildDir(spec.output.dir), Path(spec.output.dir)
    out.claim(spec)
    sizes, added = out.plan(problems, spec.output.shard_size)
    assert sizes == {0: 2, 1: 1} and added == 3
    for index in sizes:
        out.write_shard(spec, process_shard(maker, out.read_plan(index)))
    assert out.done_shards() == {0, 1}
    manifest = out.assemble(spec, len(sizes), rejected)
    assert manifest["problems"] == 3 and manifest["traces_sampled"] == 6 and manifest["accepted"] == 6
    assert manifest["empty_configs"] == ["filtered", "unsolved", "rejected"]
    assert [(w["device"], w["dtype"]) for w in manifest["workers"]] == [("cpu", "float32")]  # the precision it ran in
    traces = [row for name in manifest["files"]["traces"] for row in from_table(pq.read_table(root / name), TraceRow)]
    assert {t.trace_id for t in traces} == {t.trace_id for t in together}
    sft = pq.read_table(root / manifest["files"]["sft"][0]).to_pylist()[0]
    user, assistant = sft["messages"]
    gold = traces[0].gold_answer
    assert user == {"role": "user", "content": traces[0].question}
    assert assistant["content"].endswith(f"\nThe answer is \\boxed{{{gold}}}.")
    prm = pq.read_table(root / manifest["files"]["prm"][0]).to_pylist()[0]
    assert prm["completions"] == traces[0].steps and prm["labels"] == traces[0].step_labels
    assert prm["label_scores"] == pytest.approx(traces[0].self_consistency)  # the default label source
    assert manifest["rows"] == {"traces": 6, "filtered": 0, "sft": 6, "prm": 6, "unsolved": 0, "rejected": 0}
    # the yield adds up: every sampler pass is a trace's, and the scoring passes are the traces' shares
    assert manifest["passes"]["sampling"] + manifest["passes"]["repair"] == sum(t.nfe for t in traces)
    assert manifest["passes"]["scoring"] == sum(t.scoring_canvases for t in traces) > 0
    assert manifest["passes_per_accepted"] == pytest.approx(sum(t.nfe for t in traces) / 6) and manifest["duplicate_share"] == 0
    card = DatasetCard.load(root / "README.md").data  # metadata the Hub reads when the directory is uploaded
    assert card.size_categories == ["n<1K"] and "process-reward-model" in card.tags
    assert [c["config_name"] for c in card.configs] == ["traces", "sft", "prm"]
    assert [size_category(n) for n in (999, 1_000, 99_999, 1_000_000)] == ["n<1K", "1K<n<10K", "10K<n<100K", "1M<n<10M"]


def test_a_rebuilt_directory_never_loads_the_old_rows(tmp_path, tiny_adapter, template):
    """`datasets` caches a local dataset by its card, not its files' contents: a directory deleted and
    rebuilt with other rows loaded the old ones until the card's file patterns carried a digest of the rows."""
    spec = validate_spec(small_spec(tmp_path / "out", source={"kind": "synthetic", "n": 3}))
    problems, rejected = load_problems(spec.source, template)
    maker, out, root = TraceMaker(spec, adapter=tiny_adapter), BuildDir(spec.output.dir), Path(spec.output.dir)
    loaded = []
    for n in (3, 1):
        shutil.rmtree(root, ignore_errors=True)
        out.claim(spec)
        out.write_shard(spec, process_shard(maker, ShardPlan(shard=0, increment=0, date="", problems=problems[:n])))
        manifest = out.assemble(spec, 1, rejected)
        loaded.append(len(load_config(root, "traces")))
    assert loaded == [6, 2]
    # assembling again writes the same files; a data file an earlier assembly left is removed, a user's own file kept
    stale, mine = (root / "data" / "traces" / name for name in ("train-00000-000000000000.parquet", "mine.parquet"))
    for path in (stale, mine):
        path.write_bytes((root / manifest["files"]["traces"][0]).read_bytes())
    assert out.assemble(spec, 1, rejected)["files"] == manifest["files"] and not stale.exists() and mine.exists()
    assert len(load_config(root, "traces")) == 2


def test_an_output_dir_is_resumed_only_by_its_own_spec_code_and_weights(tmp_path, monkeypatch):
    spec = validate_spec(small_spec(tmp_path / "out"))
    BuildDir(tmp_path / "out").claim(spec)
    BuildDir(tmp_path / "out").claim(validate_spec({**spec.model_dump(), "resources": {"num_actors": 2}}))
    with pytest.raises(BuildError, match="spec_hash"):
        BuildDir(tmp_path / "out").claim(validate_spec({**spec.model_dump(), "seed": 5}))
    with pytest.raises(BuildError, match="shard_size"):
        BuildDir(tmp_path / "out").claim(validate_spec({**spec.model_dump(), "output": {**spec.output.model_dump(), "shard_size": 3}}))
    monkeypatch.setattr(output, "code_version", lambda: "0.1.0+edited")  # a resume after the code changed
    with pytest.raises(BuildError, match="code_version"):
        BuildDir(tmp_path / "out").claim(spec)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(BuildError, match="holds no factory build"):
        BuildDir(tmp_path / "other").claim(spec)


def test_new_weights_behind_the_same_model_path_do_not_resume(tmp_path):
    model_dir = shutil.copytree(EMBEDDED_MODEL_DIR, tmp_path / "model")
    spec = validate_spec(small_spec(tmp_path / "out", model={"id": str(model_dir)}))
    BuildDir(tmp_path / "out").claim(spec)
    BuildDir(tmp_path / "out").claim(spec)  # the same weights resume
    with (model_dir / "model.safetensors").open("ab") as weights:  # a checkpoint retrained in place
        weights.write(b"\0")
    model_adapter.weights_digest.cache_clear()  # a new process would read the file again
    with pytest.raises(BuildError, match="model_revision"):
        BuildDir(tmp_path / "out").claim(spec)


def test_a_source_that_cannot_be_used_stops_the_build_before_it_claims_the_directory(tmp_path):
    out = tmp_path / "out"
    missing = small_spec(out, source={"kind": "local", "path": str(tmp_path / "nope.jsonl")})
    with pytest.raises(SourceError, match=r"cannot read source local:nope.jsonl: FileNotFoundError"):
        build(validate_spec(missing))
    (tmp_path / "rows.jsonl").write_text(json.dumps({"question": GOOD, "final": "8"}) + "\n")
    wrong_column = small_spec(out, source={"kind": "local", "path": str(tmp_path / "rows.jsonl")})
    with pytest.raises(
        SourceError, match=r"no row has the column 'answer' \(source.columns.answer\); its rows have \['final', 'question'\]"
    ):
        build(validate_spec(wrong_column))
    (tmp_path / "gsm8k.jsonl").write_text(json.dumps({"question": GOOD, "answer": "5 + 3 = 8\n#### 8"}) + "\n")
    unusable = small_spec(out, source={"kind": "local", "path": str(tmp_path / "gsm8k.jsonl")})  # answer_format: number
    with pytest.raises(BuildError, match=r"no usable problems: 1 rows rejected \{'non_numeric_answer': 1\}"):
        build(validate_spec(unusable))
    assert not out.exists()  # nothing claimed: the corrected spec can use the same --output


def test_answers_have_one_spelling_and_json_arrays_load(tmp_path, template):
    questions = [GOOD.replace("5", str(n)) for n in (6, 7, 8, 9)]
    rows = [{"question": q, "answer": a} for q, a in zip(questions, [40.0, "007", "$12", "-0"])]
    (tmp_path / "rows.json").write_text(json.dumps(rows, indent=1))
    problems, rejected = load_problems(validate_spec({"source": {"kind": "local", "path": str(tmp_path / "rows.json")}}).source, template)
    assert [p.gold_answer for p in problems] == ["40", "7", "12", "0"] and rejected == []
    assert [canonical_answer(a) for a in ("1,234", 2.5, "4.0", "-3", "x")] == ["1234", "2.5", "4", "-3", "x"]


def test_bench_pipeline_refuses_too_few_shards_before_any_work():
    """With no shard after each actor's first there is no steady state to time (it divided 0 by 0 after both runs)."""
    spec = validate_spec({"source": {"n": 16}, "output": {"shard_size": 8}, "resources": {"num_actors": 2}})
    with pytest.raises(BuildError, match="2 shards of 8 for 2 actors"):
        bench_pipeline(spec)


def test_an_actor_holding_gpus_without_cuda_fails_unless_the_spec_allows_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU wheel, or a driver the wheel does not match
    with pytest.raises(RuntimeError, match="holds 1.0 GPU.*sees no CUDA device.*resources.cpu_fallback: true"):
        require_cuda_if_gpus_held(ResourceSpec(num_gpus_per_actor=1))
    require_cuda_if_gpus_held(ResourceSpec(num_gpus_per_actor=1, cpu_fallback=True))
    require_cuda_if_gpus_held(ResourceSpec(num_gpus_per_actor=0))


def test_the_code_version_changes_with_any_source_that_builds_rows(tmp_path, monkeypatch):
    for package in provenance.SOURCE_PACKAGES:
        (tmp_path / package).mkdir(parents=True)
        (tmp_path / package / "rules.py").write_text("LAMBDA = 0.3\n")
    monkeypatch.setattr(provenance, "ROOT", tmp_path)
    before = provenance.code_version.__wrapped__()
    for room in ("factory/lab", "factory/train", "factory/publish"):  # benchmarks, fine-tuning, publishing make no rows
        (tmp_path / room).mkdir(parents=True, exist_ok=True)
        (tmp_path / room / "report.py").write_text("TITLE = 'new prose'\n")
    assert provenance.code_version.__wrapped__() == before
    (tmp_path / "factory/schemas" / "rules.py").write_text("LAMBDA = 0.2\n")
    assert before.startswith(factory.__version__ + "+") and provenance.code_version.__wrapped__() != before


# ---- with Ray --------------------------------------------------------------------------------


def e2e_spec(root: Path, model_dir: Path) -> Path:
    """Six good problems and two bad rows in a local file, the tiny model, three shards of two."""
    rows = [{"question": p.question, "answer": str(p.answer)} for p in synthetic.generate(6, seed=3)]
    rows += [{"question": GOOD, "answer": "eight"}, {"question": "", "answer": "1"}]
    (root / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = small_spec(root / "out", source={"kind": "local", "path": str(root / "problems.jsonl")}, model={"id": str(model_dir)})
    return write_spec(root / "spec.yaml", spec)


def load_config(out: Path, name: str) -> list[dict]:
    return datasets.load_dataset(str(out), name, split="train").to_list()


def read_config(out: Path, name: str) -> list[dict]:
    """A config's rows straight from its files, also when it has none (`datasets` cannot load that)."""
    return [row for path in sorted((out / "data" / name).glob("*.parquet")) for row in pq.read_table(path).to_pylist()]


@pytest.fixture(scope="module")
def straight_build(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("straight")
    spec_path = e2e_spec(root, tiny_model_dir)
    manifest = build(load_spec(spec_path))
    return spec_path, root / "out", manifest


@pytest.mark.slow
def test_build_with_ray_writes_a_loadable_dataset(straight_build):
    _, out, manifest = straight_build
    assert manifest["problems"] == 6 and manifest["shards"] == 3 and manifest["traces_sampled"] == 12
    assert manifest["accepted"] + manifest["filtered"]["total"] == 12
    assert manifest["rejected"] == {"total": 2, "by_reason": {"empty_question": 1, "non_numeric_answer": 1}}
    assert manifest["mean_nfe"] > 0 and json.loads((out / "manifest.json").read_text()) == manifest
    traces, sft, prm = (load_config(out, name) for name in ("traces", "sft", "prm"))
    assert len(traces) == len(sft) == manifest["accepted"] > 0
    filtered = read_config(out, "filtered")
    assert len(filtered) == manifest["filtered"]["total"] and all(t["filter_reason"] for t in filtered)
    negatives = [t for t in filtered if t["filter_reason"] != "duplicate" and not all(t["step_labels"])]
    assert len(prm) == len(traces) + len(negatives) == manifest["rows"]["prm"]
    assert sum(not r["accepted"] for r in prm) == len(negatives)
    assert len({t["trace_id"] for t in traces}) == len(traces)
    questions = {t["trace_id"]: t["question"] for t in traces}
    for row in sft:
        user, assistant = row["messages"]
        assert user["content"] == questions[row["trace_id"]] and "boxed" not in user["content"]
    assert [r["reason"] for r in load_config(out, "rejected")] == ["non_numeric_answer", "empty_question"]
    names = sorted(f"data/traces/{p.name}" for p in (out / "data" / "traces").iterdir())
    assert names == manifest["files"]["traces"] and [n[:23] for n in names] == [f"data/traces/train-0000{i}" for i in range(3)]
    assert all(output.DATA_FILE.fullmatch(n) for n in names)


@pytest.mark.slow
def test_a_build_killed_with_sigkill_resumes_to_the_same_traces(straight_build, tmp_path, own_sessions):
    spec_path, reference, _ = straight_build
    out = tmp_path / "out"
    command = [sys.executable, "-m", "factory.cli", "build", str(spec_path), "--output", str(out)]
    first = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    own_sessions(first.pid)
    deadline = time.monotonic() + 120
    while not list(out.glob("_build/shards/*.done.json")):
        assert first.poll() is None and time.monotonic() < deadline, "the build ended before any shard finished"
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    done = BuildDir(out).done_shards()
    assert 1 <= len(done) < 3 and not (out / "manifest.json").exists()

    rerun = subprocess.run(command, cwd=REPO, start_new_session=True, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{len(done)} already done" in rerun.stdout

    def by_id(root: Path) -> dict:
        rows = [t for name in ("traces", "filtered") for t in read_config(root, name)]
        return {t["trace_id"]: (t["reasoning"], t["step_scores"], t["filter_reason"]) for t in rows}

    resumed = load_config(out, "traces")
    assert len({t["trace_id"] for t in resumed}) == len(resumed)
    assert by_id(out) == by_id(reference)


def test_a_model_that_cannot_be_resolved_stops_build_and_dry_run_with_one_line(tmp_path, capsys):
    for model_id, message in (
        ("./models/stage9", "model.id: no such model directory './models/stage9'"),
        ("org/never-cached", "model.id: 'org/never-cached' is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set"),
    ):
        spec = write_spec(tmp_path / "s.yaml", small_spec(tmp_path / "out", model={"id": model_id}))
        for extra in (["--dry-run"], []):
            started = time.monotonic()
            with pytest.raises(SystemExit) as exit_:
                cli_build([str(spec), *extra])
            assert str(exit_.value.code) == f"factory build: {message}" and time.monotonic() - started < 10
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(model_adapter.ModelNotFound, match="a directory without model weights"):
        model_adapter.model_revision(str(tmp_path / "empty"))


def test_an_unpinned_hub_model_records_the_commit_it_resolved_to_and_a_moved_hub_model_does_not_resume(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--tiny"

    def publish_commit(sha: str) -> None:  # what a download of the repo's main branch leaves in the cache
        (repo / "snapshots" / sha).mkdir(parents=True)
        (repo / "snapshots" / sha / "config.json").write_text("{}")
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(sha)

    first, moved = "a" * 40, "b" * 40
    publish_commit(first)
    assert model_adapter.model_revision("org/tiny") == first
    assert model_adapter.model_revision("org/tiny", "c" * 40) == "c" * 40  # a pinned commit is taken as given
    spec = validate_spec(small_spec(tmp_path / "out", model={"id": "org/tiny"}))
    BuildDir(tmp_path / "out").claim(spec)
    publish_commit(moved)
    with pytest.raises(BuildError, match=f"model_revision {first}, but this one has model_revision {moved}"):
        BuildDir(tmp_path / "out").claim(spec)


@pytest.mark.slow
def test_on_shared_storage_the_actors_write_their_own_files_and_the_driver_reads_no_row(straight_build, tmp_path, monkeypatch):
    spec_path, reference, reference_manifest = straight_build
    out = tmp_path / "shared"

    def driver_stores(self, spec, result):
        raise AssertionError(f"the driver was handed shard {result.shard}'s rows")

    def driver_reads(*args, **kwargs):
        raise AssertionError("the driver read a Parquet file")

    summaries = []
    with monkeypatch.context() as patched:  # in the driver only: the actors' own modules are untouched
        patched.setattr(BuildDir, "store", driver_stores)
        for name in ("read_table", "ParquetFile", "ParquetDataset"):  # nor does assembling read a row back
            patched.setattr(pq, name, driver_reads)
        manifest = build(load_spec(spec_path).with_overrides(output_dir=out.as_uri()), log=lambda _: None, on_shard=summaries.append)
    assert sorted(s.shard for s in summaries) == [0, 1, 2] and all(set(s.files) == set(output.SHARD_CONFIGS) for s in summaries)
    assert {s.worker.actor.rsplit(":", 1)[1] for s in summaries}.isdisjoint({str(os.getpid())})
    assert manifest["files"] == reference_manifest["files"] and manifest["fingerprint"] == reference_manifest["fingerprint"]
    for name in ("traces", "filtered", "sft", "prm", "rejected"):
        assert read_config(out, name) == read_config(reference, name)
    assert not [p for p in out.rglob("*") if TMP_MARK in p.name]


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["path", "uri"])
def test_an_actor_killed_mid_build_is_replaced_and_every_trace_lands_exactly_once(straight_build, tmp_path, own_sessions, storage):
    """With a URI the actors write their own files, so the one killed may die mid-write."""
    spec_path, reference, _ = straight_build
    spec = yaml.safe_load(spec_path.read_text())
    spec["output"]["shard_size"] = 1  # six shards: work is still queued when the first one lands
    path = write_spec(tmp_path / "spec.yaml", spec)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "factory.cli", "build", str(path), "--output", out.as_uri() if storage == "uri" else str(out)]
    driver = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    own_sessions(driver.pid)
    deadline = time.monotonic() + 120
    while not (markers := list(out.glob("_build/shards/*.done.json"))):
        assert driver.poll() is None and time.monotonic() < deadline, "the build ended before any shard finished"
        time.sleep(0.02)
    actor_pid = int(json.loads(markers[0].read_text())["worker"]["actor"].rsplit(":", 1)[1])
    os.kill(actor_pid, signal.SIGKILL)  # the model replica that delivered the first shard
    output, _ = driver.communicate(timeout=180)
    assert driver.returncode == 0, output[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["problems"] == 6 and manifest["traces_sampled"] == 12

    def by_id(root: Path) -> dict:
        rows = [t for name in ("traces", "filtered") for t in read_config(root, name)]
        assert len({t["trace_id"] for t in rows}) == len(rows)  # every trace exactly once
        return {t["trace_id"]: t for t in rows}

    rebuilt, expected = by_id(out), by_id(reference)
    assert {k: (t["reasoning"], t["filter_reason"]) for k, t in rebuilt.items()} == {
        k: (t["reasoning"], t["filter_reason"]) for k, t in expected.items()
    }
    for key, trace in rebuilt.items():  # scored in other batches (a shard per problem here): equal up to float noise
        assert trace["step_scores"] == pytest.approx(expected[key]["step_scores"], abs=1e-4)
    assert len({w["actor"] for w in manifest["workers"]}) >= 2
