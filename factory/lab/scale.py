"""`factory bench scale`: how the driver's memory, the object store and throughput grow with the source.

Each size is a whole `factory build` of that many synthetic problems, in a fresh driver process (so its
peak RSS is its own), with a tiny random model and a rule that fills the canvas in a fixed few passes:
the model's cost is small, so what the numbers show is the build's own overhead (reading, planning,
handing out shards, storing them, assembling), the part that must not grow with the source.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from factory.lab.report import DOCS_HELP, emit, markdown_table, write_section
from factory.schemas.records import ShardSummary

SIZES = (1_000, 10_000, 100_000)
FAST_RULE = {"rule": "llada", "rule_params": {"steps": 4}}  # four passes fill any canvas


def tiny_model(path: Path) -> Path:
    """A two-layer random masked LM on the embedded tokenizer, saved like a Hub checkpoint."""
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import ModernBertForMaskedLM

    from factory.models.embedded import embedded_config
    from factory.models.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    model = ModernBertForMaskedLM(embedded_config(tokenizer, hidden_size=64, layers=2, heads=2, intermediate=128))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def scale_spec(size: int, model: Path, out: str, shard_size: int, actors: int) -> dict:
    return {
        "source": {"kind": "synthetic", "n": size, "seed": 1},
        "model": {"id": str(model)},
        "sampler": {**FAST_RULE, "strategy": "posterior", "strategy_params": {"rounds": 1}},  # one trace per problem
        "output": {"dir": out, "shard_size": shard_size},
        "resources": {"num_actors": actors},
    }


class ObjectStorePeak:
    """Polls the cluster's object store bytes in use (Ray's raylet memory stats) on a thread."""

    def __init__(self, interval_s: float = 0.25):
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        self.state = get_state_from_address(ray.get_runtime_context().gcs_address)
        self.reply = get_memory_info_reply
        self.peak, self.interval_s = 0, interval_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def poll(self) -> None:
        while not self.stop.is_set():
            try:
                used = self.reply(self.state, timeout_seconds=5).store_stats.object_store_bytes_used
                self.peak = max(self.peak, used)
            except Exception:  # a poll that misses (the raylet busy) is skipped, not fatal
                pass
            self.stop.wait(self.interval_s)

    def close(self) -> int:
        self.stop.set()
        self.thread.join()
        return self.peak


def measure_one(size: int, work: Path, shard_size: int, actors: int, uri: bool) -> dict:
    """One build of `size` problems in this process, which must be fresh: its peak RSS is the result."""
    import ray

    from factory.build.command import build
    from factory.build.runner import connect_ray
    from factory.build.spec import validate_spec

    out = work / f"out-{size}"
    spec = validate_spec(scale_spec(size, work / "tiny-model", out.as_uri() if uri else str(out), shard_size, actors))
    connect_ray(None)
    store = ObjectStorePeak()
    done: list[tuple[float, ShardSummary]] = []  # (seconds since the build started, the shard) as each is stored
    t0 = time.perf_counter()
    manifest = build(spec, log=lambda _: None, on_shard=lambda summary: done.append((time.perf_counter() - t0, summary)))
    total_s = time.perf_counter() - t0
    object_store_peak = store.close()
    ray.shutdown()
    (first_s, first), (last_s, _) = done[0], done[-1]
    rows = sum(s.sampled for _, s in done)
    steady_s = last_s - first_s
    working_s = last_s - (first_s - first.sample_s - first.score_s)  # from when the first shard began (the pool starts whole)
    return {
        "problems": size,
        "shards": manifest["shards"],
        "rows": rows,
        "driver_peak_rss_mb": round(peak_rss_mb(), 1),
        "object_store_peak_mb": round(object_store_peak / 2**20, 2),
        "first_shard_s": round(first_s, 2),
        "build_s": round(total_s, 2),
        "rows_per_s": round(rows / total_s, 1),
        # after the first shard: the steady rate, without reading, planning and the actor pool's start
        "rows_per_s_after_first_shard": round((rows - first.sampled) / steady_s, 1) if steady_s > 0 else None,
        # the actors' share of their working time spent sampling and scoring: near 1, the build's own overhead keeps up
        "actor_busy": round(sum(s.sample_s + s.score_s for _, s in done) / (actors * working_s), 3),
    }


PLAN_SIZES = (1_000, 1_000_000)


def plan_source(size: int, work: Path) -> Path:
    """A local JSONL source of `size` synthetic problems, written once (outside any measured process)."""
    from factory.synthetic import problems as synthetic

    path = work / f"source-{size}.jsonl"
    if not path.exists():
        with path.open("w") as file:
            for p in synthetic.generate(size, 1, synthetic.SyntheticConfig(2, 6)):
                file.write(json.dumps({"question": p.question, "answer": str(p.answer)}) + "\n")
    return path


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started its program. Linux keeps ru_maxrss across
    exec, so a child forked from a big parent would report the parent's peak; VmHWM starts afresh."""
    status = Path("/proc/self/status")
    if status.exists():
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_plan(size: int, work: Path, shard_size: int) -> dict:
    """`factory build --dry-run`, then the plan phase of a build, over a local source of `size` rows, in
    this fresh process: its peak RSS after each."""
    from factory.build.command import dry_run
    from factory.build.output import BuildDir
    from factory.build.sources import iter_problems
    from factory.build.spec import validate_spec
    from factory.build.stages import driver_template

    out = work / f"plan-{size}"
    shutil.rmtree(out, ignore_errors=True)
    spec = validate_spec(
        {"source": {"kind": "local", "path": str(plan_source(size, work))}, "output": {"dir": str(out), "shard_size": shard_size}}
    )
    t0 = time.perf_counter()
    dry_run(spec)
    dry_rss, dry_s = peak_rss_mb(), time.perf_counter() - t0
    t0 = time.perf_counter()
    build_dir = BuildDir(out)
    build_dir.claim(spec)
    shards, added = build_dir.plan(iter_problems(spec.source, driver_template(spec), spec.limit), shard_size)
    return {
        "rows": size,
        "problems": added,
        "shards": len(shards),
        "dry_run_peak_rss_mb": round(dry_rss, 1),
        "dry_run_s": round(dry_s, 1),
        "plan_peak_rss_mb": round(peak_rss_mb(), 1),
        "plan_s": round(time.perf_counter() - t0, 1),
    }


def in_fresh_process(args: list[str], what: str) -> dict:
    """`factory.lab.scale ARGS` in a new interpreter (its peak RSS its own), and the JSON line it prints last."""
    command = [sys.executable, "-m", "factory.lab.scale", *args]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    if done.returncode:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_plan(sizes: list[int], work: Path, shard_size: int) -> dict:
    runs = []
    for size in sizes:
        plan_source(size, work)
        args = ["--plan-one", str(size), "--work", str(work), "--shard-size", str(shard_size)]
        runs.append(in_fresh_process(args, f"the {size}-row plan"))
    first, last = runs[0], runs[-1]
    return {
        "shard_size": shard_size,
        "runs": runs,
        "ratios": {
            f"{key} {last['rows']}/{first['rows']}": round(last[key] / first[key], 3) for key in ("dry_run_peak_rss_mb", "plan_peak_rss_mb")
        },
    }


def plan_markdown(report: dict) -> str:
    sizes = " ".join(str(r["rows"]) for r in report["runs"])
    ratios = ", ".join(f"{k}: {v}" for k, v in report["ratios"].items())
    columns = ["rows", "problems", "shards", "dry_run_peak_rss_mb", "dry_run_s", "plan_peak_rss_mb", "plan_s"]
    return (
        "## Planning a large source (scale-plan)\n\n"
        f"`factory bench scale --plan --sizes {sizes} --shard-size {report['shard_size']}`: `factory build --dry-run`, then a "
        "build's plan phase (read, check, dedupe, write the shard plans), over a local JSONL source of synthetic problems, "
        "each size in a fresh process. The driver keeps only the problem ids it has seen. Target: the peak RSS at the "
        "largest size within 1.5x of the smallest.\n\n"
        f"{markdown_table(report['runs'], columns)}\n\nRatios (largest/smallest, one run): {ratios}.\n"
    )


def bench_scale(sizes: list[int], work: Path, shard_size: int, actors: int, uri: bool) -> dict:
    """Each size in its own driver process, the sizes one after another."""
    runs = []
    for size in sizes:
        args = ["--one", str(size), "--work", str(work), "--shard-size", str(shard_size), "--actors", str(actors)]
        runs.append(in_fresh_process(args + (["--uri"] if uri else []), f"the {size}-problem build"))
    first, last = runs[0], runs[-1]
    return {
        "shard_size": shard_size,
        "num_actors": actors,
        "storage": "uri (actors write their own files)" if uri else "path (the driver writes)",
        "rule": FAST_RULE,
        "runs": runs,
        "ratios": {
            f"driver_peak_rss {last['problems']}/{first['problems']}": round(last["driver_peak_rss_mb"] / first["driver_peak_rss_mb"], 3),
            f"rows_per_s {last['problems']}/{first['problems']}": round(last["rows_per_s"] / first["rows_per_s"], 3),
        },
    }


def scale_markdown(report: dict, section: str) -> str:
    columns = ["problems", "shards", "rows", "driver_peak_rss_mb", "object_store_peak_mb", "first_shard_s", "build_s"]
    columns += ["rows_per_s", "rows_per_s_after_first_shard", "actor_busy"]
    ratios = ", ".join(f"{k}: {v}" for k, v in report["ratios"].items())
    sizes = " ".join(str(r["problems"]) for r in report["runs"])
    flags = f"--sizes {sizes} --shard-size {report['shard_size']} --actors {report['num_actors']}"
    flags += " --uri" if report["storage"].startswith("uri") else ""
    return f"""## Scale ({section})

`factory bench scale {flags} --section {section}`: a whole build of each size in a fresh driver process,
with a two-layer random model, `{report["rule"]["rule"]}` at {report["rule"]["rule_params"]["steps"]} passes, k = 1,
storage: {report["storage"]}. Rows are traces sampled (accepted or filtered); `actor_busy` is the actors' share of their time, from
the start of the first shard to the end of the last, spent sampling and scoring (near 1: the build's
own overhead keeps up with them). Targets: the driver's peak RSS at
the largest size within 1.5× of the smallest; rows/s not falling with size.

{markdown_table(report["runs"], columns)}

Ratios (largest/smallest, one run): {ratios}. Fewer rows than problems: source rows rejected (the
generator repeats a problem now and then, `duplicate_problem`). With only a few shards, the shards after
the first ran mostly beside it, so `rows_per_s_after_first_shard` of the smallest size overstates the
steady rate: compare it between the larger sizes. `first_shard_s` holds the source's read and plan.
"""


def cli_scale(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="factory bench scale", description="Driver memory, object store and rows/s at growing source sizes.")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help=f"problems per build (default {' '.join(map(str, SIZES))})")
    ap.add_argument("--shard-size", type=int, default=256, help="problems per shard (default 256)")
    ap.add_argument("--actors", type=int, default=2, help="model replicas (default 2)")
    ap.add_argument("--uri", action="store_true", help="write the output through a file:// URI: the actors store their own shards")
    ap.add_argument("--work", type=Path, default=Path("runs/scale"), help="where the builds and the tiny model go (default runs/scale)")
    ap.add_argument("--section", default="scale", help="the docs section to write (default scale)")
    ap.add_argument("--json", type=Path, help="write the report here too")
    ap.add_argument("--plan", action="store_true", help="only the dry run and the plan phase, of local sources (default sizes 1k, 1M)")
    ap.add_argument("--docs", type=Path, help=DOCS_HELP)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one size, in this fresh process
    ap.add_argument("--plan-one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.plan_one:
        print(json.dumps(measure_plan(args.plan_one, work, args.shard_size)))
        return
    if args.plan:
        sizes = args.sizes if args.sizes != list(SIZES) else list(PLAN_SIZES)
        report = bench_plan(sizes, work, args.shard_size)
        emit(report, args.json)
        if args.docs:
            write_section("scale-plan", plan_markdown(report), args.docs)
        return
    if args.one:
        print(json.dumps(measure_one(args.one, work, args.shard_size, args.actors, args.uri)))
        return
    tiny_model(work / "tiny-model")  # made here, so no measured process holds its making
    for size in args.sizes:  # every run starts from an empty output
        shutil.rmtree(work / f"out-{size}", ignore_errors=True)
    report = bench_scale(args.sizes, work, args.shard_size, args.actors, args.uri)
    emit(report, args.json)
    if args.docs:
        write_section(args.section, scale_markdown(report, args.section), args.docs)


if __name__ == "__main__":
    cli_scale(sys.argv[1:])
