import random

import pytest

from factory.synthetic import problems as synthetic
from factory.synthetic.problems import CORRUPTION_KINDS, SyntheticConfig, corrupt, evaluate, generate


def test_same_seed_same_problems_and_prefix_stable():
    a = generate(30, seed=7, config=SyntheticConfig(1, 6))
    b = generate(30, seed=7, config=SyntheticConfig(1, 6))
    assert [p.to_record() for p in a] == [p.to_record() for p in b]
    assert [p.question for p in generate(10, seed=7, config=SyntheticConfig(1, 6))] == [p.question for p in a[:10]]
    assert [p.question for p in generate(10, seed=8, config=SyntheticConfig(1, 6))] != [p.question for p in a[:10]]


def test_problems_respect_knobs_and_steps_compute_the_answer():
    config = SyntheticConfig(min_steps=3, max_steps=5, max_value=60, operations=("+", "-"))
    for p in generate(200, seed=1, config=config):
        record = p.to_record()
        assert 3 <= record.num_steps <= 5
        assert all(op.symbol in "+-" for op in p.ops)
        assert all(0 <= v <= 60 for v in p.results)
        for step in record.gold_steps:  # every step is true arithmetic
            lhs, rhs = step.split(" = ")
            assert eval(lhs) == int(rhs)  # noqa: S307 - generated arithmetic only
        assert record.gold_steps[-1].endswith(f"= {record.gold_answer}")
        assert record.problem_id == synthetic.problem_id(record.question, record.gold_answer)


@pytest.mark.parametrize(
    "kwargs", [{"min_steps": 0}, {"max_steps": 7}, {"min_steps": 4, "max_steps": 3}, {"operations": ("-",)}, {"max_value": 5}]
)
def test_bad_knobs_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SyntheticConfig(**kwargs)


@pytest.mark.parametrize("kind", CORRUPTION_KINDS)
def test_corruptions_make_exactly_the_named_error(kind):
    rng, made = random.Random(0), 0
    for p in generate(60, seed=3, config=SyntheticConfig(2, 5)):
        trace = corrupt(p, kind, rng)
        if trace is None:
            continue
        made += 1
        j = trace.first_error
        assert trace.steps[:j] == p.steps[:j] and trace.steps[j] != p.steps[j]
        lhs, rhs = trace.steps[j].split(" = ")
        if kind.startswith("slip"):
            assert eval(lhs) != int(rhs)  # noqa: S307
        else:
            assert eval(lhs) == int(rhs)  # noqa: S307 - right arithmetic, wrong reasoning
        if kind == "slip_kept":
            assert trace.steps[j + 1 :] == p.steps[j + 1 :] and trace.answer == p.answer
        else:
            assert trace.answer != p.answer and trace.steps[-1].endswith(f"= {trace.answer}")
    assert made >= 30


def test_forced_result_propagates():
    for p in generate(20, seed=0, config=SyntheticConfig(3, 3, operations=("+", "-", "*"))):
        forced = evaluate(p.ops, forced={0: p.results[0] + 1})
        if forced is not None:  # a subtraction may go negative; those variants are invalid
            assert forced[0] == p.results[0] + 1 and forced[-1] != p.results[-1]
            return
    raise AssertionError("no problem admitted the forced value")


def test_decoding_errors_are_classified_at_the_first_differing_step():
    p = next(q for q in generate(50, seed=11, config=SyntheticConfig(3, 3)) if q.ops[1].symbol in "+*")
    gold, answer = list(p.steps), str(p.answer)
    left, symbol, right, result = gold[1].replace(" = ", " ").split()
    assert synthetic.classify_decoding(p, gold, answer) is None
    assert synthetic.classify_decoding(p, [gold[0], f"{left} {symbol} {right} = {int(result) + 1}", gold[2]], "7") == "arithmetic_slip"
    assert synthetic.classify_decoding(p, [gold[0], f"{int(left) + 1} {symbol} {right} = {result}", gold[2]], "7") == "wrong_operand"
    assert synthetic.classify_decoding(p, [gold[0], f"{left} - {right} = {result}", gold[2]], "7") == "wrong_operation"
    assert synthetic.classify_decoding(p, gold[:2], None) == "stopped_early"
    assert synthetic.classify_decoding(p, [*gold, "1 + 1 = 2"], "2") == "extra_steps"
    assert synthetic.classify_decoding(p, gold, str(p.answer + 1)) == "answer_mismatch"
    assert synthetic.classify_decoding(p, [gold[0], "the answer"], None) == "unreadable_step"
    assert synthetic.first_departure(p, gold) is None and synthetic.first_departure(p, gold[:2]) is None
    assert synthetic.first_departure(p, [gold[0], "the answer"]) == 1 and synthetic.first_departure(p, [*gold, "1 + 1 = 2"]) == 3
