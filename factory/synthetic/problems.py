"""Seeded generator of grade-school word problems with multi-step arithmetic.

A problem is a small program: a chain of binary operations whose operands are either numbers
stated in the question or results of earlier steps. The question text and the gold steps are
both rendered from that program, so a trace can be corrupted at one step and the later steps
recomputed from the error (what the scoring benchmark and the training mix need).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field, replace

from factory.schemas.records import Problem

SOURCE_NAME = "synthetic"

NAMES = ("Tom", "Ann", "Sam", "Lily", "Ben", "Mia", "Max", "Zoe", "Leo", "Eva", "Jack", "Nora")
HE_SHE = {"Tom": "He", "Sam": "He", "Ben": "He", "Max": "He", "Leo": "He", "Jack": "He"}
ITEMS = ("apples", "marbles", "stickers", "books", "coins", "cards", "pencils", "shells", "stamps", "cookies")
FRIENDS = ("a friend", "his sister", "her brother", "a neighbor", "the teacher")
SYMBOLS = ("+", "-", "*", "/")


@dataclass(frozen=True)
class Operand:
    """A literal from the question (`step is None`) or the result of an earlier step."""

    value: int
    step: int | None = None


@dataclass(frozen=True)
class Operation:
    symbol: str
    left: Operand
    right: Operand


def apply(symbol: str, left: int, right: int) -> int | None:
    """Integer arithmetic; None when the result is not a non-negative integer."""
    if symbol == "+":
        return left + right
    if symbol == "-":
        return left - right if left >= right else None
    if symbol == "*":
        return left * right
    if symbol == "/":
        return left // right if right and left % right == 0 else None
    raise ValueError(f"unknown operation {symbol!r}")


def evaluate(ops: tuple[Operation, ...], forced: dict[int, int] | None = None) -> list[int] | None:
    """Results of each step, resolving references to earlier results; None if any step is invalid.

    `forced` pins some steps' results (a slip), and later steps compute from the pinned value.
    """
    forced = forced or {}
    results: list[int] = []
    for index, op in enumerate(ops):
        left = results[op.left.step] if op.left.step is not None else op.left.value
        right = results[op.right.step] if op.right.step is not None else op.right.value
        value = forced.get(index, apply(op.symbol, left, right))
        if value is None:
            return None
        results.append(value)
    return results


def render_steps(ops: tuple[Operation, ...], results: list[int]) -> list[str]:
    steps = []
    for op, result in zip(ops, results):
        left = results[op.left.step] if op.left.step is not None else op.left.value
        right = results[op.right.step] if op.right.step is not None else op.right.value
        steps.append(f"{left} {op.symbol} {right} = {result}")
    return steps


@dataclass(frozen=True)
class SyntheticConfig:
    """Difficulty knobs. Defaults keep every value below 1000 (one token each)."""

    min_steps: int = 2
    max_steps: int = 4
    max_value: int = 100
    operations: tuple[str, ...] = SYMBOLS

    def __post_init__(self):
        if not 1 <= self.min_steps <= self.max_steps <= 6:
            raise ValueError(f"need 1 <= min_steps <= max_steps <= 6, got {self.min_steps}..{self.max_steps}")
        if self.max_value < 10:
            raise ValueError(f"max_value must be >= 10, got {self.max_value}")
        unknown = set(self.operations) - set(SYMBOLS)
        if unknown or "+" not in self.operations:
            raise ValueError(f"operations must include '+' and come from {SYMBOLS}, got {self.operations}")


@dataclass(frozen=True)
class SyntheticProblem:
    question: str
    ops: tuple[Operation, ...]
    results: list[int] = field(default_factory=list)

    @property
    def answer(self) -> int:
        return self.results[-1]

    @property
    def steps(self) -> list[str]:
        return render_steps(self.ops, self.results)

    def to_record(self) -> Problem:
        return Problem(
            problem_id=problem_id(self.question, str(self.answer)),
            source=SOURCE_NAME,
            question=self.question,
            gold_answer=str(self.answer),
            gold_steps=self.steps,
            num_steps=len(self.ops),
        )


def problem_id(question: str, answer: str) -> str:
    return hashlib.sha256(f"{question}\x00{answer}".encode()).hexdigest()[:16]


class _Builder:
    """Builds one story event by event, keeping the running total within bounds."""

    def __init__(self, rng: random.Random, config: SyntheticConfig):
        self.rng, self.config = rng, config
        self.name = rng.choice(NAMES)
        self.pronoun = HE_SHE.get(self.name, "She")
        self.item = rng.choice(ITEMS)
        self.total = rng.randint(5, min(60, config.max_value))
        self.current = Operand(self.total)
        self.ops: list[Operation] = []
        self.sentences = [f"{self.name} has {self.total} {self.item}."]

    def _push(self, symbol: str, left: Operand, right: Operand) -> Operand:
        value = apply(symbol, left.value, right.value)
        self.ops.append(Operation(symbol, left, right))
        return Operand(value, len(self.ops) - 1)

    def event(self, budget: int) -> bool:
        """Add one event using at most `budget` steps; False if the drawn event does not fit."""
        rng, cfg, p, item = self.rng, self.config, self.pronoun, self.item
        kind = rng.choice(["add", "add", "sub", "sub", "mul", "div", "groups_add", "groups_sub"])
        room = cfg.max_value - self.total
        if kind == "add" and room >= 1:
            v = rng.randint(1, min(30, room))
            text = rng.choice(
                [f"{p} buys {v} more {item}.", f"{p} finds {v} more {item}.", f"{p} gets {v} {item} from {rng.choice(FRIENDS)}."]
            )
            self.current = self._push("+", self.current, Operand(v))
        elif kind == "sub" and "-" in cfg.operations and self.total >= 2:
            v = rng.randint(1, min(30, self.total - 1))
            text = rng.choice([f"{p} gives {v} {item} to {rng.choice(FRIENDS)}.", f"{p} loses {v} {item}.", f"{p} sells {v} {item}."])
            self.current = self._push("-", self.current, Operand(v))
        elif kind == "mul" and "*" in cfg.operations and 2 * self.total <= cfg.max_value:
            v = rng.randint(2, min(5, cfg.max_value // self.total))
            text = f"{p} ends up with {v} times as many {item} as before."
            self.current = self._push("*", self.current, Operand(v))
        elif kind == "div" and "/" in cfg.operations:
            divisors = [d for d in range(2, 6) if self.total % d == 0 and self.total // d >= 1]
            if not divisors:
                return False
            v = rng.choice(divisors)
            text = f"{p} shares the {item} equally among {v} friends and keeps one share."
            self.current = self._push("/", self.current, Operand(v))
        elif kind.startswith("groups") and "*" in cfg.operations and budget >= 2:
            a, b = rng.randint(2, 6), rng.randint(2, 10)
            if kind == "groups_add" and a * b <= room:
                text = f"{p} buys {a} boxes with {b} {item} in each box."
                group = self._push("*", Operand(a), Operand(b))
                self.current = self._push("+", self.current, group)
            elif kind == "groups_sub" and "-" in cfg.operations and a * b < self.total:
                text = f"{p} gives away {a} bags with {b} {item} in each bag."
                group = self._push("*", Operand(a), Operand(b))
                self.current = self._push("-", self.current, group)
            else:
                return False
        else:
            return False
        self.total = self.current.value
        self.sentences.append(text)
        return True

    def finish(self) -> SyntheticProblem:
        question = " ".join([*self.sentences, f"How many {self.item} does {self.name} have now?"])
        ops = tuple(self.ops)
        return SyntheticProblem(question=question, ops=ops, results=evaluate(ops))


MAX_RESTARTS = 1000  # a few draws suffice for any config that can work; the rest can never succeed


def make_problem(rng: random.Random, num_steps: int, config: SyntheticConfig) -> SyntheticProblem:
    for _ in range(MAX_RESTARTS):  # rejection sampling
        builder = _Builder(rng, config)
        for _ in range(50 * num_steps):
            remaining = num_steps - len(builder.ops)
            if remaining == 0:
                return builder.finish()
            builder.event(remaining)
    raise ValueError(
        f"no {num_steps}-step problem fits max_value={config.max_value} with operations {list(config.operations)}"
        f" in {MAX_RESTARTS} draws; raise max_value, allow more operations or ask for fewer steps"
    )


def generate(n: int, seed: int, config: SyntheticConfig | None = None) -> list[SyntheticProblem]:
    """`n` problems; problem i depends only on (seed, i), so any prefix of a larger run is identical."""
    config = config or SyntheticConfig()
    problems = []
    for index in range(n):
        rng = random.Random(f"{SOURCE_NAME}:{seed}:{index}")
        problems.append(make_problem(rng, rng.randint(config.min_steps, config.max_steps), config))
    return problems


# ---- corruptions: the same program with one step made wrong --------------------------------

CORRUPTION_KINDS = ("slip_recomputed", "slip_kept", "wrong_operand", "wrong_operation")


@dataclass(frozen=True)
class CorruptedTrace:
    kind: str
    steps: list[str]
    first_error: int  # index of the first wrong step
    answer: int  # the answer the corrupted steps lead to


def _with_op(ops: tuple[Operation, ...], index: int, op: Operation) -> tuple[Operation, ...]:
    return ops[:index] + (op,) + ops[index + 1 :]


def corrupt(problem: SyntheticProblem, kind: str, rng: random.Random, step: int | None = None) -> CorruptedTrace | None:
    """Make step `step` (random if None) wrong in the way `kind` names; None if no valid variant exists.

    slip_recomputed: the step's result is off, later steps compute from the wrong value.
    slip_kept: the step's result is off, later steps are left as they were (inconsistent).
    wrong_operand: a number that is neither in the question nor an earlier result; later steps follow.
    wrong_operation: another operation, computed correctly; later steps follow.
    """
    ops, results = problem.ops, problem.results
    j = rng.randrange(len(ops)) if step is None else step
    gold_steps = problem.steps
    for _ in range(20):
        if kind in ("slip_recomputed", "slip_kept"):
            wrong = results[j] + rng.choice([-3, -2, -1, 1, 2, 3, 10, -10])
            if wrong < 0 or wrong == results[j]:
                continue
            if kind == "slip_kept":
                steps = list(gold_steps)
                steps[j] = f"{steps[j].split(' = ')[0]} = {wrong}"
                return CorruptedTrace(kind, steps, j, results[-1])
            new_results = evaluate(ops, forced={j: wrong})
            if new_results is not None:
                return CorruptedTrace(kind, render_steps(ops, new_results), j, new_results[-1])
            continue
        if kind == "wrong_operand":
            op = ops[j]
            known = set(problem_numbers(problem)) | set(results[:j])
            v = rng.randint(1, 30)
            if v in known or op.right.step is not None:
                continue
            new_ops = _with_op(ops, j, replace(op, right=Operand(v)))
        elif kind == "wrong_operation":
            op = ops[j]
            swaps = {"+": "-*", "-": "+", "*": "+", "/": "*-"}[op.symbol]
            new_ops = _with_op(ops, j, replace(op, symbol=rng.choice(swaps)))
        else:
            raise ValueError(f"unknown corruption kind {kind!r}; choose from {CORRUPTION_KINDS}")
        new_results = evaluate(new_ops)
        if new_results is None or new_results[j] == results[j]:
            continue
        return CorruptedTrace(kind, render_steps(new_ops, new_results), j, new_results[-1])
    return None


def problem_numbers(problem: SyntheticProblem) -> list[int]:
    return [int(tok) for tok in problem.question.replace(".", " ").replace("?", " ").split() if tok.isdigit()]


DECODING_ERRORS = (
    "arithmetic_slip",  # the gold operands and operation, a wrong result
    "wrong_operand",  # another number taken (often an earlier result copied wrongly)
    "wrong_operation",  # the gold operands, another operation
    "stopped_early",  # every written step right, fewer than the problem needs
    "extra_steps",  # every gold step right, then more
    "answer_mismatch",  # the gold reasoning, another number in the answer slots
    "unreadable_step",  # a step that is not `a op b = c`
)
_STEP = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+)$")


def first_departure(problem: SyntheticProblem, steps: list[str]) -> int | None:
    """Index of the first written step that is not the gold step in its place (a step beyond the
    gold ones counts); None when every written step is a gold step."""
    return next((i for i, written in enumerate(steps) if i >= len(problem.steps) or written.strip() != problem.steps[i]), None)


def step_error(written: str, gold: str) -> str:
    """What is wrong with a written step that differs from the gold one."""
    parsed, expected = _STEP.match(written.strip()), _STEP.match(gold)
    if parsed is None:
        return "unreadable_step"
    left, symbol, right, _ = parsed.groups()
    if (left, right) != expected.group(1, 3):
        return "wrong_operand"
    return "arithmetic_slip" if symbol == expected.group(2) else "wrong_operation"


def classify_decoding(problem: SyntheticProblem, steps: list[str], answer: str | None) -> str | None:
    """Why a decoded trace misses the gold answer, judged at its first step that differs from the
    gold steps; None when the answer is right."""
    if answer == str(problem.answer):
        return None
    i = first_departure(problem, steps)
    if i is not None and i < len(problem.steps):
        return step_error(steps[i], problem.steps[i])
    if len(steps) < len(problem.steps):
        return "stopped_early"
    return "extra_steps" if len(steps) > len(problem.steps) else "answer_mismatch"
