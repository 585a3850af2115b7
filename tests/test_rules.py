import pytest
import torch

from factory.core.rules import RULES, StepView, make_rule


def view(confidence=None, entropy=None, candidates=None, steps_taken=0, noise=None):
    ref = confidence if confidence is not None else entropy
    ref = torch.tensor(ref, dtype=torch.float32)
    ref = ref if ref.dim() == 2 else ref.unsqueeze(0)
    cand = torch.ones_like(ref, dtype=torch.bool) if candidates is None else torch.tensor(candidates).reshape(ref.shape)
    as_t = lambda x, fill: torch.full_like(ref, fill) if x is None else torch.tensor(x, dtype=torch.float32).reshape(ref.shape)  # noqa: E731
    return StepView(as_t(confidence, 0.5), as_t(entropy, 1.0), cand, torch.full((ref.shape[0],), steps_taken), as_t(noise, 0.5))


def committed(mask):
    return mask.nonzero()[:, -1].tolist()


def test_left_to_right_takes_the_leftmost_masked_slot():
    assert committed(RULES["left_to_right"](view(confidence=[0.1, 0.9, 0.9], candidates=[False, True, True]))) == [1]


def test_llada_low_confidence_follows_blocks_and_linear_schedule():
    """Hand-checked: 8 slots, 2 blocks of 4, 4 steps -> 2 steps per block, 2 tokens per step,
    chosen by confidence inside the current block only (slots 4 and 5 are more confident but wait)."""
    rule = make_rule("llada", steps=4, block_length=4)
    conf = [0.1, 0.9, 0.5, 0.8, 0.99, 0.99, 0.2, 0.3]
    cand = [True] * 8
    assert committed(rule(view(confidence=conf, candidates=cand, steps_taken=0))) == [1, 3]
    cand = [True, False, True, False] + [True] * 4
    assert committed(rule(view(confidence=conf, candidates=cand, steps_taken=1))) == [0, 2]
    cand = [False] * 4 + [True] * 4
    assert committed(rule(view(confidence=conf, candidates=cand, steps_taken=2))) == [4, 5]


@pytest.mark.parametrize("masked,steps,expected", [(5, 2, [3, 2]), (10, 4, [3, 3, 2, 2]), (4, 4, [1, 1, 1, 1])])
def test_llada_schedule_matches_reference_remainder_first(masked, steps, expected):
    """LLaDA's get_num_transfer_tokens: masked // steps each, the remainder added to the first steps."""
    rule = make_rule("llada", steps=steps, block_length=masked)
    cand, counts = [True] * masked, []
    for step in range(steps):
        commit = rule(view(confidence=[0.5] * masked, candidates=cand, steps_taken=step))
        counts.append(len(committed(commit)))
        cand = [c and not m for c, m in zip(cand, commit[0].tolist())]
    assert counts == expected


def test_threshold_commits_confident_slots_or_the_best_one():
    rule = make_rule("threshold", tau=0.9)
    assert committed(rule(view(confidence=[0.95, 0.5, 0.91]))) == [0, 2]
    assert committed(rule(view(confidence=[0.3, 0.6, 0.5]))) == [1]


def test_eb_takes_the_largest_entropy_sorted_prefix_within_budget():
    # sorted entropies 0.1, 0.2, 0.3, 0.9: prefix sums minus max = 0, 0.1, 0.3, 0.6
    rule = make_rule("eb", gamma=0.35)
    assert committed(rule(view(entropy=[0.9, 0.2, 0.1, 0.3]))) == [1, 2, 3]
    assert committed(make_rule("eb", gamma=0.0)(view(entropy=[0.9, 0.2, 0.1, 0.3]))) == [2]


def test_med_commits_low_entropy_slots_with_optional_cap():
    assert committed(make_rule("med", lam=0.25)(view(entropy=[0.1, 0.5, 0.2, 0.05]))) == [0, 2, 3]
    assert committed(make_rule("med", lam=0.25, max_per_step=2)(view(entropy=[0.1, 0.5, 0.2, 0.05]))) == [0, 3]
    assert committed(make_rule("med", lam=0.01)(view(entropy=[0.1, 0.5, 0.2, 0.05]))) == [3]


def test_med_prefix_stays_contiguous_with_the_written_text():
    rule = make_rule("med_prefix", lam=0.25)
    # slot 0 is written; 1,2 are confident; 3 is not; 4 is confident but lies beyond it
    v = view(entropy=[0.0, 0.1, 0.2, 0.9, 0.01], candidates=[False, True, True, True, True])
    assert committed(rule(v)) == [1, 2]
    # an uncertain leftmost slot is still decoded alone
    assert committed(rule(view(entropy=[0.9, 0.01, 0.01]))) == [0]


@pytest.mark.parametrize(
    "name,params",
    [
        ("left_to_right", {}),
        ("random", {}),
        ("entropy", {}),
        ("llada", {"steps": 4, "block_length": 2}),
        ("threshold", {"tau": 0.99}),
        ("eb", {"gamma": 0.0}),
        ("med", {"lam": 0.0}),
        ("med_prefix", {"lam": 0.0}),
        ("step_prefix", {"lam": 0.0}),
        ("step_prefix", {"lam": 1.5}),
    ],
)
def test_every_rule_commits_within_candidates_and_at_least_one_per_unfinished_row(name, params):
    torch.manual_seed(0)
    conf, ent, noise = torch.rand(5, 4), torch.rand(5, 4) * 3, torch.rand(5, 4)
    cand = torch.rand(5, 4) > 0.4
    cand[0] = False  # a finished row gets nothing
    commit = make_rule(name, **params)(StepView(conf, ent, cand, torch.zeros(5, dtype=torch.long), noise))
    assert not (commit & ~cand).any()
    assert (commit.sum(1) >= 1).tolist() == cand.any(1).tolist()


# step_prefix: token ids of a toy vocabulary; EQ is the result mark, SEP the step separator
EQ, SEP, PLUS, FILL = 1, 2, 3, 4


def step_view(tokens, entropy, candidates):
    tokens = torch.tensor([tokens])
    v = view(entropy=entropy, candidates=candidates)
    return StepView(v.confidence, v.entropy, v.candidates, v.steps_taken, v.noise, tokens, tokens == EQ)


def test_step_prefix_writes_operands_up_to_the_mark_and_the_result_next_pass():
    rule = make_rule("step_prefix", lam=0.5)
    # '12 + 7 = 19 \n': everything confident, but the result follows a mark proposed in this pass
    tokens, low = [12, PLUS, 7, EQ, 19, SEP], [0.0] * 6
    assert committed(rule(step_view(tokens, low, [True] * 6))) == [0, 1, 2, 3]
    # next pass: the mark is written, so the result goes, however uncertain, with the separator
    # and the next step's operands up to its own mark; that step's result waits again
    tokens = [12, PLUS, 7, EQ, 19, SEP, 5, PLUS, 6, EQ, 11, SEP]
    entropy = [0.0] * 4 + [2.0] + [0.0] * 7
    assert committed(rule(step_view(tokens, entropy, [False] * 4 + [True] * 8))) == [4, 5, 6, 7, 8, 9]


def test_step_prefix_takes_a_copy_of_the_result_only_when_it_agrees():
    rule = make_rule("step_prefix", lam=0.5)
    written = [False] * 4 + [True] * 6  # '12 + 7 =' written; '19 \n 19 + 5 =' proposed
    # the uncertain copy proposes the result's own token: the pass goes on to the next mark
    agree = [12, PLUS, 7, EQ, 19, SEP, 19, PLUS, 5, EQ]
    entropy = [0.0] * 4 + [0.4, 0.0, 3.0, 0.0, 0.0, 0.0]
    assert committed(rule(step_view(agree, entropy, written))) == [4, 5, 6, 7, 8, 9]
    # a blind guess of another value stops the pass before it
    guess = [12, PLUS, 7, EQ, 19, SEP, 23, PLUS, 5, EQ]
    assert committed(rule(step_view(guess, entropy, written))) == [4, 5]
    # a confident slot that is not a result does not license copies of itself
    assert committed(rule(step_view([5, PLUS, 5, EQ], [0.0, 0.0, 3.0, 0.0], [True] * 4))) == [0, 1]


def test_step_prefix_without_marks_or_tokens_is_an_entropy_frontier():
    rule = make_rule("step_prefix", lam=0.5)
    # the leftmost slot goes however uncertain, then the frontier while below lam
    assert committed(rule(view(entropy=[2.0, 0.1, 0.2, 0.9, 0.0]))) == [0, 1, 2]
    tokens = [FILL] * 5
    assert committed(rule(step_view(tokens, [0.9, 0.1, 0.6, 0.1, 0.0], [False, True, True, True, True]))) == [1]


def test_step_prefix_rows_are_independent():
    rule = make_rule("step_prefix", lam=0.5)
    tokens = torch.tensor([[12, PLUS, 7, EQ, 19, SEP], [12, PLUS, 7, EQ, 19, SEP]])
    entropy = torch.zeros(2, 6)
    candidates = torch.tensor([[True] * 6, [False] * 4 + [True] * 2])
    v = StepView(entropy, entropy, candidates, torch.zeros(2, dtype=torch.long), entropy, tokens, tokens == EQ)
    assert rule(v).tolist() == [[True] * 4 + [False] * 2, [False] * 4 + [True] * 2]


def test_step_prefix_keeps_the_contract_with_tokens_and_marks():
    torch.manual_seed(1)
    rule = make_rule("step_prefix", lam=0.5)
    for _ in range(50):
        tokens = torch.randint(0, 5, (6, 12))
        cand = torch.rand(6, 12) > 0.3
        cand[0] = False
        v = StepView(torch.rand(6, 12), torch.rand(6, 12), cand, torch.zeros(6, dtype=torch.long), torch.rand(6, 12), tokens, tokens == EQ)
        commit = rule(v)
        assert not (commit & ~cand).any()
        assert (commit.sum(1) >= 1).tolist() == cand.any(1).tolist()
        # the committed slots are a run of the row's candidates from its leftmost one
        for row, c in zip(commit, cand):
            picked, masked = row.nonzero().squeeze(1).tolist(), c.nonzero().squeeze(1).tolist()
            assert picked == masked[: len(picked)]


def test_unknown_rule_names_the_choices():
    with pytest.raises(ValueError, match="med_prefix"):
        make_rule("nope")


def test_unknown_rule_parameter_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"takes \['lam', 'max_per_step'\]"):
        make_rule("med", tau=0.9)
