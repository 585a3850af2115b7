"""The runners: the same shards on a Ray actor pool, or in this process. A runner takes the numbers of
the shards to run, reads each one's plan only when it is about to run it, and yields, as each shard
finishes, either its rows (a `ShardResult`, for the driver to store) or, where the actor stored them
itself on shared storage, only its `ShardSummary`. It knows nothing of what a shard does."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from factory.build.output import BuildDir
from factory.build.spec import BuildSpec, ResourceSpec
from factory.build.stages import TraceMaker, process_shard
from factory.schemas.records import ShardPlan, ShardResult, ShardSummary

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


class PlanReader:
    """A Ray actor on the driver's node that hands out one shard's plan at a time: the output may be a
    path only that node sees, and the problems enter the object store only as actors ask for them (at
    most two shards per actor), never the whole source at once."""

    def __init__(self, address: str):
        self.out = BuildDir(address)

    def read(self, shard: int) -> str:
        return self.out.storage.read_text(self.out.plan_file(shard))


class ShardWorker:
    """Ray Data callable class: one model load per actor, then one shard per row of each batch. On
    shared storage it writes the shard's data files itself and hands back only the summary."""

    def __init__(self, spec_json: str, reader, store_at: str | None):
        spec = BuildSpec.model_validate_json(spec_json)
        require_cuda_if_gpus_held(spec.resources)
        self.spec, self.reader = spec, reader
        self.maker = TraceMaker(spec)
        self.out = BuildDir(store_at) if store_at else None

    def __call__(self, batch: dict) -> dict:
        import ray

        results = []
        for shard in batch["shard"]:
            plan = ShardPlan.model_validate_json(ray.get(self.reader.read.remote(int(shard))))
            result = process_shard(self.maker, plan)
            results.append((self.out.store(self.spec, result) if self.out else result).model_dump_json())
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


def run_in_process(spec: BuildSpec, out: BuildDir, shards: list[int], adapter=None) -> Iterator[ShardResult]:
    """The same shards on one model in this process, no Ray: small builds, tests, debugging. `adapter`
    is a model already loaded (else the spec's model is loaded here)."""
    maker = TraceMaker(spec, adapter)
    for shard in shards:
        yield process_shard(maker, out.read_plan(shard))


def run_ray_build(spec: BuildSpec, out: BuildDir, shards: list[int], address: str | None = None) -> Iterator[ShardResult | ShardSummary]:
    """`run_on_ray` on the cluster at `address` (else a local Ray, shut down after the last shard)."""
    started_ray = connect_ray(address)
    try:
        yield from run_on_ray(spec, out, shards)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def run_on_ray(spec: BuildSpec, out: BuildDir, shards: list[int]) -> Iterator[ShardResult | ShardSummary]:
    """Shard results in the order they finish. Ray Data carries only the shards' numbers; each actor
    fetches a shard's problems from the plan reader when it starts it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the build prints its own progress lines
    # Start work only when the whole actor pool is up, so shards spread over every model replica;
    # a cluster that cannot place the pool (even after autoscaling) fails with a clear timeout.
    context.wait_for_min_actors_s = ACTOR_POOL_START_TIMEOUT_S
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    reader = ray.remote(PlanReader).options(num_cpus=0, scheduling_strategy=here, max_restarts=-1, max_task_retries=-1).remote(out.address)
    shared = out.storage.shared
    res = spec.resources
    dataset = ray.data.from_items([{"shard": i} for i in shards], override_num_blocks=len(shards)).map_batches(
        ShardWorker,
        fn_constructor_kwargs={"spec_json": spec.model_dump_json(), "reader": reader, "store_at": out.address if shared else None},
        batch_size=res.batch_size,
        batch_format="numpy",
        # Two shards per actor: one running and the next already queued, so an actor never idles while the
        # driver hands out work (one in flight cost 20% of traces/s here); the pool is whole before work starts.
        compute=ray.data.ActorPoolStrategy(size=min(res.num_actors, len(shards)), max_tasks_in_flight_per_actor=2),
        num_gpus=res.num_gpus_per_actor,
        num_cpus=res.num_cpus_per_actor,
    )
    record = ShardSummary if shared else ShardResult
    try:
        for row in dataset.iter_rows():
            yield record.model_validate_json(row["result"])
    finally:
        ray.kill(reader)
