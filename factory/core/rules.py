"""Unmasking rules: pure functions from one step's predictions to the slots to commit.

Every rule takes a `StepView` over the decodable region of a batch ([B, R] tensors) and returns a
bool [B, R] commit mask that is a subset of `view.candidates` and holds at least one slot for every
row that still has a candidate. The sampler loop knows nothing of any one rule.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch


@dataclass(frozen=True)
class StepView:
    confidence: torch.Tensor  # [B, R] probability of the proposed token
    entropy: torch.Tensor  # [B, R] entropy (nats) of the slot's predictive distribution
    candidates: torch.Tensor  # [B, R] bool, masked slots the rule may commit
    steps_taken: torch.Tensor  # [B] forward passes this row has had before this one
    noise: torch.Tensor  # [B, R] uniform(0, 1) from each row's own generator (for random order)
    tokens: torch.Tensor | None = None  # [B, R] the proposed ids at candidates, the written ids elsewhere
    # [B, R] bool, the slot's token (proposed at a candidate, written elsewhere) opens a step's
    # result: the '=' of 'a + b = c'. None where the caller knows no step structure.
    result_mark: torch.Tensor | None = None


Rule = Callable[[StepView], torch.Tensor]


def take_top(score: torch.Tensor, candidates: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Commit the `count[b]` highest-scoring candidates of each row b."""
    score = score.masked_fill(~candidates, float("-inf"))
    order = score.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (ranks < count.unsqueeze(1)) & candidates


def at_least_one(commit: torch.Tensor, score: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Add each row's best candidate where the rule chose nothing, so every pass makes progress."""
    empty = ~commit.any(dim=1) & candidates.any(dim=1)
    best = take_top(score, candidates, torch.ones_like(score[:, 0], dtype=torch.long))
    return commit | (best & empty.unsqueeze(1))


def leftmost_first(candidates: torch.Tensor) -> torch.Tensor:
    """A score that ranks candidates by position, leftmost highest."""
    positions = torch.arange(candidates.shape[1], device=candidates.device, dtype=torch.float32)
    return -positions.expand(candidates.shape)


def left_to_right(view: StepView) -> torch.Tensor:
    """One slot per step, the leftmost masked one."""
    return take_top(leftmost_first(view.candidates), view.candidates, torch.ones_like(view.steps_taken))


def random_order(view: StepView) -> torch.Tensor:
    """One slot per step in random order: the floor any informed order should beat."""
    return take_top(view.noise, view.candidates, torch.ones_like(view.steps_taken))


def entropy_order(view: StepView) -> torch.Tensor:
    """One slot per step, the lowest-entropy one (the paper's one-token baseline)."""
    return take_top(-view.entropy, view.candidates, torch.ones_like(view.steps_taken))


def llada_low_confidence(view: StepView, steps: int | None = None, block_length: int | None = None) -> torch.Tensor:
    """LLaDA's reference sampler: semi-autoregressive blocks, `steps` passes shared equally among
    blocks, and in each pass the highest-confidence slots of the current block. Tokens per pass
    follow the linear schedule: the remaining masked count spread evenly over the remaining
    passes, the remainder front-loaded, which is what `get_num_transfer_tokens` computes."""
    region = view.candidates.shape[1]
    steps, block_length = steps or region, block_length or region
    num_blocks = -(-region // block_length)
    if steps % num_blocks:
        raise ValueError(f"steps={steps} must be a multiple of the number of blocks ({num_blocks})")
    per_block = steps // num_blocks
    block_of = torch.arange(region, device=view.candidates.device) // block_length
    masked_blocks = torch.where(view.candidates, block_of.expand_as(view.candidates), num_blocks)
    current = masked_blocks.min(dim=1).values  # [B] first block that still has masks
    in_block = view.candidates & (block_of.unsqueeze(0) == current.unsqueeze(1))
    step_in_block = (view.steps_taken - current * per_block).clamp(0, per_block - 1)
    remaining = in_block.sum(dim=1)
    count = torch.div(remaining + (per_block - step_in_block) - 1, per_block - step_in_block, rounding_mode="floor")
    commit = take_top(view.confidence, in_block, count)
    return at_least_one(commit, view.confidence, in_block)


def confidence_threshold(view: StepView, tau: float = 0.9) -> torch.Tensor:
    """Fast-dLLM: every slot whose proposed token has probability >= tau."""
    return at_least_one(view.candidates & (view.confidence >= tau), view.confidence, view.candidates)


def entropy_bounded(view: StepView, gamma: float = 1.0) -> torch.Tensor:
    """EB-sampler: the largest entropy-sorted prefix whose entropy sum minus its maximum is <= gamma."""
    ent = view.entropy.masked_fill(~view.candidates, float("inf"))
    sorted_ent, order = ent.sort(dim=1, stable=True)
    finite = torch.isfinite(sorted_ent)
    before = torch.cumsum(sorted_ent.masked_fill(~finite, 0.0), dim=1) - sorted_ent.masked_fill(~finite, 0.0)
    count = ((before <= gamma) & finite).sum(dim=1).clamp(min=1)
    return take_top(-ent, view.candidates, count)


def med(view: StepView, lam: float = 0.2, max_per_step: int | None = None) -> torch.Tensor:
    """MED as the paper states it: every slot with entropy below lam, at least the lowest one."""
    commit = at_least_one(view.candidates & (view.entropy < lam), -view.entropy, view.candidates)
    if max_per_step is not None:
        commit = take_top(-view.entropy, commit, torch.full_like(view.steps_taken, max_per_step))
    return commit


def med_prefix(view: StepView, lam: float = 0.3, max_per_step: int | None = None) -> torch.Tensor:
    """MED over the left frontier: the leftmost masked slot always, plus the masked slots after it,
    in order, while each has entropy below lam.

    Plain MED also commits confident slots far to the right whose prediction rests on reasoning
    not yet written (a later result guessed before the step that computes it); its joint error is
    small by the entropy bound only if those marginals are calibrated, and on arithmetic they are
    not. Keeping commits contiguous with the written prefix keeps left-to-right's accuracy and
    still writes copied operands, symbols, separators and trailing filler in parallel.
    """
    low = view.candidates & (view.entropy < lam)
    # A candidate qualifies if no higher-entropy candidate stands before it.
    blocked = torch.cumsum((view.candidates & ~low).int(), dim=1) > 0
    commit = low & ~blocked
    commit = at_least_one(commit, leftmost_first(view.candidates), view.candidates)
    if max_per_step is not None:
        commit = take_top(leftmost_first(commit), commit, torch.full_like(view.steps_taken, max_per_step))
    return commit


def step_prefix(view: StepView, lam: float = 0.3) -> torch.Tensor:
    """Whole steps over the left frontier: the leftmost masked slot always, then the masked slots
    after it, in order, while each has entropy below lam or repeats the token of a result written
    in this pass, up to and including the first result mark ('=') proposed in this pass.

    A step's result is a function of its operands, so it is predicted well only once they are all
    written: a result after a mark proposed in this pass waits for the next one, and the leftmost
    slot, a result whose operands are written, is taken however uncertain, with the separator and
    operands that follow it. A later copy of that result (the next operand, the answer) is guessed
    blind in the same pass; it goes in only when its proposal is the result's own token. So a pass
    writes a result and the next step's operands up to their mark; an operand that copies the
    result just written, guessed otherwise, waits one pass, the one the model needs to read it.
    """
    cand = view.candidates
    marks = view.result_mark if view.result_mark is not None else torch.zeros_like(cand)
    first = take_top(leftmost_first(cand), cand, torch.ones_like(view.steps_taken))
    ok = first | (view.entropy < lam)
    if view.tokens is not None:
        # results whose operands are written: masked slots right after a written mark
        result = torch.zeros_like(cand)
        result[:, 1:] = cand[:, 1:] & marks[:, :-1] & ~cand[:, :-1]
        same = view.tokens.unsqueeze(2) == view.tokens.unsqueeze(1)  # [B, slot, earlier slot]
        earlier = torch.ones_like(same[0]).tril(-1)
        ok |= (same & earlier & result.unsqueeze(1)).any(2)
    blocked = torch.cumsum((cand & ~ok).int(), dim=1) > 0
    fresh = (cand & marks).int()  # marks proposed in this pass
    after_fresh = torch.cumsum(fresh, dim=1) - fresh > 0
    return (cand & ok & ~blocked & ~after_fresh) | first


RULES: dict[str, Callable[..., torch.Tensor]] = {
    "left_to_right": left_to_right,
    "random": random_order,
    "entropy": entropy_order,
    "llada": llada_low_confidence,
    "threshold": confidence_threshold,
    "eb": entropy_bounded,
    "med": med,
    "med_prefix": med_prefix,
    "step_prefix": step_prefix,
}


def check_rule(rule: Rule, region: int) -> None:
    """Run a rule once on a one-row view of `region` slots, so settings that cannot work there (LLaDA
    blocks that do not divide the steps, a parameter of the wrong type) fail before a model loads."""
    half = torch.full((1, region), 0.5)
    none = torch.zeros(1, region, dtype=torch.long)
    view = StepView(half, half, torch.ones(1, region, dtype=torch.bool), torch.zeros(1, dtype=torch.long), half, none, none.bool())
    try:
        rule(view)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"does not run on the {region}-slot region: {err}") from None


def rule_defaults(name: str) -> dict:
    """A rule's parameters and their defaults, from its signature: the one place they are written."""
    if name not in RULES:
        raise ValueError(f"unknown unmasking rule {name!r}; choose from {sorted(RULES)}")
    return {p.name: p.default for p in inspect.signature(RULES[name]).parameters.values() if p.name != "view"}


def make_rule(name: str, **params) -> Rule:
    allowed = list(rule_defaults(name))
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"rule {name!r} takes no parameter {unknown}; it takes {allowed}")
    return partial(RULES[name], **params)
