"""A source of any size streams: read as it is planned, planned a shard at a time, each shard's plan read
only when the shard runs; and the storage every file goes through writes atomically, on a path or a URI."""

from collections.abc import Iterator
from functools import partial

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from factory.build import sources
from factory.build.command import build
from factory.build.output import BuildDir
from factory.build.runner import run_in_process
from factory.build.sources import COLUMN_CHECK_ROWS, SourceError, iter_problems
from factory.build.spec import validate_spec
from factory.build.storage import TMP_MARK, Storage
from factory.synthetic.problems import generate

torch.set_num_threads(1)  # tiny models: more threads only contend


def counted(rows: list, counter: list) -> Iterator:
    for row in rows:
        counter[0] += 1
        yield row


def test_plans_are_written_as_the_source_streams_one_shard_at_a_time(tmp_path, monkeypatch):
    problems = [p.to_record() for p in generate(13, seed=5)]
    drawn, written = [0], []
    original = Storage.write_text

    def recording(self, rel, text):
        written.append((rel, drawn[0]))
        original(self, rel, text)

    monkeypatch.setattr(Storage, "write_text", recording)
    out = BuildDir(tmp_path / "out")
    sizes, added = out.plan(counted(problems, drawn), shard_size=4)
    assert sizes == {0: 4, 1: 4, 2: 4, 3: 1} and added == 13
    # each plan is written once its shard fills, before the next problem is drawn
    assert written == [(f"_build/shards/0000{i}.plan.json", n) for i, n in enumerate([4, 8, 12, 13])]
    assert [p.problem_id for i in sizes for p in out.read_plan(i).problems] == [p.problem_id for p in problems]
    assert out.plan(counted(problems[::-1], drawn), shard_size=4) == (sizes, 0)  # known problems plan nothing


def test_the_source_is_read_only_as_far_as_its_problems_are_taken(tmp_path, template, monkeypatch):
    rows = [{"question": p.question, "answer": str(p.answer)} for p in generate(3 * COLUMN_CHECK_ROWS, seed=6)]
    read = [0]
    monkeypatch.setitem(sources.READERS, "local", lambda source: counted(rows, read))
    source = validate_spec({"source": {"kind": "local", "path": "rows.jsonl"}}).source
    stream = iter_problems(source, template)
    next(stream)
    assert read[0] == COLUMN_CHECK_ROWS  # the column check's rows, before the first problem is handed on
    for _ in range(COLUMN_CHECK_ROWS):
        next(stream)
    assert read[0] == COLUMN_CHECK_ROWS + 1
    # a mapped column no early row has stops the source before its first problem
    monkeypatch.setitem(sources.READERS, "local", lambda source: iter([{"question": r["question"], "final": r["answer"]} for r in rows]))
    with pytest.raises(SourceError, match="no row has the column 'answer'"):
        next(iter_problems(source, template))


def test_a_2k_build_reads_each_plan_only_when_its_shard_runs(tmp_path, tiny_adapter, monkeypatch):
    spec = validate_spec(
        {
            "source": {"kind": "synthetic", "n": 2000, "seed": 7},
            "sampler": {"rule": "llada", "rule_params": {"steps": 2}, "strategy": "posterior", "strategy_params": {"rounds": 1}},
            "output": {"dir": str(tmp_path / "out"), "shard_size": 250},
        }
    )
    events = []
    original = BuildDir.read_plan

    def reading(self, shard):
        events.append(("read", shard))
        return original(self, shard)

    monkeypatch.setattr(BuildDir, "read_plan", reading)
    manifest = build(
        spec, log=lambda _: None, on_shard=lambda s: events.append(("done", s.shard)), runner=partial(run_in_process, adapter=tiny_adapter)
    )
    assert [e for e in events if e[0] == "done"] == [("done", i) for i in range(8)]
    in_flight = 0  # plans read and not yet done: the planning pass reads none (the directory was empty)
    for kind, _ in events:
        in_flight += 1 if kind == "read" else -1
        assert 0 <= in_flight <= 1
    assert manifest["problems"] == 2000 and manifest["traces_sampled"] == 2000 and manifest["shards"] == 8
    rows = [
        r
        for config in ("traces", "filtered")
        for name in manifest["files"][config]
        for r in pq.read_table(tmp_path / "out" / name).to_pylist()
    ]
    assert len({r["problem_id"] for r in rows}) == len(rows) == 2000  # every problem sampled exactly once


@pytest.mark.parametrize("uri", [False, True])
def test_storage_writes_atomically_on_a_path_or_a_uri(tmp_path, uri):
    root = tmp_path / "store"
    storage = Storage(root.as_uri() if uri else root)
    assert storage.shared is uri and storage.is_empty() and storage.name == "store"
    storage.write_text("a/b.json", '{"x": 1}')
    storage.write_parquet("a/t.parquet", pa.table({"n": [1, 2]}))
    storage.write_parquet("a/empty.parquet", pa.table({"n": pa.array([], pa.int64())}))
    assert storage.read_text("a/b.json") == '{"x": 1}' and pq.read_table(root / "a" / "t.parquet").column("n").to_pylist() == [1, 2]
    assert pq.read_table(root / "a" / "empty.parquet").num_rows == 0 and storage.list("a", "*.parquet") == ["empty.parquet", "t.parquet"]
    assert not [p for p in root.rglob("*") if TMP_MARK in p.name] and not storage.is_empty()
    (root / "a" / f".t.parquet{TMP_MARK}dead").write_bytes(b"half a file")  # a writer killed mid-file
    assert storage.list("a", "*.parquet") == ["empty.parquet", "t.parquet"]  # never taken for a finished file
    storage.remove_temporaries()
    assert sorted(p.name for p in (root / "a").iterdir()) == ["b.json", "empty.parquet", "t.parquet"]


def test_rejected_rows_stream_to_their_chunks_and_are_never_held_whole(tmp_path, monkeypatch):
    from factory.build import output
    from factory.build.output import BuildDir, RejectedRows
    from factory.build.storage import Storage
    from factory.schemas.records import Rejected

    monkeypatch.setattr(output, "REJECTED_CHUNK", 3)
    storage = Storage(tmp_path / "out")
    rows = [Rejected(source="s", row=i, raw="{}", reason="invalid_row" if i % 2 else "missing_answer", detail="") for i in range(8)]
    sink = RejectedRows()
    sink.append(rows[0])  # found before the directory is claimed: held until it is
    storage.write_text("_build/rejected/000009.jsonl", "a chunk of an earlier run's read of the source\n")
    sink.attach(storage)
    for row in rows[1:]:
        sink.append(row)
        assert len(sink.pending) < 3  # flushed a chunk at a time
    assert storage.list("_build/rejected") == ["000000.jsonl", "000001.jsonl", "000002.jsonl"] and len(sink.pending) == 1
    assert list(sink) == rows and len(sink) == 8 and sink.by_reason == {"invalid_row": 4, "missing_answer": 4}
    name = BuildDir(tmp_path / "out").write_rejected(sink)
    assert name == output.data_file("rejected", 0, rows)  # named by its rows' digest, as every data file
    assert [Rejected.model_validate(r) for r in pq.read_table(tmp_path / "out" / name).to_pylist()] == rows
