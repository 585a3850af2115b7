import collections
import hashlib
import itertools
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import train_mdlm  # noqa: E402

from factory.train.batches import SyntheticBatches, response_slots  # noqa: E402

GOLDEN_BATCHES = "6e81d875e20c58db"  # first batches of seed 3 before the layouts became a registry
TINY = ["--hidden", "32", "--layers", "1", "--heads", "2", "--intermediate", "64", "--batch-size", "4", "--threads", "1"]


def only(layout: str) -> dict[str, float]:
    """A mix that draws every row in one layout."""
    return {layout: 1.0}


def response_flags(spans, masked: list[bool]) -> list[bool]:
    """The mask over the reasoning and answer slots, in canvas order."""
    return masked[spans.reasoning] + masked[spans.answer]


def cut_in_step(template, ids: list[int], masked: list[bool]) -> tuple[list[int], list[tuple[int, int]], int, int]:
    """A row in left-to-right decoding's state (a visible prefix, then everything masked): its reasoning
    ids, their step spans, the step the cut falls in and the cut's offset within that step."""
    spans = template.spans(len(ids))
    flags = response_flags(spans, masked)
    assert any(flags) and flags == sorted(flags)
    cut = masked.index(True) - spans.reasoning.start
    reasoning = ids[spans.reasoning]
    step_spans = template.step_spans(reasoning)
    index = next(i for i, (a, b) in enumerate(step_spans) if a <= cut < b)
    return reasoning, step_spans, index, cut - step_spans[index][0]


def test_layouts_mask_what_the_scorer_reads(template):
    maker = SyntheticBatches(template, seed=0, mix=only("prefix"), step_weights=[0, 0, 1, 1, 0, 0])
    rng, seen = random.Random(0), collections.Counter()
    for _ in range(60):
        ids, masking = maker.row(rng)
        masked, _ = masking.masked, masking.loss
        spans = template.spans(len(ids))
        flags = response_flags(spans, masked)
        assert any(flags)
        assert flags == sorted(flags)  # a visible prefix, then everything masked (answer included)
        assert not any(masked[: spans.reasoning.start])  # the question is never masked
        reasoning, cut = ids[spans.reasoning], flags.index(True)
        ends = [b for _, b in template.step_spans(reasoning)]
        if cut:  # after k >= 1 whole steps, the token after the last one visible or not
            after_last = cut - 1 if cut - 1 in ends else cut
            assert after_last in ends
            seen[(after_last == ends[-1], cut > after_last)] += 1
    # after a middle step and after the last one, the separator / end filler is sometimes masked, sometimes not
    assert all(seen[key] for key in itertools.product((False, True), repeat=2)), seen


def test_corrupted_layout_keeps_the_error_visible(template):
    maker = SyntheticBatches(template, seed=1, mix=only("corrupted"), step_weights=[0, 1, 1, 1, 0, 0])
    rng, slips = random.Random(1), 0
    for _ in range(20):
        ids, masking = maker.row(rng)
        masked, _ = masking.masked, masking.loss
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


def test_results_layout_masks_each_result_and_the_answer_only(template):
    maker = SyntheticBatches(template, seed=4, mix=only("results"), step_weights=[0, 1, 1, 1, 1, 0])
    rng = random.Random(4)
    for _ in range(20):
        ids, masking = maker.row(rng)
        masked, _ = masking.masked, masking.loss
        spans = template.spans(len(ids))
        assert all(masked[spans.answer]) and not any(masked[: spans.reasoning.start])
        reasoning, reasoning_mask = ids[spans.reasoning], masked[spans.reasoning]
        for start, end in template.step_spans(reasoning):
            tokens = template.tokenizer.convert_ids_to_tokens(reasoning[start:end])
            equals = tokens.index("=")
            assert reasoning_mask[start:end] == [False] * (equals + 1) + [True] * (end - start - equals - 1)
            assert [t.isdigit() for t in tokens[equals + 1 :]] == [True] * (end - start - equals - 1)
        assert not any(m for m, t in zip(reasoning_mask, reasoning) if t == template.filler_id)


def test_next_result_layout_is_left_to_right_decoding_at_a_result(template):
    maker = SyntheticBatches(template, seed=6, mix=only("next_result"), step_weights=[0, 1, 1, 1, 1, 0])
    rng = random.Random(6)
    for _ in range(20):
        ids, masking = maker.row(rng)
        masked, loss = masking.masked, masking.loss
        spans = template.spans(len(ids))
        flags = response_flags(spans, masked)
        assert any(flags) and flags == sorted(flags)  # a visible prefix, then everything masked
        assert not any(masked[: spans.reasoning.start]) and masked.count(True) == flags.count(True)
        cut = masked.index(True)
        assert template.tokenizer.convert_ids_to_tokens(ids[cut - 1]) == "="
        targets = [p for p in range(len(ids)) if loss[p]]
        assert targets == list(range(cut, targets[-1] + 1))  # this result and the token after it
        assert all(template.tokenizer.convert_ids_to_tokens(ids[p]).isdigit() for p in targets[:-1])
        assert ids[targets[-1]] in (template.filler_id, template.separator_ids[0])  # go on, or stop
    _, _, targets, masked, weights = maker.batch(step=0, size=8)
    assert (weights[masked] > 0).sum() < masked.sum()  # the masked future carries no loss
    assert torch.isclose(weights.sum(), torch.tensor(8.0 * response_slots(template)))


def test_next_token_layout_cuts_anywhere_in_a_step_up_to_its_result(template):
    maker = SyntheticBatches(template, seed=7, mix=only("next_token"), step_weights=[0, 1, 1, 1, 1, 0])
    rng = random.Random(7)
    cuts_after = collections.Counter()
    for _ in range(60):
        ids, masking = maker.row(rng)
        masked, loss = masking.masked, masking.loss
        reasoning, step_spans, index, offset = cut_in_step(template, ids, masked)
        start, end = step_spans[index]
        step = template.tokenizer.convert_ids_to_tokens(reasoning[start:end])
        assert offset <= step.index("=") + 1  # never past the result's first token
        base = template.spans(len(ids)).reasoning.start
        targets = [p for p in range(len(ids)) if loss[p]]
        assert targets == list(range(base + start + offset, base + end + 1))  # the step's rest and the token after
        assert ids[targets[-1]] in (template.filler_id, template.separator_ids[0])
        cuts_after[step[offset - 1] if offset else "step start"] += 1
    # the first operand, the operator, the second operand and the result are each decoded in this state
    assert cuts_after["step start"] and cuts_after["="] and any(t in cuts_after for t in "+-*/")
    assert sum(n for t, n in cuts_after.items() if t.isdigit()) > 0


def test_hidden_operand_layout_masks_a_steps_last_operand_and_trains_its_result_alone(template):
    maker = SyntheticBatches(template, seed=5, mix=only("hidden_operand"), step_weights=[0, 1, 1, 1, 1, 0])
    rng = random.Random(5)
    for _ in range(40):
        ids, masking = maker.row(rng)
        masked, loss = masking.masked, masking.loss
        reasoning, step_spans, index, offset = cut_in_step(template, ids, masked)
        start, end = step_spans[index]
        step = template.tokenizer.convert_ids_to_tokens(reasoning[start:end])
        assert offset == step.index("=") - 1 and step[offset].isdigit()  # the cut falls just before the last operand
        base = template.spans(len(ids)).reasoning.start
        assert [p for p in range(len(ids)) if loss[p]] == list(range(base + start + offset + 2, base + end))  # the result


def test_far_operand_layout_cuts_before_a_result_from_two_or_more_steps_back(template):
    maker = SyntheticBatches(template, seed=8, mix=only("far_operand"), step_weights=[0, 1, 1, 1, 1, 0])
    rng = random.Random(8)
    for _ in range(40):
        ids, masking = maker.row(rng)
        masked, loss = masking.masked, masking.loss
        reasoning, step_spans, index, offset = cut_in_step(template, ids, masked)
        start, end = step_spans[index]
        tokens = template.tokenizer.convert_ids_to_tokens(reasoning[start:end])
        # the masked operand equals the result of a step at least two back, not the one just before
        earlier = [template.tokenizer.convert_ids_to_tokens(reasoning[slice(*s)])[-1] for s in step_spans[: index - 1]]
        assert tokens[offset] in earlier and offset in (0, tokens.index("=") - 1)
        base = template.spans(len(ids)).reasoning.start
        assert [p for p in range(len(ids)) if loss[p]] == list(range(base + start + offset, base + end + 1))


def test_answer_ahead_layout_trains_the_answer_one_or_two_steps_ahead_of_the_reasoning(template):
    maker = SyntheticBatches(template, seed=9, mix=only("answer_ahead"), step_weights=[0, 1, 1, 1, 1, 0])
    rng, steps_left, slips = random.Random(9), collections.Counter(), 0
    for _ in range(60):
        ids, masking = maker.row(rng)
        masked, loss = masking.masked, masking.loss
        spans = template.spans(len(ids))
        flags = response_flags(spans, masked)
        assert flags == sorted(flags) and all(masked[spans.answer])  # a visible prefix, then all masked
        assert [p for p in range(len(ids)) if loss[p]] == list(range(spans.answer.start, spans.answer.stop))
        reasoning, cut = ids[spans.reasoning], flags.index(True)
        steps = template.split_steps(reasoning)
        visible = sum(end <= cut for _, end in template.step_spans(reasoning))
        steps_left[len(steps) - visible] += 1
        # the answer follows the written reasoning, a visible wrong step included
        assert template.parse_answer(ids[spans.answer]) == steps[-1].split(" = ")[1]
        slips += any(eval(s.split(" = ")[0]) != int(s.split(" = ")[1]) for s in steps[:visible])  # noqa: S307
    assert steps_left[1] > steps_left[2] > 0 and set(steps_left) <= {0, 1, 2}, steps_left
    assert slips >= 3


def test_drill_rows_pack_several_problems_results_masked(template):
    maker = SyntheticBatches(template, seed=5, mix=only("uniform"), step_weights=[1, 2, 3, 3, 1.5, 1])
    rng = random.Random(5)
    for _ in range(10):
        ids, masking = maker.drill_row(rng)
        masked, _ = masking.masked, masking.loss
        spans = template.spans(len(ids))
        steps = template.split_steps(ids[spans.reasoning])
        assert len(steps) >= 6  # one step from each of several problems shares one region
        assert all(eval(s.split(" = ")[0]) == int(s.split(" = ")[1]) for s in steps)  # noqa: S307
        assert template.parse_answer(ids[spans.answer]) == steps[-1].split(" = ")[1]
        assert sum(masked[spans.reasoning]) == len(steps) and all(masked[spans.answer])
        assert not any(masked[: spans.reasoning.start])


def test_copy_warmup_trains_reasoning_tokens_of_short_problems_only(template):
    maker = SyntheticBatches(template, seed=2, mix=only("uniform"), step_weights=[0, 0, 0, 0, 0, 1])
    inputs, _, targets, masked, weights = maker.batch(step=0, size=16, warmup_max_steps=2)
    spans = template.spans(inputs.shape[1])
    assert not masked[:, spans.answer].any()  # the answer stays visible
    filler = targets == template.filler_id
    assert (weights[masked & filler] == 0).all() and (weights[masked & ~filler] > 0).all()
    for row in targets[:, spans.reasoning].tolist():
        assert 1 <= len(template.split_steps(row)) <= 2  # the 6-step weights are overridden


def test_masked_fillers_of_a_row_weigh_one_slot(template):
    maker = SyntheticBatches(template, seed=3, mix=only("uniform"), step_weights=[1, 0, 0, 0, 0, 0])
    _, _, targets, masked, weights = maker.batch(step=0, size=16)
    filler = masked & (targets == template.filler_id)
    for i in range(16):
        if filler[i].any() and (masked[i] & ~filler[i]).any():
            one_slot = weights[i][masked[i] & ~filler[i]][0]
            assert torch.isclose(weights[i][filler[i]].sum(), one_slot)


def test_training_runs_checkpoints_resumes_and_exports(tmp_path):
    out = tmp_path / "run"
    # Two warm-up steps, then the full objective (step 2 a drill batch): every phase runs.
    train_mdlm.main(["--out", str(out), "--steps", "3", "--checkpoint-every", "2", "--warmup-copy-steps", "2", "--drill-every", "2", *TINY])
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2 and all(r["loss"] > 0 for r in log)
    assert "one_pass_answer_acc" in log[-1]
    train_mdlm.main(["--out", str(out), "--steps", "5", "--checkpoint-every", "2", "--warmup-copy-steps", "2", *TINY])
    state = json.loads((out / "hf" / "training_state.json").read_text())
    assert state["step"] == 5
    assert AutoModelForMaskedLM.from_pretrained(out / "hf").config.model_type == "modernbert"
    assert AutoTokenizer.from_pretrained(out / "hf").mask_token == "[MASK]"


def test_fourier_numbers_write_each_value_into_its_embedding(tokenizer):
    model = train_mdlm.ModernBertForMaskedLM(train_mdlm.embedded_config(tokenizer, 32, 1, 2, 64))
    train_mdlm.init_fourier_numbers(model, tokenizer)
    weight = model.get_input_embeddings().weight
    angle = lambda n, t: torch.tensor(2 * torch.pi * n / t)  # noqa: E731
    for n in ("7", "42", "999"):
        row = weight[tokenizer.convert_tokens_to_ids(n), :6]
        expected = torch.stack([angle(int(n), t).cos() for t in (10, 100, 1000)] + [angle(int(n), t).sin() for t in (10, 100, 1000)])
        assert torch.allclose(row, expected, atol=1e-5)
    # 42 and 52 agree mod 10 only: their period-10 features match, the period-100 ones do not.
    a, b = (weight[tokenizer.convert_tokens_to_ids(n), :6] for n in ("42", "52"))
    assert torch.allclose(a[[0, 3]], b[[0, 3]], atol=1e-5) and not torch.allclose(a[[1, 4]], b[[1, 4]], atol=1e-2)


def test_grown_model_computes_the_same_function_and_trains_on(tmp_path, tokenizer):
    torch.manual_seed(0)
    small = train_mdlm.ModernBertForMaskedLM(train_mdlm.embedded_config(tokenizer, 32, 3, 2, 64)).eval()
    grown = train_mdlm.grow_depth(small, [1, 2, 2]).eval()
    assert grown.config.num_hidden_layers == 6 and len(grown.config.layer_types) == 6
    ids = torch.randint(4, len(tokenizer), (2, 30))
    with torch.no_grad():
        before = small(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        after = grown(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.allclose(before, after, atol=1e-5)  # the inserted layers add nothing yet
    # layers 0, 1, copy of 1, 2, copy of 2, copy of 2: a copy's inputs as its source's, its outputs zero
    assert torch.equal(grown.model.layers[2].attn.Wqkv.weight, small.model.layers[1].attn.Wqkv.weight)
    assert all(grown.model.layers[i].attn.Wo.weight.abs().sum() == grown.model.layers[i].mlp.Wo.weight.abs().sum() == 0 for i in (2, 4, 5))
    assert torch.equal(grown.model.layers[3].mlp.Wo.weight, small.model.layers[2].mlp.Wo.weight)
    with pytest.raises(ValueError, match="0..2"):
        train_mdlm.grow_depth(small, [3])
    # from an exported model: grown, trained, checkpointed, and resumed at the grown depth
    small.save_pretrained(tmp_path / "small")
    tokenizer.save_pretrained(tmp_path / "small")
    args = ["--out", str(tmp_path / "run"), "--init-from", str(tmp_path / "small"), "--grow-after", "0", "--warmup-copy-steps", "0"]
    train_mdlm.main([*args, "--steps", "2", "--checkpoint-every", "2", *TINY[8:]])
    train_mdlm.main([*args, "--steps", "3", "--checkpoint-every", "2", *TINY[8:]])
    assert AutoModelForMaskedLM.from_pretrained(tmp_path / "run" / "hf").config.num_hidden_layers == 4
    assert json.loads((tmp_path / "run" / "hf" / "training_state.json").read_text())["step"] == 3


def test_a_fixed_seed_gives_the_batches_it_gave_before_the_layout_registry(template):
    """The layouts moved from one method into a registry; every layout, the warm-up and a drill batch
    still draw the same rows (digest of the first batches recorded from the code before the move)."""
    mix = dict.fromkeys(["uniform", "prefix", "corrupted", "results", "next_result", "next_token", "far_operand"], 1.0)
    maker = SyntheticBatches(template, seed=3, mix={**mix, "answer_ahead": 0.5, "hidden_operand": 0.5}, step_weights=[1] * 6)
    batches = [maker.batch(0, 16), maker.batch(1, 16), maker.batch(2, 8, warmup_max_steps=3), maker.batch(3, 8, drill=True)]
    digest = hashlib.sha256()
    for tensors in batches:
        for tensor in tensors:
            digest.update(tensor.float().numpy().tobytes())
    assert digest.hexdigest()[:16] == GOLDEN_BATCHES
