"""`factory build`: read -> sample+score -> filter -> write, the stages composed on Ray.

`iter_problems` streams the source into shard plans, a runner runs `process_shard` on each (see
`stages`, `runner`), and `BuildDir` stores each shard's files, then assembles the dataset.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from itertools import chain

from factory.build.lock import LockHeld, output_lock
from factory.build.output import BuildDir, BuildError, RejectedRows
from factory.build.runner import run_ray_build
from factory.build.sources import SourceError, iter_problems
from factory.build.spec import BuildSpec, SpecError, load_spec
from factory.build.stages import driver_template
from factory.models.adapter import ModelNotFound, model_revision
from factory.schemas.records import ShardResult, ShardSummary

Log = Callable[[str], None]


def log_line(message: str) -> None:
    print(message, flush=True)


class Progress:
    def __init__(self, total_problems: int, log: Log):
        self.total, self.log = total_problems, log
        self.done = self.traces = self.accepted = 0
        self.started = time.perf_counter()

    def update(self, result: ShardSummary) -> None:
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


Runner = Callable[[BuildSpec, BuildDir, list[int]], Iterator[ShardResult | ShardSummary]]


def build(
    spec: BuildSpec,
    address: str | None = None,
    log: Log = log_line,
    on_shard: Callable[[ShardSummary], None] | None = None,
    runner: Runner | None = None,
    lock: bool = True,
) -> dict:
    """Run (or resume) the build the spec describes; returns the manifest. `on_shard` sees each
    shard's summary once it is stored. The source streams into shard plans (the driver holds one
    shard's problems at a time, and the ids seen); the shards run on Ray (at `address`, else a local
    Ray) unless another `runner` is given, e.g. `runner.run_in_process`: the steps do not know their
    executor. A build holds its output's run lock (`lock.output_lock`: a file beside a directory, a
    lease beside an `s3://` prefix; `lock=False`: the caller holds it)."""
    if not lock:
        return run_build(spec, address, log, on_shard, runner)
    with output_lock(spec.output.dir, log=log):
        return run_build(spec, address, log, on_shard, runner)


def run_build(
    spec: BuildSpec, address: str | None, log: Log, on_shard: Callable[[ShardSummary], None] | None, runner: Runner | None
) -> dict:
    check_model(spec)
    rejected = RejectedRows()  # streamed to the build's directory once it is claimed
    problems = iter_problems(spec.source, driver_template(spec), spec.limit, rejected)
    first = next(problems, None)  # the source's first rows are read and checked before the output is claimed
    if first is None:
        reasons = dict(rejected.by_reason)
        raise BuildError(f"no usable problems: {len(rejected)} rows rejected {reasons}; `factory build --dry-run` shows why")
    out = BuildDir(spec.output.dir)
    out.claim(spec)
    rejected.attach(out.storage)
    sizes, added = out.plan(chain([first], problems), spec.output.shard_size)
    done = out.done_shards()
    todo = [i for i in sorted(sizes) if i not in done]
    log(
        f"[build] {sum(sizes.values())} problems ({len(rejected)} rows rejected, {added} new) in {len(sizes)} shards;"
        f" {len(sizes) - len(todo)} already done"
    )
    if todo:
        progress = Progress(sum(sizes[i] for i in todo), log)
        for item in runner(spec, out, todo) if runner else run_ray_build(spec, out, todo, address):
            summary = out.store(spec, item) if isinstance(item, ShardResult) else item
            out.mark_done(summary)
            progress.update(summary)
            if on_shard:
                on_shard(summary)
    manifest = out.assemble(spec, len(sizes), rejected)
    log(summary_line(manifest, out.location))
    return manifest


def check_model(spec: BuildSpec) -> None:
    """The model must resolve before anything else runs: a typo in a path, or a Hub id this machine
    cannot reach, is one line naming the key, not a traceback from inside Ray."""
    try:
        model_revision(spec.model.id, spec.model.revision)
    except ModelNotFound as err:
        raise BuildError(f"model.id: {err}") from None


def summary_line(manifest: dict, root: str) -> str:
    def mean(key: str) -> str:
        return f"{manifest[key]:.3f}" if manifest[key] is not None else "n/a"

    return (
        f"[build] done: {manifest['problems']} problems, {manifest['traces_sampled']} traces sampled, "
        f"{manifest['accepted']} accepted, {manifest['rejected']['total']} rows rejected {manifest['rejected']['by_reason']}, "
        f"{manifest['filtered']['total']} traces filtered {manifest['filtered']['by_reason']}; "
        f"mean NFE {mean('mean_nfe')}, mean step score {mean('mean_step_score')}; {mean('passes_per_accepted')} passes per accepted"
        f" trace, {mean('duplicate_share')} duplicates, {manifest['unsolved']} problems unsolved -> {root}"
    )


def dry_run(spec: BuildSpec) -> str:
    """The resolved spec and the first problem's filled canvas, decoded: what would be built, computing nothing."""
    check_model(spec)
    template = driver_template(spec)
    rejected = RejectedRows(keep=False)  # counts and an example of each reason, not the rows
    first, usable = None, 0
    for problem in iter_problems(spec.source, template, spec.limit, rejected):
        first, usable = first or problem, usable + 1
    lines = [f"# spec {spec.spec_hash()}", spec.to_yaml(), f"# {usable} usable problems, {len(rejected)} rows rejected"]
    for reason, count in rejected.by_reason.most_common():
        example = rejected.examples[reason]
        lines.append(f"#   {reason}: {count} (e.g. row {example.row}: {example.detail})")
    if first:
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
    ap.add_argument("spec", nargs="?", help="build spec YAML (default: the default build, BuildSpec())")
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
    except (BuildError, SourceError, LockHeld) as err:
        sys.exit(f"factory build: {err}")
