"""Lose a node, not a row (#29): a multi-node Ray cluster in one process tree (`ray.cluster_utils.Cluster`,
as Ray's own fault tests do), a worker node removed mid-build and another added."""

import contextlib
import json

import psutil
import pyarrow.parquet as pq
import pytest
import ray
from ray.cluster_utils import Cluster

from factory.build.command import build
from factory.build.runner import run_in_process
from factory.build.spec import validate_spec
from factory.models.adapter import ModelAdapter
from factory.synthetic import problems as synthetic


def spec_for(root, model_dir, name):
    rows = [{"question": p.question, "answer": str(p.answer)} for p in synthetic.generate(16, seed=9)]
    (root / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return validate_spec(
        {
            "source": {"kind": "local", "path": str(root / "problems.jsonl")},
            "model": {"id": str(model_dir)},
            "sampler": {"budget": 16, "rule": "llada", "rule_params": {"steps": 2}},
            "output": {"dir": str(root / name), "shard_size": 1},
            "resources": {"num_actors": 2, "num_cpus_per_actor": 1},
        }
    )


def rows(out, manifest) -> dict:
    found = [r for config in ("traces", "filtered") for name in manifest["files"][config] for r in pq.read_table(out / name).to_pylist()]
    assert len({r["trace_id"] for r in found}) == len(found)  # every trace exactly once
    return {r["trace_id"]: (r["reasoning"], r["filter_reason"], r["nfe"]) for r in found}


@pytest.mark.slow
def test_a_worker_node_removed_mid_build_loses_no_row_and_a_node_added_gets_work(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec = spec_for(tmp_path, tiny_model_dir, "out")
    reference = build(
        spec.with_overrides(output_dir=tmp_path / "ref"),
        log=lambda _: None,
        runner=lambda s, o, sh: run_in_process(s, o, sh, ModelAdapter.load(str(tiny_model_dir))),
    )
    # A lost node is noticed within about a second, as in Ray's own fault tests (the default is tens of seconds).
    fast_health_checks = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 250, "health_check_failure_threshold": 4}
    head = {"num_cpus": 0, "object_store_memory": 150_000_000, "_system_config": fast_health_checks}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        workers = [cluster.add_node(num_cpus=1, object_store_memory=150_000_000) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        events = []

        def on_shard(summary):
            events.append(summary.worker.actor)
            if len(events) == 2:  # both replicas are working: the machine of one goes, with everything on it
                raylet = psutil.Process(workers[0].all_processes["raylet"][0].process.pid)
                on_node = raylet.children(recursive=True)
                cluster.remove_node(workers[0], allow_graceful=False)
                for process in on_node:  # its model replica too: a lost machine takes its processes along
                    with contextlib.suppress(psutil.NoSuchProcess):
                        process.kill()
                workers.append(cluster.add_node(num_cpus=1, object_store_memory=150_000_000))

        manifest = build(spec, address=cluster.address, log=lambda _: None, on_shard=on_shard)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert manifest["problems"] == 16 and manifest["fingerprint"] == reference["fingerprint"]
    assert rows(tmp_path / "out", manifest) == rows(tmp_path / "ref", reference)
    # the head has no CPU and the other first node keeps its replica: a replica that first shows up after
    # the removal can only run on the added node, and it delivered shards
    assert len(set(events[:2])) == 2 and set(events[2:]) - set(events[:2])
