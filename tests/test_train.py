import json
import random
import sys
from pathlib import Path

from transformers import AutoModelForMaskedLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import train_mdlm  # noqa: E402

TINY = ["--hidden", "32", "--layers", "1", "--heads", "2", "--intermediate", "64", "--batch-size", "4", "--threads", "1"]


def test_layouts_mask_what_the_scorer_reads(template):
    maker = train_mdlm.BatchMaker(template, seed=0, mix=(0, 1, 0), step_weights=[0, 0, 1, 1, 0, 0])
    rng = random.Random(0)
    for _ in range(20):
        ids, masked = maker.row(rng)
        spans = template.spans(len(ids))
        region = list(range(spans.reasoning.start, spans.reasoning.stop)) + list(range(spans.answer.start, spans.answer.stop))
        flags = [masked[p] for p in region]
        assert any(flags)
        assert flags == sorted(flags)  # a visible prefix, then everything masked (answer included)
        assert not any(masked[: spans.reasoning.start])  # the question is never masked


def test_corrupted_layout_keeps_the_error_visible(template):
    maker = train_mdlm.BatchMaker(template, seed=1, mix=(0, 0, 1), step_weights=[0, 1, 1, 1, 0, 0])
    rng, slips = random.Random(1), 0
    for _ in range(20):
        ids, masked = maker.row(rng)
        spans = template.spans(len(ids))
        visible = [t for t, m in zip(ids[spans.reasoning], masked[spans.reasoning]) if not m]
        steps = template.split_steps(visible + [template.filler_id])
        wrong = [s for s in steps if eval(s.split(" = ")[0]) != int(s.split(" = ")[1])]  # noqa: S307
        answer_masked = all(masked[spans.answer])
        assert answer_masked and steps  # the error sits in the visible prefix, the answer is a target
        # an arithmetic slip is visible, or the step is arithmetically right but the wrong one (operand/operation)
        assert len(wrong) <= 1
        slips += len(wrong)
    assert slips >= 3  # about a third of corrupted rows carry a visible arithmetic slip


def test_training_runs_checkpoints_resumes_and_exports(tmp_path):
    out = tmp_path / "run"
    train_mdlm.main(["--out", str(out), "--steps", "3", "--checkpoint-every", "2", *TINY])
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2 and all(r["loss"] > 0 for r in log)
    assert "one_pass_answer_acc" in log[-1]
    train_mdlm.main(["--out", str(out), "--steps", "5", "--checkpoint-every", "2", *TINY])
    state = json.loads((out / "hf" / "training_state.json").read_text())
    assert state["step"] == 5
    assert AutoModelForMaskedLM.from_pretrained(out / "hf").config.model_type == "modernbert"
    assert AutoTokenizer.from_pretrained(out / "hf").mask_token == "[MASK]"
