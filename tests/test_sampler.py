import pytest
import torch

from factory.core.sampler import CanvasSampler, Request, SamplerConfig, gumbel_argmax
from factory.synthetic.problems import SyntheticConfig, generate

QUESTIONS = [p.question for p in generate(5, seed=4, config=SyntheticConfig(1, 6))]


def sampler(adapter, template, **kw):
    return CanvasSampler(adapter, template, SamplerConfig(**kw))


@pytest.mark.parametrize(
    "rule,params", [("left_to_right", {}), ("med_prefix", {"lam": 2.0}), ("eb", {"gamma": 1.0}), ("step_prefix", {"lam": 2.0})]
)
def test_greedy_row_is_identical_alone_or_in_a_mixed_length_batch(tiny_adapter, template, rule, params):
    lengths = {len(template.encode_question(q)) for q in QUESTIONS}
    assert len(lengths) > 1  # the batch really mixes prompt lengths
    together = sampler(tiny_adapter, template, rule=rule, rule_params=params, batch_size=8).generate(QUESTIONS)
    for i, q in enumerate(QUESTIONS):
        alone = sampler(tiny_adapter, template, rule=rule, rule_params=params, batch_size=1).generate([q])[0]
        assert alone.reasoning_ids == together[i].reasoning_ids and alone.answer_ids == together[i].answer_ids
        assert alone.nfe == together[i].nfe


@pytest.mark.parametrize("which", ["template", "bpe_template"])
def test_result_marks_are_the_tokens_that_open_a_result(tiny_adapter, which, request):
    """'=' found by text, so a BPE tokenizer's fused ' =' counts, as the scorer finds it."""
    tpl = request.getfixturevalue(which)
    ids = tpl.encode_text("12 + 7 = 19\n19 * 2 = 38")
    marks = CanvasSampler(tiny_adapter, tpl).result_marks(torch.tensor([ids, ids[::-1]]))
    assert marks[0].tolist() == ["=" in tpl.token_text(t) for t in ids] and sum(marks[0].tolist()) == 2
    assert marks[1].tolist() == marks[0].tolist()[::-1]


def test_the_rule_sees_the_tokens_it_commits_and_their_marks(tiny_adapter, template):
    run = sampler(tiny_adapter, template, rule="step_prefix", rule_params={"lam": 2.0}, batch_size=1)
    seen, rule = [], run.rule
    run.rule = lambda v: seen.append((v, rule(v))) or seen[-1][1]
    result = run.generate(QUESTIONS[:1])[0]
    final = torch.tensor([result.reasoning_ids + result.answer_ids])
    assert len(seen) == result.nfe and seen[0][0].candidates.all()
    for v, commit in seen:
        assert torch.equal(v.tokens[~v.candidates], final[~v.candidates])  # written slots: their ids
        assert torch.equal(v.tokens[commit], final[commit])  # proposals: what the pass writes
        assert torch.equal(v.result_mark, run.result_marks(v.tokens))


def test_posterior_never_alters_the_clamped_answer(tiny_adapter, template):
    answers = ["17", "1234", "0", "5", "42"]
    results = sampler(tiny_adapter, template, temperature=1.0, batch_size=3).posterior(QUESTIONS, answers, k=2, seed=3)
    assert [r.key for r in results] == [(i, j) for i in range(5) for j in range(2)]
    for r in results:
        assert r.answer_ids == template.encode_answer(answers[r.key[0]])
        assert template.mask_id not in r.reasoning_ids
    # the k samples of one problem differ (own generators), and a rerun reproduces them
    assert results[0].reasoning_ids != results[1].reasoning_ids
    again = sampler(tiny_adapter, template, temperature=1.0, batch_size=5).posterior(QUESTIONS, answers, k=2, seed=3)
    assert [r.reasoning_ids for r in again] == [r.reasoning_ids for r in results]


def test_nfe_is_counted_per_row_and_rows_finish_on_their_own(tiny_adapter, template):
    one = sampler(tiny_adapter, template, rule="left_to_right").generate(QUESTIONS[:2])
    slots = template.config.reasoning_slots + template.config.answer_slots
    assert [r.nfe for r in one] == [slots, slots]
    # threshold 0 commits everything at once: one pass per row
    fast = sampler(tiny_adapter, template, rule="threshold", rule_params={"tau": 0.0}).generate(QUESTIONS)
    assert [r.nfe for r in fast] == [1] * len(QUESTIONS)


def test_early_exit_writes_the_answer_and_the_rest_in_one_pass(tiny_adapter, template):
    exit_now = sampler(tiny_adapter, template, rule="left_to_right", early_exit_gamma=float("inf")).generate(QUESTIONS[:3])
    assert all(r.exited_early and r.nfe == 1 for r in exit_now)
    assert all(template.mask_id not in r.reasoning_ids + r.answer_ids for r in exit_now)
    answer_only = sampler(tiny_adapter, template, rule="left_to_right", early_exit_gamma=float("inf"), exit_fill="answer").generate(
        QUESTIONS[:1]
    )[0]
    assert template.mask_id not in answer_only.answer_ids and template.mask_id in answer_only.reasoning_ids


def test_continuous_and_static_batching_agree_at_temperature_zero(tiny_adapter, template):
    kw = dict(rule="med_prefix", rule_params={"lam": 1.5}, batch_size=2, early_exit_gamma=3.0)
    cont = sampler(tiny_adapter, template, continuous=True, **kw).generate(QUESTIONS)
    static = sampler(tiny_adapter, template, continuous=False, **kw).generate(QUESTIONS)
    assert [(r.reasoning_ids, r.answer_ids, r.nfe) for r in cont] == [(r.reasoning_ids, r.answer_ids, r.nfe) for r in static]


def test_requests_keep_their_keys_in_order(tiny_adapter, template):
    q = template.encode_question(QUESTIONS[0])
    out = sampler(tiny_adapter, template, batch_size=2).run([Request(q, key=k) for k in "abc"])
    assert [r.key for r in out] == ["a", "b", "c"]


def test_gumbel_sampling_follows_the_distribution_and_top_k():
    logits = torch.log(torch.tensor([[[0.7, 0.2, 0.1]]])).repeat(1, 4000, 1)
    gens = [torch.Generator().manual_seed(0)]
    draws = gumbel_argmax(logits, 1.0, gens)
    freq = torch.bincount(draws.flatten(), minlength=3).float() / draws.numel()
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)
    assert set(gumbel_argmax(logits, 1.0, gens, top_k=2).unique().tolist()) == {0, 1}
    assert set(gumbel_argmax(logits, 1.0, gens, top_p=0.6).unique().tolist()) == {0}
    assert gumbel_argmax(logits, 0.0, gens).unique().tolist() == [0]


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="unknown unmasking rule"):
        SamplerConfig(rule="fastest")
    with pytest.raises(ValueError, match="exit_fill"):
        SamplerConfig(exit_fill="some")


def test_grouping_by_length_changes_no_row_and_pads_less(tiny_adapter, template):
    """Requests are admitted shortest first and each pass leaves out the columns every active row pads:
    the same rows (temperature 0.7, own generators), fewer pad tokens in the passes."""
    short = [p.question for p in generate(12, seed=8, config=SyntheticConfig(1, 1))]
    long = [p.question for p in generate(4, seed=8, config=SyntheticConfig(6, 6))]
    questions = [q for pair in zip(short[::3], long) for q in pair] + short  # long questions scattered among short ones
    runs = {}
    for grouped in (False, True):
        run = sampler(tiny_adapter, template, temperature=0.7, batch_size=4, group_by_length=grouped)
        runs[grouped] = (run.generate(questions, k=2, seed=11), run.stats["pad_tokens"] / run.stats["tokens"])
    (plain, plain_pad), (grouped, grouped_pad) = runs[False], runs[True]
    assert [(r.key, r.reasoning_ids, r.answer_ids, r.nfe) for r in grouped] == [
        (r.key, r.reasoning_ids, r.answer_ids, r.nfe) for r in plain
    ]
    assert grouped_pad < 0.5 * plain_pad
