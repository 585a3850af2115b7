"""Incremental builds: a source that grows is sampled only for its new problems; what was built never changes."""

import json
import os
import random
from functools import partial

import pyarrow.parquet as pq
import pytest
import torch

from factory.build.command import build
from factory.build.output import BuildDir, BuildError
from factory.build.runner import run_in_process
from factory.build.spec import validate_spec
from factory.synthetic.problems import SyntheticConfig, generate

torch.set_num_threads(1)  # tiny models: more threads only contend


def write_source(path, problems) -> None:
    path.write_text("".join(json.dumps({"question": p.question, "answer": str(p.answer)}) + "\n" for p in problems))


def spec_for(source, out, **sections):
    spec = {
        "source": {"kind": "local", "path": str(source)},
        "sampler": {"target": 2},
        "filters": {"answer_match": False, "step_labels": False, "min_steps": 0},
        "output": {"dir": str(out), "shard_size": 4},
    }
    return validate_spec({**spec, **sections})


def files(out) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in (out / "data").rglob("*.parquet") if "rejected" not in p.parts}


def run(spec, adapter, runner=None) -> tuple[dict, list]:
    sampled = []
    runner = runner or partial(run_in_process, adapter=adapter)
    manifest = build(spec, log=lambda _: None, on_shard=lambda r: sampled.append(r.sampled), runner=runner)
    return manifest, sampled


@pytest.fixture
def pool():
    return generate(13, seed=21, config=SyntheticConfig(2, 3))


def test_a_grown_source_samples_only_its_new_problems_and_old_rows_stay_byte_identical(tmp_path, tiny_adapter, pool):
    source, out = tmp_path / "pool.jsonl", tmp_path / "out"
    write_source(source, pool[:10])
    first, sampled = run(spec_for(source, out), tiny_adapter)
    assert sum(sampled) == 20 and first["problems"] == 10
    before = files(out)
    shuffled = pool[:10] + pool[:2]  # 30% more problems, the old ones moved and two of them repeated
    shuffled += pool[10:]
    random.Random(0).shuffle(shuffled)
    write_source(source, shuffled)
    grown, sampled = run(spec_for(source, out), tiny_adapter)
    assert sum(sampled) == 3 * 2  # k traces for each new problem, none for an old one
    assert grown["problems"] == 13 and grown["traces_sampled"] == 26
    after = files(out)
    assert {name: after[name] for name in before} == before  # every earlier data file, name and bytes
    assert grown["rejected"]["by_reason"] == {"duplicate_problem": 2}
    assert [i["problems_added"] for i in grown["increments"]] == [10, 3]
    assert [i["rows_added"] for i in grown["increments"]] == [first["accepted"], grown["accepted"] - first["accepted"]]
    card = (out / "README.md").read_text()
    assert f"3 problems, {grown['accepted'] - first['accepted']} traces accepted" in card

    again, sampled = run(spec_for(source, out), tiny_adapter)  # nothing new: nothing sampled, nothing rewritten
    assert sampled == [] and files(out) == after and again["increments"] == grown["increments"]


def test_no_problem_is_sampled_twice_across_increments(tmp_path, tiny_adapter, pool):
    source, out = tmp_path / "pool.jsonl", tmp_path / "out"
    write_source(source, pool[:6])
    run(spec_for(source, out), tiny_adapter)
    write_source(source, pool[3:] + pool[:3])
    run(spec_for(source, out), tiny_adapter)
    rows = [
        r
        for config in ("traces", "filtered")
        for path in (out / "data" / config).glob("*.parquet")
        for r in pq.read_table(path).to_pylist()
    ]
    assert len(rows) == 13 * 2 and len({r["trace_id"] for r in rows}) == 26
    assert sorted({r["problem_id"] for r in rows}) == sorted(p.to_record().problem_id for p in pool)


def test_a_killed_incremental_run_resumes_to_exactly_the_rows_of_an_uninterrupted_one(tmp_path, tiny_adapter, pool):
    source = tmp_path / "pool.jsonl"

    def killed_after_one_shard(spec, out, shards):
        runner = run_in_process(spec, out, shards, adapter=tiny_adapter)
        yield next(runner)
        raise KeyboardInterrupt  # the driver dies with the second new shard in flight

    write_source(source, pool[:4])
    run(spec_for(source, tmp_path / "a"), tiny_adapter)
    run(spec_for(source, tmp_path / "b"), tiny_adapter)
    write_source(source, pool)  # 9 new problems: three shards of 4
    with pytest.raises(KeyboardInterrupt):
        run(spec_for(source, tmp_path / "a"), tiny_adapter, runner=killed_after_one_shard)
    resumed, sampled = run(spec_for(source, tmp_path / "a"), tiny_adapter)
    assert sum(sampled) == (9 - 4) * 2  # only the two shards the kill left undone
    reference, _ = run(spec_for(source, tmp_path / "b"), tiny_adapter)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert resumed["fingerprint"] == reference["fingerprint"]
    assert [i["problems_added"] for i in resumed["increments"]] == [4, 9]


def test_another_spec_or_code_never_mixes_into_a_build_and_says_how_to_start_a_new_version(tmp_path, tiny_adapter, pool):
    source, out = tmp_path / "pool.jsonl", tmp_path / "out"
    write_source(source, pool[:4])
    run(spec_for(source, out), tiny_adapter)
    with pytest.raises(BuildError, match=r"spec_hash .* start a new version with another --output \(e.g. out-v2\)"):
        run(spec_for(source, out, seed=3), tiny_adapter)


def test_a_poison_problem_is_quarantined_with_its_reason_and_the_rest_of_its_shard_lands(tmp_path, tiny_adapter, pool, monkeypatch):
    from factory.build import stages

    source, out = tmp_path / "pool.jsonl", tmp_path / "out"
    write_source(source, pool[:6])
    poison = pool[2].question
    original = stages.TraceMaker.__call__

    def raises_on_poison(self, problems):
        if any(p.question == poison for p in problems):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return original(self, problems)

    monkeypatch.setattr(stages.TraceMaker, "__call__", raises_on_poison)
    manifest, sampled = run(spec_for(source, out), tiny_adapter)
    assert sum(sampled) == 5 * 2 and manifest["rejected"]["by_reason"] == {"shard_error": 1}
    rejected = pq.read_table(next((out / "data" / "rejected").glob("*.parquet"))).to_pylist()
    assert [(r["reason"], json.loads(r["raw"])["question"]) for r in rejected] == [("shard_error", poison)]
    assert rejected[0]["detail"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    rows = [
        r
        for config in ("traces", "filtered")
        for path in (out / "data" / config).glob("*.parquet")
        for r in pq.read_table(path).to_pylist()
    ]
    assert {r["question"] for r in rows} == {p.question for p in pool[:6]} - {poison}


def test_two_builds_of_one_output_never_overlap(tmp_path, tiny_adapter, pool):
    from factory.build.command import cli_build
    from factory.build.lock import RunLock, lock_path

    source, out = tmp_path / "pool.jsonl", tmp_path / "out"
    write_source(source, pool[:4])
    spec = spec_for(source, out)
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    with RunLock(lock_path(out)):  # another run of this output, alive
        with pytest.raises(SystemExit) as exit_:
            cli_build([str(tmp_path / "spec.json")])
        assert str(exit_.value.code).startswith(f"factory build: another run holds {lock_path(out)}: pid {os.getpid()} on host ")
    assert not out.exists()  # refused before it claimed anything
    manifest, sampled = run(spec, tiny_adapter)
    assert sum(sampled) == 8 and manifest["problems"] == 4 and not lock_path(out).exists()


def test_rows_made_in_another_precision_never_join_a_build(tmp_path, tiny_adapter, pool):
    source, out = tmp_path / "pool.jsonl", tmp_path / "out"
    write_source(source, pool[:4])
    run(spec_for(source, out), tiny_adapter)
    assert json.loads((out / "_build" / "precision.json").read_text()) == {"dtype": "float32"}
    before = files(out)
    (out / "_build" / "precision.json").write_text(json.dumps({"dtype": "bfloat16"}))  # as if resumed on other hardware
    write_source(source, pool[:8])
    with pytest.raises(BuildError, match="holds rows made in bfloat16, but this actor ran the model in float32"):
        run(spec_for(source, out), tiny_adapter)
    assert BuildDir(out).done_shards() == {0}  # the new shard is not marked done
    assert {name: files(out)[name] for name in before} == before
