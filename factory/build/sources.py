"""Every problem source behind one call: rows in, usable problems and rejected rows out.

A row the factory cannot use (no answer, a non-integer answer, an empty or overlong question,
text the tokenizer cannot encode, a duplicate) becomes a `Rejected` record with a short reason:
nothing crashes the build and nothing is dropped silently.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from itertools import chain, islice
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from factory.build.spec import Columns, HFSource, LocalSource, SourceSpec, SyntheticSource
from factory.core.numbers import canonical_answer
from factory.core.template import ReasoningTemplate, TemplateError
from factory.schemas.records import Problem, Rejected
from factory.synthetic import problems as synthetic

GSM8K_ANSWER_MARK = "####"
CALCULATOR_ANNOTATION = re.compile(r"<<[^>]*>>")


class SourceError(ValueError):
    """A source that cannot be read at all (no such file, a mapped column no row has): refused
    before any compute, and before an output directory is claimed."""


class RowError(ValueError):
    """A row that cannot become a problem; `reason` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ---- reading rows -------------------------------------------------------------------------


def synthetic_rows(source: SyntheticSource) -> Iterator[dict]:
    for p in synthetic.generate(source.n, source.seed, source.to_config()):
        yield p.to_record().model_dump()


def hf_rows(source: HFSource) -> Iterator[dict]:
    import datasets  # heavy; only this source needs it

    yield from datasets.load_dataset(source.path, source.name, split=source.split)


def local_rows(source: LocalSource) -> Iterator[Any]:
    """Rows of a JSONL or Parquet file, or of a JSON array, read as they are consumed (a JSON array,
    one document, is the exception: it is parsed whole). A JSONL line that is not JSON comes back as
    its text, to be rejected. A `.json` file may hold either an array or JSON lines."""
    path = Path(source.path)
    fmt = source.format or ("parquet" if path.suffix == ".parquet" else "jsonl")
    if fmt == "parquet":
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
        return
    with path.open() as lines:
        first = lines.read(4096)
        if path.suffix == ".json" and first.lstrip().startswith("["):
            yield from json.loads(first + lines.read())
            return
        lines.seek(0)
        for line in lines:
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    yield line.rstrip("\n")


# ---- rows to problems ---------------------------------------------------------------------


def source_name(source: SourceSpec) -> str:
    if isinstance(source, HFSource):
        return f"hf:{source.path}{'/' + source.name if source.name else ''}:{source.split}"
    if isinstance(source, LocalSource):
        return f"local:{Path(source.path).name}"
    return synthetic.SOURCE_NAME


def gsm8k_answer(text: str) -> tuple[str, list[str]]:
    """GSM8k's answer field: human reasoning, then '#### 1,234'. Returns the answer in its one
    spelling and the reasoning lines with the <<48/2=24>> calculator annotations stripped."""
    if GSM8K_ANSWER_MARK not in text:
        raise RowError("missing_answer", f"no {GSM8K_ANSWER_MARK!r} before the final answer")
    reasoning, _, final = text.rpartition(GSM8K_ANSWER_MARK)
    if not final.strip():
        raise RowError("missing_answer", f"nothing after {GSM8K_ANSWER_MARK!r}")
    steps = [line.strip() for line in CALCULATOR_ANNOTATION.sub("", reasoning).splitlines() if line.strip()]
    return canonical_answer(final), steps


def column_steps(value: Any) -> list[str]:
    """Reference steps from a text (one per line) or a list column."""
    if value is None:
        return []
    if not isinstance(value, (str, list, tuple)):
        raise RowError("invalid_steps", f"steps must be text or a list, got {type(value).__name__}")
    lines = value.splitlines() if isinstance(value, str) else [str(v) for v in value]
    return [line.strip() for line in lines if line.strip()]


def table_problem(row: Any, columns: Columns, answer_format: str, name: str) -> Problem:
    """A problem from one row of a table source (Hugging Face or local)."""
    if not isinstance(row, dict):
        raise RowError("invalid_row", "not a JSON object")
    question, answer = row.get(columns.question), row.get(columns.answer)
    if not isinstance(question, str):
        raise RowError("missing_question", f"column {columns.question!r} is missing or not text")
    if answer is None or str(answer).strip() == "":
        raise RowError("missing_answer", f"column {columns.answer!r} is missing or empty")
    if answer_format == "gsm8k":
        gold, steps = gsm8k_answer(str(answer))
    else:
        gold, steps = canonical_answer(answer), []
    if columns.steps is not None:
        steps = column_steps(row.get(columns.steps))
    question = question.strip()
    return Problem(
        problem_id=synthetic.problem_id(question, gold),
        source=name,
        question=question,
        gold_answer=gold,
        gold_steps=steps,
        num_steps=len(steps),
    )


def to_problem(row: Any, source: SourceSpec, name: str) -> Problem:
    if isinstance(source, SyntheticSource):
        return Problem.model_validate(row)
    return table_problem(row, source.columns, source.answer_format, name)


READERS: dict[str, Callable[[Any], Iterator[Any]]] = {"synthetic": synthetic_rows, "hf": hf_rows, "local": local_rows}


def read_rows(source: SourceSpec) -> Iterator[Any]:
    """The source's rows; a source that cannot be read at all raises one SourceError that says why."""
    try:
        yield from READERS[source.kind](source)
    except Exception as err:  # whatever the reader (file system, pyarrow, datasets) raised, as one clear error
        raise SourceError(f"cannot read source {source_name(source)}: {type(err).__name__}: {err}") from err


def check_columns(source: SourceSpec, seen: set[str]) -> None:
    """A mapped column that no row has is a mistake in the spec, not a problem with every row."""
    if isinstance(source, SyntheticSource) or not seen:
        return
    for field, column in source.columns.model_dump().items():
        if column is not None and column not in seen:
            raise SourceError(
                f"source {source_name(source)}: no row has the column {column!r} (source.columns.{field}); "
                f"its rows have {sorted(seen)[:20]}"
            )


COLUMN_CHECK_ROWS = 1000  # the first rows, read before any problem is handed on, that must show every mapped column


def iter_problems(
    source: SourceSpec, template: ReasoningTemplate, limit: int | None = None, rejected: list[Rejected] | None = None
) -> Iterator[Problem]:
    """Usable problems in source order (at most `limit`), streamed: rows are read as the problems are
    consumed, so no caller need hold the source. Every row rejected on the way is appended to
    `rejected` with its reason. A problem is usable when its question and answer fit `template` and it
    is not a repeat (only the ids seen are kept, to know one). The first `COLUMN_CHECK_ROWS` rows are
    read and checked before the first problem is yielded, so a mapped column no row has stops the
    source before anything else happens."""
    rejected = [] if rejected is None else rejected
    name = source_name(source)
    rows = read_rows(source)
    head = list(islice(rows, COLUMN_CHECK_ROWS))
    check_columns(source, {column for row in head if isinstance(row, dict) for column in row})
    first_row: dict[str, int] = {}
    produced = 0
    for index, row in enumerate(chain(head, rows)):
        if limit is not None and produced >= limit:
            return
        problem = None
        try:
            problem = to_problem(row, source, name)
            template.encode_question(problem.question)
            template.encode_answer(problem.gold_answer)
            if problem.problem_id in first_row:
                raise RowError("duplicate_problem", f"same question and answer as row {first_row[problem.problem_id]}")
        except (RowError, TemplateError) as err:
            raw = json.dumps(row, default=str, ensure_ascii=False)
            problem_id = problem.problem_id if problem else None
            rejected.append(Rejected(problem_id=problem_id, source=name, row=index, raw=raw, reason=err.reason, detail=err.detail))
            continue
        first_row[problem.problem_id] = index
        produced += 1
        yield problem


def load_problems(source: SourceSpec, template: ReasoningTemplate, limit: int | None = None) -> tuple[list[Problem], list[Rejected]]:
    """`iter_problems`, held in lists: for small sources, the dry run, tests and benchmarks."""
    rejected: list[Rejected] = []
    problems = list(iter_problems(source, template, limit, rejected))
    return problems, rejected
