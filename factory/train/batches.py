"""Training rows and batches on the reasoning canvas: a trace is drawn, a layout chosen by weight,
the canvas encoded and masked, and a batch collated with its loss weights. Rows depend only on the
generator they are given, so a fixed seed gives the same batches on any machine and after a resume."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from factory.core.template import ReasoningTemplate, TemplateError
from factory.synthetic import problems as synthetic
from factory.synthetic.problems import SyntheticProblem
from factory.train.layouts import LAYOUTS, Canvas, Masking, mix_weights

# Corruptions a training row may carry: each leaves a wrong step the model must not copy.
TRAIN_KINDS = ("slip_recomputed", "wrong_operand", "wrong_operation")


@dataclass(frozen=True)
class Example:
    """A trace to lay out: question, steps, answer; `problem` where the generator made it."""

    question: str
    steps: list[str]
    answer: str
    problem: SyntheticProblem | None = None


Draw = Callable[[random.Random], Example]
Row = tuple[list[int], Masking]


def make_row(template: ReasoningTemplate, rng: random.Random, draw: Draw, weights: list[float], warmup: bool = False) -> Row:
    """One canvas and its masking. A draw the layout cannot use (no far operand, no valid corruption,
    a trace that does not fit the canvas, nothing to cut) is redrawn. Warm-up rows take the uniform
    layout over the reasoning alone."""
    names = list(LAYOUTS)
    while True:
        example = draw(rng)
        name = "uniform" if warmup else rng.choices(names, weights=weights)[0]
        spec = LAYOUTS[name]
        if spec.applies is not None and not spec.applies(example.problem):
            continue
        steps, answer, first_visible_error = example.steps, example.answer, None
        if spec.corrupts is not None and spec.corrupts(rng):
            trace = synthetic.corrupt(example.problem, rng.choice(TRAIN_KINDS), rng)
            if trace is None or trace.answer < 0:
                continue
            steps, answer, first_visible_error = trace.steps, str(trace.answer), trace.first_error
        try:
            question = template.encode_question(example.question)
            reasoning = template.encode_reasoning(steps)
            answer_ids = template.encode_answer(str(answer))
        except TemplateError:
            continue
        ids = template.canvas(question, reasoning, answer_ids)
        canvas = Canvas(template, ids, reasoning, first_visible_error, example.problem, warmup)
        masking = spec.mask(canvas, rng)
        if masking is not None:
            return ids, masking


def response_slots(template: ReasoningTemplate) -> int:
    return template.config.reasoning_slots + template.config.answer_slots


def collate(template: ReasoningTemplate, rows: list[Row], warmup: bool = False, filler_weight: float = 1.0):
    """(inputs, attention, targets, masked, weights) for a batch; the loss is
    sum(CE * weights over masked slots) / (batch * response_slots).

    Row weights: a row with a drawn t weighs each loss slot 1/t, normalised by its response length
    (LLaDA's SFT loss). Any other row weighs each loss slot by 1/(its realised mask ratio), so every
    row contributes its mean masked-slot loss (with the drawn t, a row with t near EPS weighed up to
    1000x the others and, after clipping, a batch learned from a handful of tokens); its masked filler
    slots share the weight of `filler_weight` slots, since counted one by one they are most targets
    of a short trace and crowd out the operands. Warm-up weighs every masked non-filler slot alike."""
    ids, attention = template.collate([r[0] for r in rows])
    size, length = ids.shape
    masked = torch.zeros_like(ids, dtype=torch.bool)
    loss = torch.zeros_like(masked)
    drawn_t = torch.zeros(size)
    for i, (row, masking) in enumerate(rows):
        masked[i, length - len(row) :] = torch.tensor(masking.masked)
        loss[i, length - len(row) :] = torch.tensor(masking.loss)
        drawn_t[i] = masking.t or 0.0
    n_response = response_slots(template)
    weights = (n_response / loss.sum(1).clamp(min=1).float()).unsqueeze(1).expand(ids.shape).clone()
    weights = torch.where(loss, weights, 0.0)
    filler = loss & (ids == template.filler_id)
    filler_count = filler.sum(1, keepdim=True).clamp(min=1).float()
    weights = torch.where(filler, weights * filler_weight / filler_count, weights)
    has_t = drawn_t > 0
    if has_t.any():
        sft_length = length - template.spans(length).reasoning.start  # reasoning through the end token
        sft = (n_response / (sft_length * drawn_t.clamp(min=1e-9))).unsqueeze(1).expand(ids.shape)
        weights = torch.where(has_t.unsqueeze(1), torch.where(loss, sft, 0.0), weights)
    if warmup:
        content = masked & ~filler
        weights = torch.where(content, n_response * size / content.sum().clamp(min=1).float(), 0.0)
    inputs = ids.masked_fill(masked, template.mask_id)
    return inputs, attention, ids, masked, weights


def masked_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, weights: torch.Tensor, n_response: int):
    """The weighted cross-entropy of a collated batch (see `collate`)."""
    ce = torch.nn.functional.cross_entropy(logits[masked].float(), targets[masked], reduction="none")
    return (ce * weights[masked]).sum() / (targets.shape[0] * n_response)


class SyntheticBatches:
    """The embedded model's own objective: batches of generated problems, rows depending only on
    (seed, step); a copy warm-up grows the problems from one step, and drill batches pack one step of
    several problems under a short question, results masked."""

    def __init__(
        self, template: ReasoningTemplate, seed: int, mix: dict[str, float], step_weights: list[float], filler_weight: float = 1.0
    ):
        self.template, self.seed, self.weights, self.step_weights = template, seed, mix_weights(mix), step_weights
        self.filler_weight = filler_weight
        self.config = synthetic.SyntheticConfig(1, 6)

    def _problem(self, rng: random.Random, max_steps: int | None) -> synthetic.SyntheticProblem:
        """A problem of 1..max_steps steps in the copy warm-up, else drawn by the step weights."""
        steps = rng.randint(1, max_steps) if max_steps else rng.choices(range(1, 7), weights=self.step_weights)[0]
        return synthetic.make_problem(rng, steps, self.config)

    def example(self, rng: random.Random, max_steps: int | None) -> Example:
        problem = self._problem(rng, max_steps)
        return Example(problem.question, problem.steps, str(problem.answer), problem)

    def row(self, rng: random.Random, warmup_max_steps: int | None = None) -> Row:
        """One canvas and its masking, the layout drawn by the mix (uniform over the reasoning in warm-up)."""
        warmup = warmup_max_steps is not None
        return make_row(self.template, rng, lambda rng: self.example(rng, warmup_max_steps), self.weights, warmup)

    def drill_row(self, rng: random.Random) -> Row:
        """Arithmetic drill: one step from each of several problems packed into one reasoning region
        under a short question, results masked: many facts in a row shorter than a problem's. One
        step per problem, so no visible step names another's result."""
        tpl, steps = self.template, []
        question = tpl.encode_question("How many" + self._problem(rng, None).question.split("How many")[-1])
        for _ in range(12):  # keep adding steps while they fit
            candidate = [*steps, rng.choice(self._problem(rng, None).steps)]
            try:
                tpl.encode_reasoning(candidate)
            except TemplateError:
                continue
            steps = candidate
        reasoning = tpl.encode_reasoning(steps)
        ids = tpl.canvas(question, reasoning, tpl.encode_answer(steps[-1].split(" = ")[1]))
        masked = LAYOUTS["results"].mask(Canvas(tpl, ids, reasoning), rng).masked
        return ids, Masking(masked, masked)

    def batch(self, step: int, size: int, warmup_max_steps: int | None = None, drill: bool = False):
        rng = random.Random(f"train:{self.seed}:{step}")
        warmup = warmup_max_steps is not None

        rows = [self.drill_row(rng) if drill else self.row(rng, warmup_max_steps) for _ in range(size)]
        return collate(self.template, rows, warmup, self.filler_weight)
