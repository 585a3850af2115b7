"""The Ray runner: Ray Data moves shards of problems to a pool of actors, each holding one model,
and streams each finished shard back to the driver. It knows nothing of what a shard does."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch

from factory.build.spec import BuildSpec, ResourceSpec
from factory.build.stages import TraceMaker, process_shard
from schemas.records import Problem, ShardResult

ACTOR_POOL_START_TIMEOUT_S = 1200


def require_cuda_if_gpus_held(resources: ResourceSpec) -> None:
    """An actor given GPUs whose torch cannot see CUDA (a CPU wheel, a driver mismatch) would run an
    8B model on CPU unnoticed: it fails, unless the spec allows the fallback."""
    if resources.num_gpus_per_actor > 0 and not torch.cuda.is_available() and not resources.cpu_fallback:
        raise RuntimeError(
            f"this actor holds {resources.num_gpus_per_actor} GPU(s) (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')}) but torch {torch.__version__} (CUDA {torch.version.cuda}) sees no "
            "CUDA device; install a torch build that matches the node's driver, or set resources.cpu_fallback: true"
        )


class ShardWorker:
    """Ray Data callable class: one model load per actor, then one shard per row of each batch."""

    def __init__(self, spec_json: str):
        spec = BuildSpec.model_validate_json(spec_json)
        require_cuda_if_gpus_held(spec.resources)
        self.maker = TraceMaker(spec)

    def __call__(self, batch: dict) -> dict:
        results = []
        for shard, problems_json in zip(batch["shard"], batch["problems"]):
            problems = [Problem.model_validate(p) for p in json.loads(problems_json)]
            results.append(process_shard(self.maker, int(shard), problems).model_dump_json())
        return {"result": results}


# ---- Ray ------------------------------------------------------------------------------------


def connect_ray(address: str | None = None) -> bool:
    """Join the cluster at `address` or $RAY_ADDRESS, else start a local one. True if this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    local = {"include_dashboard": False} if address == "local" else {}
    ray.init(address=address, log_to_driver=False, **local)
    return True


def run_in_process(spec: BuildSpec, shards: list[tuple[int, list[Problem]]], adapter=None) -> Iterator[ShardResult]:
    """The same shards on one model in this process, no Ray: small builds, tests, debugging. `adapter`
    is a model already loaded (else the spec's model is loaded here)."""
    maker = TraceMaker(spec, adapter)
    for index, problems in shards:
        yield process_shard(maker, index, problems)


def run_ray_build(spec: BuildSpec, shards: list[tuple[int, list[Problem]]], address: str | None = None) -> Iterator[ShardResult]:
    """`run_on_ray` on the cluster at `address` (else a local Ray, shut down after the last shard)."""
    started_ray = connect_ray(address)
    try:
        yield from run_on_ray(spec, shards)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def run_on_ray(spec: BuildSpec, shards: list[tuple[int, list[Problem]]]) -> Iterator[ShardResult]:
    """Shard results in the order they finish."""
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the build prints its own progress lines
    # Start work only when the whole actor pool is up, so shards spread over every model replica;
    # a cluster that cannot place the pool (even after autoscaling) fails with a clear timeout.
    context.wait_for_min_actors_s = ACTOR_POOL_START_TIMEOUT_S
    items = [{"shard": i, "problems": json.dumps([p.model_dump() for p in problems])} for i, problems in shards]
    res = spec.resources
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ShardWorker,
        fn_constructor_kwargs={"spec_json": spec.model_dump_json()},
        batch_size=res.batch_size,
        batch_format="numpy",
        # Two shards per actor: one running and the next already queued, so an actor never idles while the
        # driver hands out work (one in flight cost 20% of traces/s here); the pool is whole before work starts.
        compute=ray.data.ActorPoolStrategy(size=min(res.num_actors, len(shards)), max_tasks_in_flight_per_actor=2),
        num_gpus=res.num_gpus_per_actor,
        num_cpus=res.num_cpus_per_actor,
    )
    for row in dataset.iter_rows():
        yield ShardResult.model_validate_json(row["result"])
