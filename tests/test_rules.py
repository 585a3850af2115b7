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


def test_unknown_rule_names_the_choices():
    with pytest.raises(ValueError, match="med_prefix"):
        make_rule("nope")


def test_unknown_rule_parameter_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"takes \['lam', 'max_per_step'\]"):
        make_rule("med", tau=0.9)
