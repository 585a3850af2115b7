"""The build as a Ray job on a cluster with GPUs, and the cluster launcher / KubeRay configs."""

import json
import os
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import datasets
import pytest
import yaml

from factory.synthetic import problems as synthetic

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(temp_dir: Path, dashboard_port: int, own_sessions) -> None:
    """A private single-node cluster with two logical GPUs. Every port is free-picked, so it cannot
    collide with another Ray on this machine; its processes share one session, killed at teardown."""
    command = [
        str(VENV_BIN / "ray"), "start", "--head", "--num-cpus", "2", "--num-gpus", "2",
        "--port", str(free_port()), "--dashboard-port", str(dashboard_port), "--include-dashboard=true",
        "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
        "--temp-dir", str(temp_dir), "--object-store-memory", "200000000", "--disable-usage-stats",
    ]  # fmt: skip
    head = subprocess.Popen(command, env=cluster_env(), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    own_sessions(head.pid)
    output, _ = head.communicate(timeout=180)
    assert head.returncode == 0, output[-3000:]


def cluster_env() -> dict:
    """`python` in a job's entrypoint must be this venv's, and the job must not join any other cluster."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "RAY_AUTH_MODE": "disabled", "PATH": f"{VENV_BIN}:{env['PATH']}"}


@pytest.mark.slow
def test_ray_job_gives_each_actor_its_own_gpu(tmp_path, tmp_path_factory, tiny_model_dir, own_sessions):
    temp_dir = tmp_path_factory.mktemp("ray")  # short: Ray's socket paths under it must stay below 108 bytes
    dashboard_port = free_port()
    start_head(temp_dir, dashboard_port, own_sessions)

    rows = [{"question": p.question, "answer": str(p.answer)} for p in synthetic.generate(4, seed=5)]
    (tmp_path / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "source": {"kind": "local", "path": str(tmp_path / "problems.jsonl")},
        "model": {"id": str(tiny_model_dir)},
        "sampler": {"target": 2, "temperature": 0.7},
        "filters": {"answer_match": False, "step_labels": False, "min_steps": 0},
        "output": {"shard_size": 1},
        "resources": {"num_actors": 2, "num_gpus_per_actor": 1, "num_cpus_per_actor": 0.5, "cpu_fallback": True},  # logical GPUs
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    submit = [
        str(VENV_BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard_port}", "--working-dir", str(REPO),
        "--", "python", "jobs/build_dataset.py", "--spec", str(tmp_path / "spec.yaml"), "--output", str(out),
    ]  # fmt: skip
    job = subprocess.run(submit, env=cluster_env(), capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "[build] done" in job.stdout

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["problems"] == 4 and manifest["shards"] == 4 and manifest["traces_sampled"] == 8
    workers = manifest["workers"]
    assert len(workers) == 2, workers
    assert sorted(w["cuda_visible_devices"] for w in workers) == ["0", "1"]
    assert all(w["gpu_ids"] == [w["cuda_visible_devices"]] and w["device"] == "cpu" for w in workers)
    assert len(datasets.load_dataset(str(out), "traces", split="train")) == manifest["accepted"]


def test_cluster_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    validate_config(config)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())
    assert any("pip install" in c and "mdlm-factory" in c for c in config["setup_commands"])


def test_the_job_entry_point_refuses_a_relative_output(tmp_path):
    """Under `ray job submit --working-dir` the driver runs in Ray's temporary copy of the checkout."""
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({"output": {"dir": "out/build"}}))
    entry = [sys.executable, str(REPO / "jobs" / "build_dataset.py"), "--spec", str(tmp_path / "spec.yaml")]
    job = subprocess.run(entry, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert job.returncode != 0 and "output directory 'out/build' is relative" in job.stderr
    assert not (tmp_path / "out").exists()


def test_rayjob_runs_the_build_entry_point():
    job = yaml.safe_load((REPO / "deploy" / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    command, subcommand, *_ = job["spec"]["entrypoint"].split()  # the console script: works with pip install alone
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert (command, subcommand) == ("factory", "build") and scripts[command] == "factory.cli:main"
    assert job["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"]  # min/max replicas need the autoscaler
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert any("nvidia.com/gpu" in c["resources"]["limits"] for w in workers for c in w["template"]["spec"]["containers"])
