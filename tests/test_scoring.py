import random

import pytest

from factory.core.scoring import StepScorer, Trace, TraceScores, share_canvases
from factory.core.template import ReasoningTemplate
from factory.models.adapter import ModelAdapter
from factory.synthetic.problems import SyntheticConfig, corrupt, generate


@pytest.fixture(scope="module")
def traces(template):
    problems = generate(4, seed=9, config=SyntheticConfig(2, 4))
    return [
        Trace(template.encode_question(p.question), template.encode_reasoning(p.steps), template.encode_answer(str(p.answer)))
        for p in problems
    ]


def test_prefix_canvases_show_exactly_k_steps_and_hide_the_answer(tiny_adapter, template, traces):
    scorer = StepScorer(tiny_adapter, template)
    trace = traces[0]
    steps = template.step_spans(trace.reasoning_ids)
    rows = scorer.prefix_rows(trace)
    assert len(rows) == len(steps) + 1
    for k, (row, pairs) in enumerate(rows):
        spans = template.spans(len(row))
        reasoning = row[spans.reasoning]
        visible = [t for t in reasoning if t != template.mask_id]
        assert template.split_steps(visible + [template.filler_id]) == template.split_steps(trace.reasoning_ids)[:k]
        assert all(t == template.mask_id for t in row[spans.answer])
        assert [tok for _, tok in pairs] == trace.answer_ids[: scorer.template.written_length(trace.answer_ids)]


def test_marginal_score_is_the_log_probability_read_directly(tiny_adapter, template, traces):
    scorer = StepScorer(tiny_adapter, template)
    trace = traces[1]
    scores = scorer.score([trace], self_consistency=False)[0]
    row, pairs = scorer.prefix_rows(trace)[1]
    ids, attention = template.collate([row])
    logp = tiny_adapter.logits(ids, attention).log_softmax(-1)[0]
    start = template.spans(len(row)).answer.start
    expected = sum(float(logp[start + j, tok]) for j, tok in pairs)
    assert scores.prefix_logp[1] == pytest.approx(expected, abs=1e-4)
    assert scores.step_scores == pytest.approx([b - a for a, b in zip(scores.prefix_logp, scores.prefix_logp[1:])])


def test_chain_rule_reveals_answer_tokens_one_at_a_time(tiny_adapter, template, traces):
    chain = StepScorer(tiny_adapter, template, estimator="chain")
    marginal = StepScorer(tiny_adapter, template)
    trace = traces[2]
    m = chain.template.written_length(trace.answer_ids)
    assert m >= 2  # the number and the closing brace
    rows = chain.prefix_rows(trace)
    assert len(rows) == (len(template.step_spans(trace.reasoning_ids)) + 1) * m
    for j, (row, pairs) in enumerate(rows[:m]):
        answer = row[template.spans(len(row)).answer]
        assert answer[:j] == trace.answer_ids[:j] and all(t == template.mask_id for t in answer[j:])
        assert pairs == [(j, trace.answer_ids[j])]
    # the first factor of the chain is the first marginal; the totals differ in the later factors
    first_chain = chain.read_logprobs(rows[:1])[0][0]
    first_marginal = marginal.read_logprobs(marginal.prefix_rows(trace)[:1])[0][0]
    assert first_chain == pytest.approx(first_marginal, abs=1e-5)


def test_self_consistency_reads_each_steps_result_then_its_operands_later_reasoning_masked(tiny_adapter, template, traces):
    scorer = StepScorer(tiny_adapter, template)
    trace = traces[0]
    equals = template.encode_text("=")[0]
    step_spans = template.step_spans(trace.reasoning_ids)
    rows = scorer.consistency_rows(trace)
    assert len(rows) == 2 * len(step_spans)
    for (start, end), (result_row, result_pairs), (operand_row, operand_pairs) in zip(step_spans, rows[0::2], rows[1::2]):
        eq = max(i for i in range(start, end) if trace.reasoning_ids[i] == equals)
        # result read: the step up to its '=' and everything before visible; its result and all later reasoning masked
        reasoning = result_row[template.spans(len(result_row)).reasoning]
        assert [i for i, t in enumerate(reasoning) if t == template.mask_id] == list(range(eq + 1, len(reasoning)))
        assert [tok for _, tok in result_pairs] == trace.reasoning_ids[eq + 1 : end]
        # operand read: the whole step and all later reasoning masked, read before the '='
        reasoning = operand_row[template.spans(len(operand_row)).reasoning]
        assert [i for i, t in enumerate(reasoning) if t == template.mask_id] == list(range(start, len(reasoning)))
        assert [tok for _, tok in operand_pairs] == trace.reasoning_ids[start:eq]
    scores = scorer.score([trace])[0]
    values = [sum(v) / len(v) for v in scorer.read_logprobs(rows)]
    assert scores.result_consistency == pytest.approx(values[0::2], abs=1e-5)
    assert scores.operand_consistency == pytest.approx(values[1::2], abs=1e-5)
    assert scores.self_consistency == pytest.approx([a + b for a, b in zip(values[0::2], values[1::2])], abs=1e-5)


def test_self_consistency_finds_the_equals_sign_a_bpe_tokenizer_fuses(bpe_template):
    tpl = bpe_template
    reasoning = tpl.encode_reasoning(["4 + 3 = 7.", "7 * 2 = 14"])
    assert tpl.encode_text("=")[0] not in reasoning  # ' =' is its own token
    trace = Trace(tpl.encode_question("Tom has 4 apples."), reasoning, tpl.encode_answer("14"))
    rows = StepScorer(ModelAdapter(None, tpl.tokenizer, "masked_lm", tpl.mask_id, "no-model"), tpl).consistency_rows(trace)
    read = [tpl.tokenizer.decode([tok for _, tok in pairs]) for _, pairs in rows]
    assert read == [" 7.\n", "4 + 3", " 14", "7 * 2"]  # each step's result, then its operands and operator


def test_trace_aggregates():
    s = TraceScores([-3.0, -1.0, -4.0, -0.5], [2.0, -3.0, 3.5], [-0.1, -2.0, -0.2], [-0.5, 0.0, -0.1], 1.0)
    assert s.final_score == -0.5 and s.min_step_score == -3.0
    assert s.self_consistency == pytest.approx([-0.6, -2.0, -0.3])  # the two reads of a step add up


def test_unknown_estimator_is_refused(tiny_adapter, template):
    with pytest.raises(ValueError, match="marginal"):
        StepScorer(tiny_adapter, template, estimator="rollout")


def test_reads_of_one_canvas_share_a_pass_and_score_as_they_would_alone(tiny_adapter, template, traces):
    """The answer read after k steps and the operand read of step k+1 are one canvas: one row serves both,
    and a duplicate trace costs nothing more. Every score equals the one read row by row."""
    scorer = StepScorer(tiny_adapter, template, batch_size=64)
    batch = [*traces, traces[0]]  # the last trace repeats the first
    shared = scorer.score(batch)
    for trace, scores in zip(batch, shared):
        rows = scorer.prefix_rows(trace) + scorer.consistency_rows(trace)
        alone = [scorer.read_unique([row])[0] for row in rows]  # one row per pass, nothing shared
        n = len(template.step_spans(trace.reasoning_ids))
        expected_logp = [sum(v) for v in alone[: n + 1]]
        means = [sum(v) / len(v) for v in alone[n + 1 :]]
        assert scores.prefix_logp == pytest.approx(expected_logp, abs=1e-4)
        assert scores.result_consistency == pytest.approx(means[0::2], abs=1e-4)
        assert scores.operand_consistency == pytest.approx(means[1::2], abs=1e-4)
        assert len({tuple(canvas) for canvas, _ in rows}) == 2 * n + 1  # n + 1 prefixes and 2n reads, n of them shared
    flat = [row for t in batch for row in scorer.prefix_rows(t) + scorer.consistency_rows(t)]
    distinct = sum(2 * len(template.step_spans(t.reasoning_ids)) + 1 for t in traces)
    assert len(share_canvases(flat)[0]) == distinct < len(flat)
    assert sum(s.forward_passes for s in shared) == pytest.approx(1.0)  # one batch of 64 rows holds them all
    fresh = StepScorer(tiny_adapter, template, batch_size=64)
    fresh.score(batch)
    assert fresh.stats == {"forward_passes": 1, "canvases": distinct}  # each distinct canvas read once
    assert shared[-1].forward_passes == 0 and shared[0].forward_passes > 0  # the repeat owns no pass
    assert sum(s.canvases for s in shared) == distinct and shared[-1].canvases == 0  # nor a canvas


def test_answer_consistency_reads_the_same_slots_with_the_gold_answer_visible(tiny_adapter, template, traces):
    scorer = StepScorer(tiny_adapter, template)
    trace = traces[0]
    masked, visible = scorer.consistency_rows(trace), scorer.consistency_rows(trace, answer_visible=True)
    assert len(visible) == len(masked) == 2 * len(template.step_spans(trace.reasoning_ids))
    for (masked_row, masked_pairs), (row, pairs) in zip(masked, visible):
        spans = template.spans(len(row))
        assert pairs == masked_pairs and row[spans.reasoning] == masked_row[spans.reasoning]
        assert row[spans.answer] == trace.answer_ids and all(t == template.mask_id for t in masked_row[spans.answer])
    scores = scorer.score([trace], answer_consistency=True)[0]
    means = [sum(v) / len(v) for v in scorer.read_logprobs(visible)]
    assert scores.answer_result_consistency == pytest.approx(means[0::2], abs=1e-5)
    assert scores.answer_operand_consistency == pytest.approx(means[1::2], abs=1e-5)
    assert scores.answer_consistency == pytest.approx([a + b for a, b in zip(means[0::2], means[1::2])], abs=1e-5)


def test_answer_consistency_leaves_every_other_score_and_pass_as_it_was(tiny_adapter, template, traces):
    batch = [*traces, traces[0]]
    before = StepScorer(tiny_adapter, template, batch_size=16)
    plain = before.score(batch)
    after = StepScorer(tiny_adapter, template, batch_size=16)
    with_answer = after.score(batch, answer_consistency=True)
    for a, b in zip(plain, with_answer):
        assert (a.prefix_logp, a.step_scores) == (b.prefix_logp, b.step_scores)
        assert (a.result_consistency, a.operand_consistency) == (b.result_consistency, b.operand_consistency)
        assert a.answer_result_consistency is None and len(b.answer_consistency) == len(b.step_scores)
        with pytest.raises(ValueError, match="answer_consistency=True"):
            _ = a.answer_consistency
    # the answer-visible canvases are new ones, 2 per step, read once however many traces repeat them
    new = sum(2 * len(template.step_spans(t.reasoning_ids)) for t in traces)
    assert after.stats["canvases"] == before.stats["canvases"] + new
    assert with_answer[-1].forward_passes == 0


def test_answer_consistency_scores_a_corrupted_step_below_the_clean_one(embedded_adapter):
    tpl = ReasoningTemplate(embedded_adapter.tokenizer)
    scorer = StepScorer(embedded_adapter, tpl)
    rng = random.Random(3)
    compared = 0
    for p in generate(6, seed=11, config=SyntheticConfig(2, 4)):
        for kind in ("slip_kept", "wrong_operand"):
            bad = corrupt(p, kind, rng)
            if bad is None:
                continue
            encoded = [
                Trace(tpl.encode_question(p.question), tpl.encode_reasoning(steps), tpl.encode_answer(str(p.answer)))
                for steps in (p.steps, bad.steps)
            ]
            clean, corrupted = scorer.score(encoded, answer_consistency=True)
            j = bad.first_error
            assert corrupted.answer_consistency[j] < clean.answer_consistency[j] - 1.0
            assert corrupted.answer_consistency[:j] == pytest.approx(clean.answer_consistency[:j], abs=1e-4)  # before it, the same
            compared += 1
    assert compared >= 8
