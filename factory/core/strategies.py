"""Sampling strategies: how a problem's next traces are drafted, from what its earlier ones showed.

A build works a problem in rounds until it has `target` distinct accepted traces or its pass budget
is spent. Each round a strategy looks at the problem's attempts so far and drafts the next canvases:
whether the gold answer is clamped, and which reasoning slots are already written. Strategies are
pure functions `(Attempts) -> list[Draft]`, registered by name like the unmasking rules; the build
turns drafts into seeded sampler requests and counts every pass they spend.

Repair keeps what a failed trace got right: the steps before its first bad one stay token for token
(or before an earlier step, once that draft was tried), the rest of the reasoning is masked again, and
the model infills it with the gold answer clamped.
An autoregressive sampler cannot rewrite the middle of a trace with both ends fixed; an MDLM can.
Where the first bad step is depends on a locator (`LOCATORS`): the calculator, or the step labels.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from factory.core.checks import false_equation, final_number


@dataclass(frozen=True)
class Attempt:
    """One trace already made for the problem, as a strategy sees it."""

    round: int
    accepted: bool
    duplicate: bool  # repeats an earlier trace of the problem
    bad_step: int | None  # the first bad step the locators found; None when none was found
    step_starts: tuple[int, ...]  # token offset of each step in the reasoning region
    reasoning_ids: tuple[int, ...]
    # The reasoning up to the bad step's '=' and the result a calculator computes there, when the
    # bad step's last equation is false: a slip fixed, the rest to be written again.
    calculated: tuple[int, ...] | None = None
    prefix: tuple[int, ...] = ()  # the tokens it was drafted with (a repair's kept prefix)


@dataclass(frozen=True)
class Attempts:
    """A problem's state at the start of a round."""

    round: int
    wanted: int  # distinct accepted traces still missing
    history: tuple[Attempt, ...] = ()


@dataclass(frozen=True)
class Draft:
    """A canvas to sample: the gold answer clamped or not, and the reasoning tokens kept from an
    earlier trace (the rest of the region is masked). `repaired_from_step` names the first step
    rewritten when it repairs a trace."""

    clamped: bool
    prefix: tuple[int, ...] = ()
    repaired_from_step: int | None = None


Strategy = Callable[[Attempts], list[Draft]]
STRATEGIES: dict[str, Callable[..., list[Draft]]] = {}


def strategy(fn):
    STRATEGIES[fn.__name__] = fn
    return fn


@strategy
def prior(state: Attempts, rounds: int | None = None) -> list[Draft]:
    """Answer masked; a trace is kept when it reaches the gold answer by itself: rejection sampling.
    `rounds: 1` with `target: k` is fixed-k sampling (k traces, whatever they give)."""
    return [Draft(clamped=False)] * state.wanted if rounds is None or state.round < rounds else []


@strategy
def posterior(state: Attempts, rounds: int | None = None) -> list[Draft]:
    """Gold answer clamped, the model infills the reasoning (the seed paper's posterior traces).
    `rounds: 1` with `target: k` is the fixed k of builds before budgets."""
    return [Draft(clamped=True)] * state.wanted if rounds is None or state.round < rounds else []


@strategy
def prior_then_posterior(state: Attempts, prior_rounds: int = 1) -> list[Draft]:
    """Rejection sampling first; the answer is clamped only for what it has not solved in
    `prior_rounds` rounds (STaR's rationalization, spent only where the model fails)."""
    return [Draft(clamped=state.round >= prior_rounds)] * state.wanted


@strategy
def repair(state: Attempts, start: str = "posterior", calculate: bool = True) -> list[Draft]:
    """The first round samples from `start` (posterior or prior); every later round repairs failed
    traces with the answer clamped, newest first: a trace is remasked from its first bad step, and when
    that draft was already tried (the model, shown the same prefix, tends to write the same trace
    again) from the step before, and so on back to the question: each prefix is drafted once. Where
    nothing is left to repair, it samples afresh (clamped).
    `calculate`: where the bad step is a false equation, its first draft keeps the step's operands and
    writes the calculator's result, so only what follows is new."""
    if start not in ("posterior", "prior"):
        raise ValueError(f"repair: start must be 'posterior' or 'prior', got {start!r}")
    if state.round == 0:
        return [Draft(clamped=start == "posterior")] * state.wanted
    tried = {a.prefix for a in state.history}
    drafts: list[Draft] = []
    for attempt in reversed(state.history):
        if len(drafts) == state.wanted:
            break
        if attempt.accepted or attempt.duplicate or attempt.bad_step is None:
            continue
        draft = next((d for d in repairs(attempt, calculate) if d.prefix not in tried), None)
        if draft is not None:
            drafts.append(draft)
            tried.add(draft.prefix)
    return drafts + [Draft(clamped=True)] * (state.wanted - len(drafts))


def repairs(attempt: Attempt, calculate: bool) -> list[Draft]:
    """The attempt's repair drafts in the order to try them: the calculator's fix of the bad step,
    then the attempt remasked from the bad step, then from each step before it."""
    out = [Draft(True, attempt.calculated, attempt.bad_step)] if calculate and attempt.calculated is not None else []
    return out + [Draft(True, attempt.reasoning_ids[: attempt.step_starts[k]], k) for k in range(attempt.bad_step, -1, -1)]


def strategy_defaults(name: str) -> dict:
    """A strategy's parameters and their defaults, from its signature."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown sampling strategy {name!r}; choose from {sorted(STRATEGIES)}")
    return {p.name: p.default for p in inspect.signature(STRATEGIES[name]).parameters.values() if p.name != "state"}


def make_strategy(name: str, **params) -> Strategy:
    allowed = list(strategy_defaults(name))
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"strategy {name!r} takes no parameter {unknown}; it takes {allowed}")
    made = partial(STRATEGIES[name], **params)
    made(Attempts(round=0, wanted=1))  # bad parameter values fail here, before any compute
    return made


# ---- locating a trace's first bad step --------------------------------------------------------


def calculator(steps: list[str], gold_answer: str, labels: list[bool]) -> int | None:
    """The first step with a false equation; else the last step when it misses the gold answer."""
    bad = next((i for i, step in enumerate(steps) if false_equation([step])), None)
    if bad is None and steps and final_number(steps) != int(gold_answer):
        bad = len(steps) - 1
    return bad


def step_labels(steps: list[str], gold_answer: str, labels: list[bool]) -> int | None:
    """The first step the PRM labels call bad (a low self-consistency score, a false equation, or the
    gold answer missed: `checks.step_labels`); they also see a true equation over the wrong operands."""
    return next((i for i, good in enumerate(labels) if not good), None)


LOCATORS: dict[str, Callable[[list[str], str, list[bool]], int | None]] = {"calculator": calculator, "step_labels": step_labels}


def first_bad_step(locators: tuple[str, ...], steps: list[str], gold_answer: str, labels: list[bool]) -> int | None:
    """The earliest bad step any of the locators finds, or None."""
    found = [i for name in locators if (i := LOCATORS[name](steps, gold_answer, labels)) is not None]
    return min(found, default=None)


def split_budget(left: int, drafts: int) -> list[int]:
    """Each of a round's drafts gets an equal share of what is left (the first ones the remainder),
    as its pass cap; drafts beyond one pass each are dropped."""
    n = min(drafts, left)
    return [left // n + (1 if i < left % n else 0) for i in range(n)] if n > 0 else []
