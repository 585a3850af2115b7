"""`factory bench pipeline`: the whole Ray build against the same shards run in one process."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from factory.build.command import build, spec_from_args
from factory.build.output import BuildError
from factory.build.runner import connect_ray
from factory.build.sources import SourceError, load_problems
from factory.build.spec import BuildSpec
from factory.build.stages import TraceMaker, driver_template, process_shard
from factory.lab.report import DOCS_HELP, emit, markdown_table, write_section
from factory.schemas.records import ShardPlan, ShardSummary


def cli_pipeline(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(
        prog="factory bench pipeline", description="Ray pipeline traces/s against the in-process sampler on the same problems."
    )
    ap.add_argument("spec", nargs="?", help="build spec YAML (default: the default build)")
    ap.add_argument("--problems", type=int, default=384, help="problems to run; a synthetic source generates this many (default 384)")
    ap.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    ap.add_argument("--json", type=Path, help="write the report here too")
    ap.add_argument("--docs", type=Path, help=DOCS_HELP)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="factory-bench-") as tmp:
        args.output, args.limit = tmp, args.problems
        spec = spec_from_args(args)
        if spec.source.kind == "synthetic":
            spec = spec.model_copy(update={"source": spec.source.model_copy(update={"n": args.problems})})
        try:
            report = bench_pipeline(spec, args.address)
        except (BuildError, SourceError) as err:
            sys.exit(f"factory bench pipeline: {err}")
    emit(report, args.json)
    if args.docs:
        write_section("pipeline", pipeline_markdown(report), args.docs)


RATIO_RUNS, RATIO_BASES = ("pipeline", "pipeline_steady"), ("in_process", "in_process_sampler_only")


def pipeline_markdown(report: dict) -> str:
    runs = [{"run": k, **report[k]} for k in ("pipeline", "pipeline_steady", "in_process", "in_process_sampler_only")]
    ratios = [{"pipeline run": p, **{against: report["ratios"][f"{p}/{against}"] for against in RATIO_BASES}} for p in RATIO_RUNS]
    return (
        f"## Pipeline\n\n`factory bench pipeline --problems {report['problems']}` (default spec, {report['num_actors']} actors, "
        f"{report['traces']} traces): the whole Ray build (actor start and model load, sampling, step scoring, filtering, "
        "writing) against the same shards in one process with the model already loaded, doing the same work "
        "(`in_process`) and sampling only (`in_process_sampler_only`, the sampler's share of that run). "
        f"`pipeline_steady` counts the shards that finished after every actor had delivered its first one; the pipeline "
        f"took {report['first_shards_s']} s to get there (Ray worker start, imports, model load, first shard). Sampling took "
        f"{report['in_process_sampler_only']['seconds']} s of the in-process run's {report['in_process']['seconds']} s; the rest "
        "is step scoring (prefix and self-consistency passes) and filtering, which the pipeline does too.\n\n"
        f"{markdown_table(runs, ['run', 'seconds', 'traces', 'traces_per_s'])}\n\n"
        f"Ratios of traces/s:\n\n{markdown_table(ratios, ['pipeline run', *RATIO_BASES])}\n\n"
        f"Utilisation: canvas-passes delivered (sampling and scoring rows, one per row per pass) per second over the bare forward"
        f" pass's {report['forward_canvases_per_s']} canvases/s at batch {report['batch_size']} on the same canvases, in the same run:"
        f" in process {report['utilisation']['in_process']}, pipeline (steady) {report['utilisation']['pipeline_steady']}.\n"
    )


def forward_rate(maker: TraceMaker, problems: list, batch_size: int, passes: int = 5) -> float:
    """Canvases per second of the bare forward pass at the build's batch size, on the build's canvases."""
    template = maker.template
    rows = [template.canvas(template.encode_question(p.question)) for p in problems]
    ids, attention = template.collate([rows[i % len(rows)] for i in range(batch_size)])
    maker.adapter.logits(ids, attention)  # warm-up
    t0 = time.perf_counter()
    for _ in range(passes):
        maker.adapter.logits(ids, attention)
    return passes * batch_size / (time.perf_counter() - t0)


def bench_pipeline(spec: BuildSpec, address: str | None = None) -> dict:
    """Traces/s of the whole Ray build (actor start, sampling, scoring, filtering, writing), whole and
    once every actor is up, over the same shards run in this process with the model already loaded:
    the same work (the actor's `process_shard`), and the sampler alone (its share of that run)."""
    problems, _ = load_problems(spec.source, driver_template(spec), spec.limit)
    size = spec.output.shard_size
    shards = [
        ShardPlan(shard=i, increment=0, date="", problems=problems[i * size : (i + 1) * size]) for i in range(-(-len(problems) // size))
    ]
    if len(shards) <= spec.resources.num_actors:  # the steady state is the shards after each actor's first
        raise BuildError(
            f"bench pipeline needs more shards than actors: {len(problems)} problems make {len(shards)} shards of"
            f" {spec.output.shard_size} for {spec.resources.num_actors} actors; give more --problems"
        )
    maker = TraceMaker(spec)
    canvases = {}  # shard -> canvas-passes it took (sampling and scoring rows, one per row per pass)
    t0 = time.perf_counter()
    traces = 0
    for shard in shards:
        before = maker.sampler.stats["canvases"] + maker.scorer.stats["canvases"]
        traces += process_shard(maker, shard).sampled
        canvases[shard.shard] = maker.sampler.stats["canvases"] + maker.scorer.stats["canvases"] - before
    in_process_s, sampler_s = time.perf_counter() - t0, maker.timings["sample_s"]
    forward = forward_rate(maker, shards[0].problems, spec.sampler.batch_size)
    shard_done: list[tuple[float, int, int]] = []  # (seconds since start, traces so far, shard) as each shard is written

    def on_shard(result: ShardSummary) -> None:
        shard_done.append((time.perf_counter() - t0, (shard_done[-1][1] if shard_done else 0) + result.sampled, result.shard))

    started_ray = connect_ray(address)
    try:
        t0 = time.perf_counter()
        build(spec, log=lambda _: None, on_shard=on_shard)
        pipeline_s = time.perf_counter() - t0
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    (ready_s, ready_traces, _), (last_s, _, _) = shard_done[spec.resources.num_actors - 1], shard_done[-1]
    steady = sum(canvases[shard] for _, _, shard in shard_done[spec.resources.num_actors :])

    def run(seconds: float, count: int = traces) -> dict:
        return {"seconds": round(seconds, 3), "traces": count, "traces_per_s": round(count / seconds, 3)}

    runs = {
        "pipeline": run(pipeline_s),
        "pipeline_steady": run(last_s - ready_s, traces - ready_traces),
        "in_process": run(in_process_s),
        "in_process_sampler_only": run(sampler_s),
    }
    return {
        "problems": len(problems),
        "traces": traces,
        "num_actors": spec.resources.num_actors,
        "batch_size": spec.sampler.batch_size,
        "torch_threads_in_process": torch.get_num_threads(),
        "first_shards_s": round(ready_s, 3),
        **runs,
        "forward_canvases_per_s": round(forward, 1),
        # canvas-passes delivered (sampling + scoring) over what the bare forward pass does in the same time
        "utilisation": {
            "in_process": round(sum(canvases.values()) / in_process_s / forward, 3),
            "pipeline_steady": round(steady / (last_s - ready_s) / forward, 3),
        },
        "ratios": {f"{p}/{b}": round(runs[p]["traces_per_s"] / runs[b]["traces_per_s"], 3) for p in RATIO_RUNS for b in RATIO_BASES},
    }
