"""`factory finetune`: the SFT objective, reading builds back onto their canvas, the accelerate loop
(resume after a kill, export), and the errors that stop a run before it trains."""

import json
import random
import re
import shutil
from functools import partial

import pytest
import torch

from factory.build.command import build
from factory.build.runner import run_in_process
from factory.build.spec import validate_spec
from factory.cli import main as factory_main
from factory.models.adapter import ModelAdapter
from factory.models.embedded import EMBEDDED_MODEL_DIR
from factory.synthetic.problems import SyntheticConfig, generate
from factory.train import finetune as ft
from factory.train.batches import Example, collate, make_row, masked_loss, response_slots
from factory.train.evaluate import model_template
from factory.train.layouts import LAYOUTS, Masking, mix_weights

TRACE_LAYOUTS = [name for name, spec in LAYOUTS.items() if not spec.needs_problem]


def build_spec(out, **sections) -> dict:
    """A few synthetic problems whose every trace is kept, whatever the tiny model writes."""
    spec = {
        "source": {"kind": "synthetic", "n": 6},
        "filters": {
            "answer_match": False,
            "step_labels": False,
            "verify_arithmetic": False,
            "grounded": False,
            "min_steps": 0,
            "dedupe": False,
        },
        "sampler": {"target": 2},
        "output": {"dir": str(out), "shard_size": 3},
    }
    return {**spec, **sections}


@pytest.fixture(scope="module")
def tiny_build(tiny_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "out"
    build(validate_spec(build_spec(out)), log=lambda _: None, runner=partial(run_in_process, adapter=tiny_adapter))
    return out


def gold_examples(n: int = 12) -> list[Example]:
    return [Example(p.question, p.steps, str(p.answer)) for p in generate(n, seed=5, config=SyntheticConfig(2, 4))]


def test_no_layout_masks_or_targets_a_question_slot(template):
    rng, examples = random.Random(0), gold_examples()
    for name in TRACE_LAYOUTS:
        for _ in range(20):
            ids, masking = make_row(template, rng, lambda r: r.choice(examples), mix_weights({name: 1.0}))
            question_end = template.spans(len(ids)).reasoning.start
            assert not any(masking.masked[:question_end]) and not any(masking.loss[:question_end]), name
            assert all(m for m, loss in zip(masking.masked, masking.loss) if loss), f"{name}: a loss slot that is not masked"


def test_sft_layout_masks_every_response_slot_alike_with_one_t_per_row(template):
    """Reasoning, delimiter, answer, filler and end slots are all maskable (LLaDA's padded EOS)."""
    rng, examples = random.Random(1), gold_examples()
    seen = set()
    for _ in range(200):
        ids, masking = make_row(template, rng, lambda r: r.choice(examples), mix_weights({"sft": 1.0}))
        start = template.spans(len(ids)).reasoning.start
        assert 0 < masking.t < 1 and masking.masked == masking.loss
        seen |= {p - len(ids) for p, m in enumerate(masking.masked) if m}  # offsets from the end, shared by every row
    assert seen == set(range(-(len(ids) - start), 0))  # every response slot, the last (end) token included


def test_sft_loss_weighs_each_masked_slot_by_1_over_t_normalised_by_the_response_length(template):
    example = gold_examples(1)[0]
    ids = template.canvas(
        template.encode_question(example.question), template.encode_reasoning(example.steps), template.encode_answer(example.answer)
    )
    start = template.spans(len(ids)).reasoning.start
    response = len(ids) - start
    first = [p in (start, start + 3, len(ids) - 1) for p in range(len(ids))]  # 3 slots, t = 0.25
    second = [p == start + 1 for p in range(len(ids))]  # 1 slot, t = 0.5
    inputs, attention, targets, masked, weights = collate(
        template, [(ids, Masking(first, first, 0.25)), (ids, Masking(second, second, 0.5))]
    )
    n_response = response_slots(template)
    assert torch.allclose(weights[0][torch.tensor(first)], torch.tensor(n_response / (response * 0.25)))
    assert torch.allclose(weights[1][torch.tensor(second)], torch.tensor(n_response / (response * 0.5)))
    assert (weights[~masked] == 0).all() and (inputs[masked] == template.mask_id).all()
    logits = torch.randn(2, len(ids), len(template.tokenizer))
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    # LLaDA: per row, the sum over masked slots of CE / t, divided by the response length; the batch mean
    expected = ((ce[0][torch.tensor(first)].sum() / 0.25) / response + (ce[1][torch.tensor(second)].sum() / 0.5) / response) / 2
    assert torch.isclose(masked_loss(logits, targets, masked, weights, n_response), expected)


def test_builds_are_read_back_onto_their_canvas(tiny_build, tokenizer):
    data, template = ft.load_build(str(tiny_build), "sft", 1.0, tokenizer)
    traces, _ = ft.load_build(str(tiny_build), "traces", 1.0, tokenizer)
    assert data.fingerprint == json.loads((tiny_build / "manifest.json").read_text())["fingerprint"]
    assert len(data.examples) + sum(data.rejected.values()) == 12  # 6 problems x k=2, every row accounted for
    # the sft text split back at the delimiter gives the steps and answer the traces config keeps apart
    by_question = {(e.question, tuple(e.steps)) for e in traces.examples}
    assert all((e.question, tuple(e.steps)) in by_question for e in data.examples)
    assert {e.answer for e in data.examples} <= {e.answer for e in traces.examples}
    assert template.config == validate_spec(build_spec(tiny_build)).template.to_config()


def test_finetune_lowers_the_loss_resumes_after_a_kill_and_exports_a_model_the_factory_builds_with(
    tiny_build, tiny_model_dir, tmp_path, tokenizer
):
    out = tmp_path / "ft"
    config = ft.FinetuneConfig(steps=4, batch_size=4, lr=3e-3, warmup=1, checkpoint_every=2, precision="fp32")
    original = ft.TraceBatches.batch

    def killed_at_step_3(self, step, *args):
        if step == 3:
            raise KeyboardInterrupt  # the process dies mid-run
        return original(self, step, *args)

    ft.TraceBatches.batch = killed_at_step_3
    try:
        with pytest.raises(KeyboardInterrupt):
            ft.finetune([(str(tiny_build), 1.0)], str(tiny_model_dir), out, config, log=lambda _: None)
    finally:
        ft.TraceBatches.batch = original
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2 and not (out / "model.safetensors").exists()
    lines = []
    summary = ft.finetune([(str(tiny_build), 1.0)], str(tiny_model_dir), out, config, log=lines.append)
    assert "[finetune] resumed at step 2" in lines and summary["steps"] == 4
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 4
    assert any(re.search(r"step 4/4 loss [\d.]+ [\d,]+ tokens/s ETA \d+s", line) for line in lines)
    card = (out / "README.md").read_text()
    fingerprint = json.loads((tiny_build / "manifest.json").read_text())["fingerprint"]
    assert fingerprint in card and "tiny-model" in card and "revision `sha256:" in card and "lr: 0.003" in card
    # the canvas it was trained on travels in its config.json, and `factory eval` decodes on it
    trained_on = validate_spec(json.loads((tiny_build / "manifest.json").read_text())["spec"]).template.to_config()
    assert model_template(ModelAdapter.load(str(out))) == trained_on
    config_json = json.loads((out / "config.json").read_text())
    config_json["factory_template"]["reasoning_slots"] = 48
    (out / "config.json").write_text(json.dumps(config_json))
    factory_main(["eval", "--model", str(out), "--n", "2", "--json", str(tmp_path / "eval.json")])
    assert json.loads((tmp_path / "eval.json").read_text())["template"]["reasoning_slots"] == 48

    # the loss falls: a longer run, the same fixed batch before and after
    data, template = ft.load_build(str(tiny_build), "sft", 1.0, tokenizer)
    fixed = ft.TraceBatches(template, [data], ft.DEFAULT_MIX, seed=99).batch(0, 16)
    longer = ft.FinetuneConfig(steps=40, batch_size=8, lr=3e-3, warmup=2, checkpoint_every=40, precision="fp32")
    ft.finetune([(str(tiny_build), 1.0)], str(tiny_model_dir), tmp_path / "longer", longer, log=lambda _: None)

    def fixed_loss(path) -> float:
        model = ModelAdapter.load(str(path), device="cpu").model
        with torch.no_grad():
            logits = model(input_ids=fixed[0], attention_mask=fixed[1]).logits
        return masked_loss(logits, fixed[2], fixed[3], fixed[4], response_slots(template)).item()

    assert fixed_loss(tmp_path / "longer") < 0.8 * fixed_loss(tiny_model_dir)

    # the exported directory is a model the factory loads and builds with
    spec = validate_spec(build_spec(tmp_path / "rebuilt", model={"id": str(out)}, source={"kind": "synthetic", "n": 2}))
    manifest = build(spec, log=lambda _: None, runner=run_in_process)
    assert manifest["traces_sampled"] == 4 and manifest["model"] == str(out)


def test_inputs_that_cannot_be_trained_on_stop_with_one_line_before_training(tiny_build, tiny_model_dir, tmp_path, bpe_template):
    config = ft.FinetuneConfig(steps=1, batch_size=2)

    def error(builds, data_config="sft", base=str(tiny_model_dir), run_config=config) -> str:
        with pytest.raises(ft.FinetuneError) as err:
            ft.finetune(builds, base, tmp_path / "never", run_config, data_config, log=lambda _: None)
        assert "\n" not in str(err.value) and not (tmp_path / "never").exists()
        return str(err.value)

    assert "no manifest.json; not a finished factory build directory" in error([(str(tmp_path), 1.0)])
    assert "no such build directory" in error([(str(tmp_path / "typo"), 1.0)])
    # a build that kept nothing has no sft config
    empty = tmp_path / "empty"
    spec = build_spec(empty, filters={"min_steps": 99}, source={"kind": "synthetic", "n": 2})
    build(validate_spec(spec), log=lambda _: None, runner=partial(run_in_process, adapter=ModelAdapter.load(str(tiny_model_dir))))
    assert "config 'sft' holds no rows (an empty build: 0 traces accepted)" in error([(str(empty), 1.0)])
    manifest = json.loads((empty / "manifest.json").read_text())
    (empty / "manifest.json").write_text(json.dumps({**manifest, "rows": {}}))  # a manifest that does not count it: the load fails
    assert "cannot load config 'sft': BuilderConfig 'sft' not found" in error([(str(empty), 1.0)])
    (empty / "manifest.json").unlink()  # the manifest is what makes a directory a build
    assert "no manifest.json; not a finished factory build directory" in error([(str(empty), 1.0)])
    # a build made with another tokenizer
    other_tokenizer = tmp_path / "bpe"
    bpe_template.tokenizer.save_pretrained(other_tokenizer)
    other = tmp_path / "other"
    shutil.copytree(tiny_build, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["spec"]["model"]["id"] = str(other_tokenizer)
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert "whose tokenizer differs from the base model's" in error([(str(other), 1.0)])
    # a template the base tokenizer cannot write
    manifest["spec"]["model"]["id"] = "embedded"
    manifest["spec"]["template"]["delimiter"] = "The answer is zzfinal{"
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert "cannot encode the build's template.delimiter" in error([(str(other), 1.0)])
    # a layout that needs the generator's structure, which a build's traces lack
    structural = ft.FinetuneConfig(steps=1, mix={"corrupted": 1.0})
    assert "need a synthetic problem's structure" in error([(str(tiny_build), 1.0)], run_config=structural)


def test_bench_finetune_runs_every_arm_and_the_second_round_from_one_base(tmp_path):
    """The benchmark's plumbing on a tiny model: every arm trains the same steps from the same base and is
    scored on the same held-out problems; a rerun finds every stage done."""
    from factory.lab import finetune as bench

    config = ft.FinetuneConfig(steps=2, batch_size=2, warmup=1, checkpoint_every=2, precision="fp32")
    logs = []
    base = EMBEDDED_MODEL_DIR  # a model whose traces pass the build's filters
    report = bench.bench_finetune(
        tmp_path, base, pool=6, n=4, seed=1, arms=bench.ARMS, config=config, k=1, log=logs.append, runner=run_in_process
    )
    arms = report["arms"]
    assert list(arms) == ["base", *bench.ARMS, "posterior_round2"] and report["held_out"] == 4
    scored = {name: a for name, a in arms.items() if "accuracy" in a}  # an arm with no traces is reported, not trained
    assert set(arms) - set(scored) <= {"rejection"} and all(arms[name]["traces"] == 0 for name in set(arms) - set(scored))
    assert all(a["n"] == 4 and a["ci95"][0] <= a["accuracy"] <= a["ci95"][1] for a in scored.values())
    assert arms["gold"]["traces"] == 6 and arms["gold+posterior"]["traces"] == arms["gold"]["traces"] + arms["posterior"]["traces"]
    assert arms["unfiltered"]["traces"] >= arms["posterior"]["traces"]
    assert all(json.loads((tmp_path / f"arm_{a}" / "checkpoint" / "state.json").read_text())["step"] == 2 for a in scored if a != "base")
    table = bench.finetune_markdown(report, "plot.png")
    header = next(line for line in table.splitlines() if line.startswith("| arm"))
    assert header.split("|")[2].strip() == "accuracy"  # the first numeric column
    again = bench.bench_finetune(tmp_path, base, 6, 4, 1, bench.ARMS, config, k=1, log=logs.append, runner=run_in_process)
    assert again["arms"] == arms


def test_a_kill_mid_checkpoint_swap_resumes_from_the_whole_previous_checkpoint(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    assert ft.latest_checkpoint(checkpoint) is None
    old = tmp_path / "checkpoint.old"  # killed after the old checkpoint moved aside, before the new one moved in
    old.mkdir()
    (old / "state.json").write_text(json.dumps({"step": 100, "history": []}))
    (tmp_path / "checkpoint.tmp").mkdir()  # a half-written new one is never taken
    assert ft.latest_checkpoint(checkpoint) == old
    checkpoint.mkdir()
    (checkpoint / "state.json").write_text(json.dumps({"step": 200, "history": []}))
    assert ft.latest_checkpoint(checkpoint) == checkpoint


def test_settings_that_cannot_train_are_refused_in_one_line():
    for bad, message in (
        ({"checkpoint_every": 0}, "checkpoint_every must be >= 1"),
        ({"lr": 0}, "lr must be > 0"),
        ({"steps": 0}, "steps"),
    ):
        with pytest.raises(ft.FinetuneError, match=message):
            ft.FinetuneConfig(**bad)


@pytest.mark.slow
def test_two_processes_train_as_one_ddp_run(tiny_build, tiny_model_dir, tmp_path):
    """`torchrun` (or `accelerate launch`) with two processes: gloo DDP on CPU, each process its own
    batches, one checkpoint holding both processes' random states, one export, one progress line."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    job = Path(__file__).resolve().parents[1] / "jobs" / "finetune_mdlm.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(job), str(tiny_build)]
    command += ["--model", str(tiny_model_dir), "--output", str(out), "--steps", "4", "--batch-size", "2", "--checkpoint-every", "2"]
    run = subprocess.run([*command, "--precision", "fp32"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoint").glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    assert (out / "model.safetensors").exists() and run.stdout.count("[finetune] step 4/4") == 1
