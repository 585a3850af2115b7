"""Fuzzed sources and specs (#29): whatever a row or a spec holds, it is used, or refused with a reason
in one line; nothing raises a traceback."""

import json
import math

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factory.build.sources import SourceError, iter_problems
from factory.build.spec import BuildSpec, LocalSource, SpecError, validate_spec

WORDS = ["Tom", "has", "5", "apples", ".", "How", "many", "?", "12", "buys", "more"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=500, max_size=2000),  # very long, any Unicode
    st.lists(st.sampled_from(WORDS), max_size=30).map(" ".join),  # text the tokenizer knows
    st.sampled_from(["#### 12", "3 + 4 = 7\n#### 7", "####", "1,234", "$7", "007", "-0", "4.0", "1e400", ""]),
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6
)
rows = st.one_of(
    st.fixed_dictionaries({"question": values, "answer": values}, optional={"steps": values, "extra": values}),
    st.dictionaries(st.sampled_from(["question", "answer", "q", "a", "steps"]), values, max_size=4),
    values,  # not an object at all
)


def dump(row) -> str:
    text = json.dumps(row, allow_nan=True)
    return text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batch=st.lists(rows, min_size=1, max_size=12), answer_format=st.sampled_from(["number", "gsm8k"]))
def test_every_source_row_is_a_problem_or_rejected_with_a_reason(tmp_path_factory, template, batch, answer_format):
    path = tmp_path_factory.mktemp("fuzz") / "rows.jsonl"
    lines = [dump(row) for row in batch]
    lines.insert(len(lines) // 2, "{not json")  # a broken line among them
    path.write_text("\n".join(lines) + "\n")
    source = LocalSource(kind="local", path=str(path), answer_format=answer_format)
    rejected = []
    try:
        problems = list(iter_problems(source, template, None, rejected))
    except SourceError as err:  # a mapped column no row has: one line, before anything runs
        assert "\n" not in str(err) and "no row has the column" in str(err)
        return
    assert len(problems) + len(rejected) == len(lines)  # nothing dropped unseen
    assert all(r.reason and "\n" not in r.reason for r in rejected)
    for p in problems:
        assert p.question.strip() and int(p.gold_answer) == float(p.gold_answer) and not math.isnan(float(p.gold_answer))
    assert len({p.problem_id for p in problems}) == len(problems)


spec_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True), st.text(max_size=12)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=8,
)
sections = st.sampled_from(list(BuildSpec.model_fields))
keys = st.one_of(
    st.sampled_from(["strategy", "target", "budget", "k", "rule", "temperature", "locators", "kind", "n", "dir", "shard_size"]),
    st.text(max_size=8),
)
specs = st.one_of(
    st.dictionaries(sections, st.dictionaries(keys, spec_values, max_size=3) | spec_values, max_size=3),
    spec_values,
)


@settings(max_examples=200, deadline=None)
@given(data=specs)
def test_every_bad_spec_is_refused_in_lines_naming_its_keys(data):
    text = yaml.safe_dump(data, allow_unicode=True)
    try:
        validate_spec(yaml.safe_load(text) if text.strip() != "null" else {}, origin="fuzz.yaml")
    except SpecError as err:
        lines = str(err).splitlines()
        assert lines[0].startswith("fuzz.yaml: ") and all(line.strip() for line in lines)
        assert "Traceback" not in str(err)
