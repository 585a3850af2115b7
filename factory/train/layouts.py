"""Training layouts: which slots of a reasoning canvas a training row masks, and which of those
carry loss. Each is a small function registered by name, like the unmasking rules; the embedded
model's training job and `factory finetune` draw from the same registry, with weights by name.

A layout sees one trace on the canvas (question, steps, answer) and a random generator, and returns
`Masking(masked, loss, t)`, or None when the trace has nothing the layout can cut (the row is
redrawn). Rows with `t` set weigh each loss slot 1/t (the LLaDA SFT objective); the others weigh
each row by its realised mask ratio (see `batches.row_weights`). The masks are
functions of question, steps and answer, so most layouts apply to any trace; the few that rewrite a
step or name an earlier result need the generator's structure (`needs_problem`), which a build's
traces do not carry.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from factory.core.scoring import equals_offset
from factory.core.template import ReasoningTemplate, Spans
from factory.synthetic.problems import SyntheticProblem

EPS = 1e-3  # the smallest mask ratio t ~ U(EPS, 1)


@dataclass
class Canvas:
    """One trace laid out on the canvas, with what the layouts read of it."""

    template: ReasoningTemplate
    ids: list[int]
    reasoning: list[int]
    first_visible_error: int | None = None  # a corrupted trace's wrong step: visible, never a target
    problem: SyntheticProblem | None = None
    warmup: bool = False  # the copy warm-up: the reasoning alone is the response

    @cached_property
    def spans(self) -> Spans:
        return self.template.spans(len(self.ids))

    @cached_property
    def response(self) -> list[int]:
        """Positions a uniform mask draws from: reasoning and answer slots (reasoning only in warm-up)."""
        spans = self.spans
        positions = list(range(spans.reasoning.start, spans.reasoning.stop))
        return positions if self.warmup else positions + list(range(spans.answer.start, spans.answer.stop))

    @cached_property
    def step_spans(self) -> list[tuple[int, int]]:
        return self.template.step_spans(self.reasoning)

    def equals(self, start: int, end: int) -> int:
        """Offset of a step's '=' inside it."""
        return equals_offset(self.template, self.reasoning[start:end])

    @cached_property
    def equations(self) -> list[tuple[int, int]]:
        """The steps with an '=' (every synthetic step; a build's trace may have others): where a
        step can be cut before its result."""
        return [(start, end) for start, end in self.step_spans if self.equals(start, end) >= 0]

    def mask_from(self, visible_end: int) -> list[bool]:
        """Every response slot from `visible_end` on masked; the question and the rest visible."""
        masked = [False] * len(self.ids)
        for p in self.response:
            masked[p] = p >= visible_end
        return masked


@dataclass
class Masking:
    masked: list[bool]
    loss: list[bool]
    t: float | None = None  # the drawn mask ratio, where the loss is weighted 1/t


@dataclass(frozen=True)
class Layout:
    mask: Callable[[Canvas, random.Random], Masking | None]
    needs_problem: bool = False
    # Draws whether this row's trace gets one wrong step first (corrupted, half of answer_ahead).
    corrupts: Callable[[random.Random], bool] | None = None
    # Whether the layout can use a problem at all (far_operand needs an operand from two steps back).
    applies: Callable[[SyntheticProblem], bool] | None = None
    doc: str = field(default="", compare=False)


LAYOUTS: dict[str, Layout] = {}


def layout(name: str, **options) -> Callable:
    def register(mask: Callable[[Canvas, random.Random], Masking | None]) -> Callable:
        LAYOUTS[name] = Layout(mask, doc=(mask.__doc__ or "").strip(), **options)
        return mask

    return register


def check_mix(mix: dict[str, float], traces_only: bool = False) -> None:
    """Refuse unknown names, negative weights, an empty mix, and (on a build's traces) layouts that
    need the generator's structure, naming what is allowed."""
    unknown = sorted(set(mix) - set(LAYOUTS))
    if unknown:
        raise ValueError(f"unknown layout {unknown}; choose from {list(LAYOUTS)}")
    if any(w < 0 for w in mix.values()) or not sum(mix.values()) > 0:
        raise ValueError(f"layout weights must be >= 0 with a positive sum, got {mix}")
    if traces_only:
        structural = sorted(n for n, w in mix.items() if w > 0 and LAYOUTS[n].needs_problem)
        if structural:
            usable = [n for n, spec in LAYOUTS.items() if not spec.needs_problem]
            raise ValueError(f"layouts {structural} need a synthetic problem's structure, which a build's traces lack; use {usable}")


def mix_weights(mix: dict[str, float]) -> list[float]:
    """The mix as weights in registry order, for `random.choices` over `LAYOUTS`."""
    return [mix.get(name, 0.0) for name in LAYOUTS]


def parse_mix(items: list[str]) -> dict[str, float]:
    """`name=weight ...` from the command line."""
    mix = {}
    for item in items:
        name, sep, weight = item.partition("=")
        try:
            mix[name] = float(weight)
        except ValueError:
            raise ValueError(f"--mix takes name=weight, got {item!r}") from None
        if not sep:
            raise ValueError(f"--mix takes name=weight, got {item!r}")
    check_mix(mix)
    return mix


# ---- the layouts -------------------------------------------------------------------------------


@layout("uniform")
def uniform(c: Canvas, rng: random.Random) -> Masking:
    """Each response slot masked with probability t ~ U(EPS, 1), at least one; loss on every masked slot."""
    t = rng.uniform(EPS, 1.0)
    chosen = [p for p in c.response if rng.random() < t] or [rng.choice(c.response)]
    masked = [False] * len(c.ids)
    for p in chosen:
        masked[p] = True
    return Masking(masked, masked)


def prefix_cut(c: Canvas, rng: random.Random, k: int) -> Masking:
    """The question and the first k steps visible, every later slot masked. The token after step k
    (separator, or end filler after the last step) is visible half the time: always masked, it told
    the model the reasoning ended right after a result."""
    visible_end = c.spans.reasoning.start + (c.step_spans[k - 1][1] + rng.randint(0, 1) if k else 0)
    masked = c.mask_from(visible_end)
    return Masking(masked, masked)


def first_cut(c: Canvas) -> int:
    """The first step a prefix may end after: past a visible error, never before it."""
    return 0 if c.first_visible_error is None else c.first_visible_error + 1


@layout("prefix")
def prefix(c: Canvas, rng: random.Random) -> Masking:
    """The question and the first k gold steps visible, everything after masked: the canvas the
    answer-conditioned step scorer reads."""
    return prefix_cut(c, rng, rng.randint(first_cut(c), len(c.step_spans)))


@layout("corrupted", needs_problem=True, corrupts=lambda rng: True)
def corrupted(c: Canvas, rng: random.Random) -> Masking:
    """A prefix whose one visible step is wrong, the masked remainder (later steps and the answer)
    recomputed from the error: the answer learns to follow the reasoning. The wrong step is visible,
    never a target, so the model does not learn to slip."""
    return prefix_cut(c, rng, rng.randint(first_cut(c), len(c.step_spans)))


def result_positions(c: Canvas) -> list[int]:
    """Positions of every step's result (the tokens after its '=') and of the answer slots."""
    base, positions = c.spans.reasoning.start, []
    for start, end in c.step_spans:
        positions += range(base + start + c.equals(start, end) + 1, base + end)
    return positions + list(range(c.spans.answer.start, c.spans.answer.stop))


@layout("results")
def results(c: Canvas, rng: random.Random) -> Masking:
    """Every step's result and the answer masked, everything else visible: the arithmetic facts
    themselves, the state the self-consistency scorer reads. Under uniform masking a result is mostly
    masked together with its operands, so a model copies well long before it computes."""
    masked = [False] * len(c.ids)
    for p in result_positions(c):
        masked[p] = True
    return Masking(masked, masked)


def step_cut(c: Canvas, start: int, end: int, offset: int) -> tuple[list[bool], int, int]:
    """Step [start, end) written up to `offset`, every later slot masked: (masked, cut, step end), absolute."""
    visible_end = c.spans.reasoning.start + start + offset
    return c.mask_from(visible_end), visible_end, c.spans.reasoning.start + end


def rest_of_step(c: Canvas, masked: list[bool], cut: int, step_end: int) -> Masking:
    """Loss on the rest of the step and the token after it (the next separator, or the end filler
    where left-to-right decoding decides whether the reasoning goes on)."""
    return Masking(masked, [cut <= p <= step_end and masked[p] for p in range(len(c.ids))])


@layout("next_result")
def next_result(c: Canvas, rng: random.Random) -> Masking | None:
    """Left-to-right decoding's state at a result: step k+1 written up to its '=', the loss on that
    result and the token after it. The result cannot be copied from anywhere."""
    if not c.equations:
        return None
    start, end = rng.choice(c.equations)
    return rest_of_step(c, *step_cut(c, start, end, c.equals(start, end) + 1))


@layout("next_token")
def next_token(c: Canvas, rng: random.Random) -> Masking | None:
    """The same state at any token of a step up to its result (an operand, the operator): copying
    an earlier result is a choice decoding makes here, and no other layout trains it."""
    if not c.equations:
        return None
    start, end = rng.choice(c.equations)
    return rest_of_step(c, *step_cut(c, start, end, rng.randint(0, c.equals(start, end) + 1)))


def far_operands(problem: SyntheticProblem) -> list[tuple[int, bool]]:
    """(step, is_left) for each operand that names a result from two or more steps back: the running
    total that a "bags with N each" step interrupts, the copy a model most often gets wrong."""
    return [
        (index, is_left)
        for index, op in enumerate(problem.ops)
        for is_left, operand in ((True, op.left), (False, op.right))
        if operand.step is not None and operand.step < index - 1
    ]


@layout("far_operand", needs_problem=True, applies=lambda problem: bool(far_operands(problem)))
def far_operand(c: Canvas, rng: random.Random) -> Masking:
    """next_token's state just before an operand that names a result two or more steps back."""
    index, is_left = rng.choice(far_operands(c.problem))
    start, end = c.step_spans[index]
    return rest_of_step(c, *step_cut(c, start, end, 0 if is_left else c.equals(start, end) - 1))


@layout("answer_ahead", needs_problem=True, corrupts=lambda rng: rng.random() < 0.5)
def answer_ahead(c: Canvas, rng: random.Random) -> Masking:
    """One or two steps left to compute, the loss on the answer alone (half the rows after a visible
    wrong step): the read one-pass step scoring makes with the later steps masked."""
    prefix = prefix_cut(c, rng, max(first_cut(c), len(c.step_spans) - rng.choice((1, 1, 2))))
    answer = c.spans.answer
    return Masking(prefix.masked, [m and p >= answer.start for p, m in enumerate(prefix.masked)])


@layout("hidden_operand")
def hidden_operand(c: Canvas, rng: random.Random) -> Masking | None:
    """A step written up to its last operand token, that token and the rest masked, the loss on the
    result alone: one pass must infer the operand and compute with it."""
    equations = [(start, end) for start, end in c.equations if c.equals(start, end) >= 1]
    if not equations:
        return None
    start, end = rng.choice(equations)
    masked, cut, step_end = step_cut(c, start, end, c.equals(start, end) - 1)
    return Masking(masked, [cut + 2 <= p < step_end for p in range(len(c.ids))])


@layout("sft")
def sft(c: Canvas, rng: random.Random) -> Masking:
    """The MDLM SFT objective as LLaDA describes it: the question never masked; every response slot
    (reasoning, delimiter, answer, the filler and end slots, which LLaDA trains as padded EOS) masked
    with probability t ~ U(EPS, 1); the loss on masked slots weighted 1/t (see `batches.row_weights`)."""
    t = rng.uniform(EPS, 1.0)
    start = c.spans.reasoning.start
    masked = [start <= p and rng.random() < t for p in range(len(c.ids))]
    if not any(masked):
        masked[rng.randrange(start, len(c.ids))] = True
    return Masking(masked, masked, t)
