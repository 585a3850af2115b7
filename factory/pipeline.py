"""`factory build`: read → sample+score → filter → write, composed with Ray Data.

The stages are plain code, usable without Ray: `load_problems` (read), `TraceMaker` (sample k
posterior traces per problem and score their steps), `filter_traces`, and `BuildDir` (resumable
shard parts, then the dataset). Ray Data only moves shards of problems to a pool of actors, each
holding one model, and streams each finished shard back to the driver, which writes it.

Determinism: a problem's sampler seed derives from (spec seed, problem id) and a trace's id from
(spec hash, problem id, sample index), so neither depends on sharding, actor count or resume.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from factory.bench import emit, markdown_table, write_section
from factory.checks import filter_traces, step_labels
from factory.models.adapter import ModelAdapter
from factory.models.adapter import load_tokenizer as load_model_tokenizer
from factory.output import BuildDir, BuildError
from factory.provenance import code_version
from factory.sampling.sampler import CanvasSampler, Request, SampleResult, seed_for
from factory.scoring import LABEL_SOURCES, StepScorer, Trace, TraceScores
from factory.sources.registry import SourceError, load_problems
from factory.template import ReasoningTemplate
from schemas.records import Problem, ShardResult, TraceRow, WorkerInfo
from schemas.spec import BuildSpec, ModelSpec, ResourceSpec, SpecError, load_spec

ACTOR_POOL_START_TIMEOUT_S = 1200

Log = Callable[[str], None]


def log_line(message: str) -> None:
    print(message, flush=True)


# ---- identities and seeds ------------------------------------------------------------------


def problem_seed(seed: int, problem_id: str) -> int:
    """A problem's sampler seed: fixed by the spec seed and the problem, not by where it runs."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{problem_id}".encode()).digest()[:4], "big")


def trace_id(spec_hash: str, problem_id: str, sample_index: int) -> str:
    return hashlib.sha256(f"{spec_hash}:{problem_id}:{sample_index}".encode()).hexdigest()[:16]


def plan_shards(problems: list[Problem], shard_size: int) -> list[list[Problem]]:
    return [problems[i : i + shard_size] for i in range(0, len(problems), shard_size)]


# ---- read -----------------------------------------------------------------------------------


def load_tokenizer(model: ModelSpec):
    """The model's tokenizer without its weights: the driver checks rows and renders the dry run with it."""
    return load_model_tokenizer(model.id, model.kind, model.revision, model.trust_remote_code)


def driver_template(spec: BuildSpec) -> ReasoningTemplate:
    return ReasoningTemplate(load_tokenizer(spec.model), spec.template.to_config())


# ---- sample + score ---------------------------------------------------------------------------


class TraceMaker:
    """Samples k posterior traces per problem and scores their steps; holds one model."""

    def __init__(self, spec: BuildSpec, adapter: ModelAdapter | None = None):
        self.spec, self.spec_hash = spec, spec.spec_hash()
        m = spec.model
        self.adapter = adapter or ModelAdapter.load(m.id, m.kind, m.revision, m.trust_remote_code)
        self.template = ReasoningTemplate(self.adapter.tokenizer, spec.template.to_config())
        self.sampler = CanvasSampler(self.adapter, self.template, spec.sampler.to_config())
        self.scorer = StepScorer(self.adapter, self.template, spec.scoring.estimator, spec.scoring.batch_size)
        self.timings = {"sample_s": 0.0, "score_s": 0.0}

    def requests(self, problems: list[Problem]) -> list[Request]:
        """k answer-clamped canvases per problem, each seeded from (spec seed, problem id, sample index)."""
        requests = []
        for i, p in enumerate(problems):
            question, answer = self.template.encode_question(p.question), self.template.encode_answer(p.gold_answer)
            base = problem_seed(self.spec.seed, p.problem_id)
            requests += [Request(question, answer_ids=answer, seed=seed_for(base, 0, j), key=(i, j)) for j in range(self.spec.sampler.k)]
        return requests

    def __call__(self, problems: list[Problem]) -> list[TraceRow]:
        requests = self.requests(problems)
        t0 = time.perf_counter()
        samples = self.sampler.run(requests)
        t1 = time.perf_counter()
        traces = [Trace(r.question_ids, s.reasoning_ids, r.answer_ids) for r, s in zip(requests, samples)]
        scores = self.scorer.score(traces, self_consistency=self.spec.scoring.self_consistency)
        self.timings["sample_s"] += t1 - t0
        self.timings["score_s"] += time.perf_counter() - t1
        return [self.trace_row(problems[r.key[0]], r.key[1], s, sc) for r, s, sc in zip(requests, samples, scores)]

    def trace_row(self, problem: Problem, sample_index: int, sample: SampleResult, scores: TraceScores) -> TraceRow:
        tpl, scoring = self.template, self.spec.scoring
        steps = tpl.split_steps(sample.reasoning_ids)
        label_scores = getattr(scores, LABEL_SOURCES[scoring.label_source])
        return TraceRow(
            **problem.model_dump(),
            trace_id=trace_id(self.spec_hash, problem.problem_id, sample_index),
            sample_index=sample_index,
            reasoning=tpl.reasoning_text(sample.reasoning_ids),
            steps=steps,
            answer=tpl.parse_answer(sample.answer_ids),
            nfe=sample.nfe,
            exited_early=sample.exited_early,
            step_scores=scores.step_scores,
            prefix_logp=scores.prefix_logp,
            self_consistency=scores.self_consistency,
            final_score=scores.final_score,
            min_step_score=scores.min_step_score,
            step_labels=step_labels(steps, problem.gold_answer, label_scores, scoring.label_threshold),
            scoring_passes=scores.forward_passes,
            model_id=self.adapter.model_id,
            model_revision=self.adapter.revision,
            sampler=self.spec.sampler.model_dump_json(),
            scorer=scoring.model_dump_json(),
            seed=problem_seed(self.spec.seed, problem.problem_id),
            code_version=code_version(),
            spec_hash=self.spec_hash,
        )


# ---- one shard: sample + score + filter ------------------------------------------------------


def worker_info(device: str) -> WorkerInfo:
    import ray

    gpu_ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", []) if ray.is_initialized() else []
    return WorkerInfo(
        actor=f"{socket.gethostname()}:{os.getpid()}",
        device=device,
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        gpu_ids=[str(g) for g in gpu_ids],
    )


def process_shard(maker: TraceMaker, shard: int, problems: list[Problem]) -> ShardResult:
    before = dict(maker.timings)
    traces = maker(problems)
    kept, filtered = filter_traces(traces, maker.spec.filters)
    return ShardResult(
        shard=shard,
        problems=len(problems),
        sampled=len(traces),
        accepted=len(kept),
        filtered=dict(Counter(t.filter_reason for t in filtered)),
        nfe_sum=sum(t.nfe for t in traces),
        step_score_sum=sum(sum(t.step_scores) for t in traces),
        step_count=sum(len(t.step_scores) for t in traces),
        sample_s=maker.timings["sample_s"] - before["sample_s"],
        score_s=maker.timings["score_s"] - before["score_s"],
        worker=worker_info(str(maker.adapter.device)),
        traces=kept,
        filtered_traces=filtered,
    )


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


class Progress:
    def __init__(self, total_problems: int, log: Log):
        self.total, self.log = total_problems, log
        self.done = self.traces = self.accepted = 0
        self.started = time.perf_counter()

    def update(self, result: ShardResult) -> None:
        self.done += result.problems
        self.traces += result.sampled
        self.accepted += result.accepted
        elapsed = time.perf_counter() - self.started
        eta = elapsed / self.done * (self.total - self.done)
        self.log(
            f"[build] shard {result.shard}: {self.done}/{self.total} problems, {self.traces} traces "
            f"({self.accepted} accepted), {self.traces / elapsed:.2f} traces/s, ETA {eta:.0f}s"
        )


# ---- the build ------------------------------------------------------------------------------


def build(spec: BuildSpec, address: str | None = None, log: Log = log_line, on_shard: Callable[[ShardResult], None] | None = None) -> dict:
    """Run (or resume) the build the spec describes; returns the manifest. `on_shard` sees each
    shard's result once it is written."""
    problems, rejected = load_problems(spec.source, driver_template(spec), spec.limit)
    if not problems:
        reasons = dict(Counter(r.reason for r in rejected))
        raise BuildError(f"no usable problems: {len(rejected)} rows rejected {reasons}; `factory build --dry-run` shows why")
    out = BuildDir(spec.output.dir)
    out.claim(spec, [p.problem_id for p in problems])
    shards = plan_shards(problems, spec.output.shard_size)
    done = out.done_shards()
    todo = [(i, shard) for i, shard in enumerate(shards) if i not in done]
    log(f"[build] {len(problems)} problems ({len(rejected)} rows rejected) in {len(shards)} shards; {len(shards) - len(todo)} already done")
    if todo:
        started_ray = connect_ray(address)
        try:
            progress = Progress(sum(len(s) for _, s in todo), log)
            for result in run_on_ray(spec, todo):
                out.write_shard(result)
                progress.update(result)
                if on_shard:
                    on_shard(result)
        finally:
            if started_ray:
                import ray

                ray.shutdown()
    manifest = out.assemble(spec, len(shards), rejected)
    log(summary_line(manifest, out.root))
    return manifest


def summary_line(manifest: dict, root: Path) -> str:
    def mean(key: str) -> str:
        return f"{manifest[key]:.3f}" if manifest[key] is not None else "n/a"

    return (
        f"[build] done: {manifest['problems']} problems, {manifest['traces_sampled']} traces sampled, "
        f"{manifest['accepted']} accepted, {manifest['rejected']['total']} rows rejected {manifest['rejected']['by_reason']}, "
        f"{manifest['filtered']['total']} traces filtered {manifest['filtered']['by_reason']}; "
        f"mean NFE {mean('mean_nfe')}, mean step score {mean('mean_step_score')} -> {root}"
    )


def dry_run(spec: BuildSpec) -> str:
    """The resolved spec and the first problem's filled canvas, decoded: what would be built, computing nothing."""
    template = driver_template(spec)
    problems, rejected = load_problems(spec.source, template, spec.limit)
    lines = [f"# spec {spec.spec_hash()}", spec.to_yaml(), f"# {len(problems)} usable problems, {len(rejected)} rows rejected"]
    for reason, count in Counter(r.reason for r in rejected).most_common():
        example = next(r for r in rejected if r.reason == reason)
        lines.append(f"#   {reason}: {count} (e.g. row {example.row}: {example.detail})")
    if problems:
        first = problems[0]
        canvas = template.canvas(template.encode_question(first.question), None, template.encode_answer(first.gold_answer))
        lines += [f"# first canvas ({len(canvas)} tokens, reasoning masked, gold answer clamped):", template.tokenizer.decode(canvas)]
    return "\n".join(lines)


# ---- command line ---------------------------------------------------------------------------


def spec_from_args(args: argparse.Namespace) -> BuildSpec:
    try:
        return load_spec(args.spec).with_overrides(output_dir=args.output, limit=args.limit)
    except SpecError as err:
        sys.exit(str(err))


def cli_build(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="factory build", description="Build a scored, filtered reasoning dataset from a spec.")
    ap.add_argument("spec", nargs="?", help="build spec YAML (default: the shipped factory/specs/default.yaml)")
    ap.add_argument("--output", help="output directory (overrides output.dir)")
    ap.add_argument("--limit", type=int, help="use at most N problems (overrides limit)")
    ap.add_argument("--dry-run", action="store_true", help="print the resolved spec and the first filled canvas; run nothing")
    ap.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    args = ap.parse_args(argv)
    spec = spec_from_args(args)
    try:
        if args.dry_run:
            print(dry_run(spec))
        else:
            build(spec, args.address)
    except (BuildError, SourceError) as err:
        sys.exit(f"factory build: {err}")


def cli_bench(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(
        prog="factory bench pipeline", description="Ray pipeline traces/s against the in-process sampler on the same problems."
    )
    ap.add_argument("spec", nargs="?", help="build spec YAML (default: the shipped one)")
    ap.add_argument("--problems", type=int, default=384, help="problems to run; a synthetic source generates this many (default 384)")
    ap.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    ap.add_argument("--json", type=Path, help="write the report here too")
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
    write_section("pipeline", pipeline_markdown(report))


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
        f"Ratios of traces/s:\n\n{markdown_table(ratios, ['pipeline run', *RATIO_BASES])}\n"
    )


def bench_pipeline(spec: BuildSpec, address: str | None = None) -> dict:
    """Traces/s of the whole Ray build (actor start, sampling, scoring, filtering, writing), whole and
    once every actor is up, over the same shards run in this process with the model already loaded:
    the same work (the actor's `process_shard`), and the sampler alone (its share of that run)."""
    problems, _ = load_problems(spec.source, driver_template(spec), spec.limit)
    shards = plan_shards(problems, spec.output.shard_size)
    if len(shards) <= spec.resources.num_actors:  # the steady state is the shards after each actor's first
        raise BuildError(
            f"bench pipeline needs more shards than actors: {len(problems)} problems make {len(shards)} shards of"
            f" {spec.output.shard_size} for {spec.resources.num_actors} actors; give more --problems"
        )
    maker = TraceMaker(spec)
    t0 = time.perf_counter()
    traces = sum(process_shard(maker, i, shard).sampled for i, shard in enumerate(shards))
    in_process_s, sampler_s = time.perf_counter() - t0, maker.timings["sample_s"]
    shard_done: list[tuple[float, int]] = []  # (seconds since start, traces so far) as each shard is written

    def on_shard(result: ShardResult) -> None:
        shard_done.append((time.perf_counter() - t0, (shard_done[-1][1] if shard_done else 0) + result.sampled))

    started_ray = connect_ray(address)
    try:
        t0 = time.perf_counter()
        build(spec, log=lambda _: None, on_shard=on_shard)
        pipeline_s = time.perf_counter() - t0
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    (ready_s, ready_traces), (last_s, _) = shard_done[spec.resources.num_actors - 1], shard_done[-1]

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
        "torch_threads_in_process": torch.get_num_threads(),
        "first_shards_s": round(ready_s, 3),
        **runs,
        "ratios": {f"{p}/{b}": round(runs[p]["traces_per_s"] / runs[b]["traces_per_s"], 3) for p in RATIO_RUNS for b in RATIO_BASES},
    }
