"""The output directory of a build: resumable shards, then a Hugging Face dataset.

    OUT/_build/spec.json                  the spec and its hash; a rerun with another spec is refused
    OUT/_build/precision.json             the precision the model ran in (model.dtype auto resolves per actor)
    OUT/_build/shards/00003.plan.json     shard 3's problems and the increment that added them, written before it runs
    OUT/_build/shards/00003.done.json     its completion marker (a ShardSummary: counts, its data files, quarantined problems)
    OUT/_build/rejected/000000.jsonl      the source's rejected rows, a chunk at a time as the source streams
    OUT/data/{traces,filtered,sft,prm}/train-00003-<digest>.parquet   one file per shard, named by its rows' digest
    OUT/data/rejected/train-00000-<digest>.parquet
    OUT/README.md                          dataset card; its `configs:` front matter names the data files
    OUT/manifest.json                      counts: problems, accepted, rejected and filtered by reason, rows per config, means, fingerprint

OUT is a local directory or a URI (see `storage`). A shard's data files are written by whoever holds
its rows (the actor itself on shared storage, else the driver), each atomically; the driver writes the
marker once they are all in place, so a shard is either done or to redo, and the card and manifest are
assembled from the markers alone, without reading a row.

Incremental: a problem is known by its content digest (`problem_id`). A rerun over a source that
gained rows plans only the problems no shard holds yet, as new shards after the existing ones; rows
that moved or repeat change nothing. A finished shard's rows, and so its files' names and bytes, never
change, so a publish of the grown build only adds files.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import yaml

from factory.build.provenance import code_version
from factory.build.spec import BuildSpec
from factory.build.storage import Storage
from factory.core.scoring import LABEL_SOURCES
from factory.core.strategies import STRATEGIES
from factory.models.adapter import model_revision
from factory.schemas.arrow import arrow_schema, to_table
from factory.schemas.records import ChatMessage, PRMRow, Problem, Rejected, SFTRow, ShardPlan, ShardResult, ShardSummary, TraceRow, Unsolved

CONFIGS = {"traces": TraceRow, "filtered": TraceRow, "sft": SFTRow, "prm": PRMRow, "unsolved": Unsolved, "rejected": Rejected}
SHARD_CONFIGS = ("traces", "filtered", "sft", "prm", "unsolved")  # a file per shard; `rejected` is one file for the build
SHARDS = "_build/shards"
STATE = "_build/spec.json"
PRECISION = "_build/precision.json"


class BuildError(RuntimeError):
    """A build that must not start, e.g. an output directory made from another spec."""


def write_text(path: Path, text: str) -> None:
    """One local file, written atomically."""
    Storage(path.parent).write_text(path.name, text)


# A data file's name: its shard and a digest of its rows, so a shard's file keeps its name while its rows
# stay, and a file with other rows never takes an old name.
DATA_FILE = re.compile(r"data/[a-z]+/train-\d{5}-[0-9a-f]{12}\.parquet")
DATA_FILE_GLOB = "train-?????-????????????.parquet"


def data_file(config: str, index: int, rows: list) -> str:
    digest = hashlib.sha256("".join(r.model_dump_json() for r in rows).encode()).hexdigest()[:12]
    return f"data/{config}/train-{index:05d}-{digest}.parquet"


# ---- the derived configs -------------------------------------------------------------------


def sft_row(trace: TraceRow, spec: BuildSpec) -> SFTRow:
    """The prompt is the question alone: the answer the trace was conditioned on is never shown."""
    template = spec.template
    answer = f"{trace.reasoning}\n{template.delimiter}{trace.gold_answer}{template.answer_close}."
    messages = [ChatMessage(role="user", content=trace.question), ChatMessage(role="assistant", content=answer)]
    return SFTRow(messages=messages, trace_id=trace.trace_id, problem_id=trace.problem_id)


def prm_rows(traces: list[TraceRow], spec: BuildSpec) -> list[PRMRow]:
    """The accepted traces, and as negatives the filtered ones with a step labelled bad (whatever
    filter caught them first; a duplicate never): a PRM learns from both."""
    source = LABEL_SOURCES[spec.scoring.label_source]
    negative = lambda t: t.filter_reason != "duplicate" and not all(t.step_labels)  # noqa: E731
    return [prm_row(t, getattr(t, source)) for t in traces if t.steps and (t.filter_reason is None or negative(t))]


def prm_row(trace: TraceRow, label_scores: list[float]) -> PRMRow:
    return PRMRow(
        prompt=trace.question,
        completions=trace.steps,
        labels=trace.step_labels,
        label_scores=label_scores,
        accepted=trace.filter_reason is None,
        trace_id=trace.trace_id,
        problem_id=trace.problem_id,
    )


def derive(spec: BuildSpec, result: ShardResult) -> dict[str, list]:
    """A shard's rows of every config but `rejected`."""
    traces, filtered = result.traces, result.filtered_traces
    sft = [sft_row(t, spec) for t in traces]
    return {"traces": traces, "filtered": filtered, "sft": sft, "prm": prm_rows(traces + filtered, spec), "unsolved": result.unsolved}


# ---- the directory -------------------------------------------------------------------------


class BuildDir:
    def __init__(self, location: str | Path):
        self.storage = Storage(location)
        self.location = self.storage.location
        self.precision: str | None = None  # the build's precision, once read or recorded (`check_precision`)

    @property
    def address(self) -> str:
        """How any process reaches this directory: the URI, or the absolute path (another process's
        working directory may differ)."""
        return self.location if self.storage.shared else self.storage.base

    def plan_file(self, shard: int) -> str:
        return f"{SHARDS}/{shard:05d}.plan.json"

    def marker(self, shard: int) -> str:
        return f"{SHARDS}/{shard:05d}.done.json"

    def claim(self, spec: BuildSpec) -> None:
        """Start or resume a build of `spec` here; refuse a directory that holds anything else. The
        source may have grown (see `plan`), but the spec, the code and the model's weights must be the
        ones that made the rows already here: one dataset never mixes two."""
        wanted = {
            "spec_hash": spec.spec_hash(),
            "shard_size": spec.output.shard_size,
            "code_version": code_version(),
            # the spec names a model (a path, 'embedded'); new weights behind the same name must not resume
            "model_revision": model_revision(spec.model.id, spec.model.revision),
        }
        if self.storage.exists(STATE):
            found = json.loads(self.storage.read_text(STATE))
            for key, value in wanted.items():
                if found.get(key) != value:
                    raise BuildError(
                        f"{self.location} holds a build with {key} {found.get(key)}, but this one has {key} {value}; a dataset"
                        f" never mixes two: start a new version with another --output (e.g. {self.storage.name}-v2)"
                    )
        elif not self.storage.is_empty():
            raise BuildError(f"{self.location} is not empty and holds no factory build; choose another --output")
        else:
            self.storage.write_text(STATE, json.dumps({**wanted, "spec": spec.model_dump(mode="json")}, indent=2))
        self.storage.remove_temporaries()  # from a writer killed mid-file

    def read_plan(self, shard: int) -> ShardPlan:
        return ShardPlan.model_validate_json(self.storage.read_text(self.plan_file(shard)))

    def plan(self, problems: Iterable[Problem], shard_size: int) -> tuple[dict[int, int], int]:
        """Plan the problems no shard holds yet as new shards after the existing ones, each written
        as soon as it fills (so a killed run redoes exactly the shards without a marker); returns
        every shard's problem count and how many problems were added. `problems` is consumed as it
        streams: only one shard's problems are held at a time. Problems are known by content: a row
        that moved is none. `problems` must not repeat one (`iter_problems` rejects a repeat), so only
        the ids of earlier plans are held here, not a second index of the stream's. Each plan names its
        increment."""
        known: set[str] = set()
        sizes: dict[int, int] = {}
        increment = 0
        for name in self.storage.list(SHARDS, "*.plan.json"):
            plan = self.read_plan(int(name.split(".")[0]))
            known.update(p.problem_id for p in plan.problems)
            sizes[plan.shard] = len(plan.problems)
            increment = max(increment, plan.increment + 1)
        date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        chunk: list[Problem] = []
        added = 0

        def write_plan() -> None:
            shard = max(sizes, default=-1) + 1
            plan = ShardPlan(shard=shard, increment=increment, date=date, problems=chunk)
            self.storage.write_text(self.plan_file(shard), plan.model_dump_json())
            sizes[shard] = len(chunk)

        for problem in problems:
            if problem.problem_id in known:
                continue
            chunk.append(problem)
            added += 1
            if len(chunk) == shard_size:
                write_plan()
                chunk = []
        if chunk:
            write_plan()
        return sizes, added

    def done_shards(self) -> set[int]:
        return {int(name.split(".")[0]) for name in self.storage.list(SHARDS, "*.done.json")}

    def store(self, spec: BuildSpec, result: ShardResult) -> ShardSummary:
        """Write a shard's data files (each atomically; one that exists already holds these rows, see
        `write_rows`) and return its summary. Runs wherever the rows are: an actor on shared storage,
        else the driver."""
        rows = derive(spec, result)
        files = {name: self.write_rows(name, config_rows, data_file(name, result.shard, config_rows)) for name, config_rows in rows.items()}
        stats = result.model_dump(exclude={"traces", "filtered_traces", "unsolved"})
        return ShardSummary(**stats, files=files, rows={name: len(config_rows) for name, config_rows in rows.items()})

    def mark_done(self, summary: ShardSummary) -> None:
        """The shard's completion marker, written after its files are in place, once its precision
        is the build's."""
        self.check_precision(summary.worker.dtype)
        self.storage.write_text(self.marker(summary.shard), summary.model_dump_json(indent=2))

    def check_precision(self, dtype: str) -> None:
        """One build's rows come from one precision. `model.dtype: auto` resolves on each actor, so
        the first shard's precision is recorded and a shard made in another (a resume on other
        hardware, a mixed pool) is refused before it is marked done."""
        if self.precision is None and self.storage.exists(PRECISION):
            self.precision = json.loads(self.storage.read_text(PRECISION))["dtype"]
        elif self.precision is None:
            self.storage.write_text(PRECISION, json.dumps({"dtype": dtype}))
            self.precision = dtype
        found = self.precision  # read once per run, not once per shard
        if found != dtype:
            raise BuildError(
                f"{self.location} holds rows made in {found}, but this actor ran the model in {dtype}; a dataset never mixes"
                f" two: resume it where the model runs in {found}, or start a new version with another --output"
            )

    def write_shard(self, spec: BuildSpec, result: ShardResult) -> ShardSummary:
        summary = self.store(spec, result)
        self.mark_done(summary)
        return summary

    def summaries(self, num_shards: int) -> list[ShardSummary]:
        return [ShardSummary.model_validate_json(self.storage.read_text(self.marker(i))) for i in range(num_shards)]

    def assemble(self, spec: BuildSpec, num_shards: int, rejected: RejectedRows | list[Rejected]) -> dict:
        """Write the card and manifest from the shards' markers (no row is read again) and the
        rejected rows (streamed from their chunks); returns the manifest. Data files no marker names
        (an earlier assembly's, or a redone shard's orphan) are removed only after the card points at
        the named ones, so a kill at any moment leaves a directory that loads. Problems quarantined
        while sampling join the source's rejected rows."""
        self.storage.remove_temporaries()  # a writer killed mid-file (an actor on shared storage) leaves one
        summaries = self.summaries(num_shards)
        rejected = rejected if isinstance(rejected, RejectedRows) else RejectedRows(rejected)
        for row in (row for s in summaries for row in s.quarantined):
            rejected.append(row)
        files = {name: [s.files[name] for s in summaries] for name in SHARD_CONFIGS}
        counts = {name: sum(s.rows[name] for s in summaries) for name in SHARD_CONFIGS}
        files["rejected"] = [self.write_rejected(rejected)]
        counts["rejected"] = len(rejected)
        # The build's identity (manifest, card, publish tag, fine-tuned models' cards): a digest of every
        # file name, each of which carries its rows' digest.
        fingerprint = hashlib.sha256("\n".join(n for names in files.values() for n in names).encode()).hexdigest()[:12]
        manifest = build_manifest(spec, summaries, rejected, files, counts)
        manifest |= {"fingerprint": fingerprint, "increments": increments(summaries)}
        # The card first, the manifest last: a finished manifest always has its card (publish reads both).
        self.storage.write_text("README.md", dataset_card(spec, manifest))
        self.storage.write_text("manifest.json", json.dumps(manifest, indent=2) + "\n")
        written = {name for names in files.values() for name in names}
        for config in CONFIGS:  # only files the factory names, never a user's own
            for name in self.storage.list(f"data/{config}", DATA_FILE_GLOB):
                if f"data/{config}/{name}" not in written:
                    self.storage.delete(f"data/{config}/{name}")
        return manifest

    def write_rejected(self, rejected: RejectedRows) -> str:
        """The `rejected` config's one file, streamed: its rows are read twice from their chunks (for the
        digest that names the file, then to write it), never held at once."""
        digest = hashlib.sha256()
        for row in rejected:
            digest.update(row.model_dump_json().encode())
        name = f"data/rejected/train-00000-{digest.hexdigest()[:12]}.parquet"
        if not self.storage.exists(name):
            schema = arrow_schema(Rejected)
            self.storage.write_parquet_batches(name, schema, (to_table(chunk, Rejected) for chunk in batched(rejected, REJECTED_CHUNK)))
        return name

    def write_rows(self, config: str, rows: list, name: str) -> str:
        """A data file is named by its rows' digest, so one that exists already holds these rows: it is
        left as it is (its bytes never change, whatever writes Parquet today)."""
        if not self.storage.exists(name):
            self.storage.write_parquet(name, to_table(rows, CONFIGS[config]))
        return name


REJECTED = "_build/rejected"
REJECTED_CHUNK = 1000


class RejectedRows:
    """The source's rejected rows as the source streams: counted by reason (with the first of each as
    its example) and, once `attach`ed to the build's directory, written there a chunk at a time, so the
    driver never holds them all. Iterating yields every row in the order it came. `keep=False` keeps
    only the counts and examples (the dry run)."""

    def __init__(self, rows=(), keep: bool = True):
        self.keep = keep
        self.by_reason: Counter = Counter()
        self.examples: dict[str, Rejected] = {}
        self.pending: list[Rejected] = []
        self.storage: Storage | None = None
        self.chunks = 0
        for row in rows:
            self.append(row)

    def __len__(self) -> int:
        return sum(self.by_reason.values())

    def append(self, row: Rejected) -> None:
        self.by_reason[row.reason] += 1
        self.examples.setdefault(row.reason, row)
        if self.keep:
            self.pending.append(row)
        if self.storage is not None and len(self.pending) >= REJECTED_CHUNK:
            self.flush()

    def attach(self, storage: Storage) -> None:
        """Write to the build's directory from now on. Chunks there are an earlier run's read of the source: gone."""
        for name in storage.list(REJECTED, "*.jsonl"):
            storage.delete(f"{REJECTED}/{name}")
        self.storage, self.chunks = storage, 0
        self.flush()

    def flush(self) -> None:
        if self.storage is None or not self.pending:
            return
        self.storage.write_text(f"{REJECTED}/{self.chunks:06d}.jsonl", "".join(r.model_dump_json() + "\n" for r in self.pending))
        self.chunks, self.pending = self.chunks + 1, []

    def __iter__(self):
        for chunk in range(self.chunks if self.storage else 0):
            for line in self.storage.read_text(f"{REJECTED}/{chunk:06d}.jsonl").splitlines():
                yield Rejected.model_validate_json(line)
        yield from self.pending


def batched(rows, size: int):
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def increments(summaries: list[ShardSummary]) -> list[dict]:
    """Each run that added problems: its date, the problems it added and the traces they gave."""
    grouped: dict[int, dict] = {}
    for s in summaries:
        entry = grouped.setdefault(s.increment, {"date": s.date, "problems_added": 0, "rows_added": 0})
        entry["problems_added"] += s.problems
        entry["rows_added"] += s.accepted
    return [grouped[i] for i in sorted(grouped)]


# ---- manifest and card ---------------------------------------------------------------------


def build_manifest(
    spec: BuildSpec, summaries: list[ShardSummary], rejected: RejectedRows, files: dict[str, list[str]], rows: dict[str, int]
) -> dict:
    accepted = sum(s.accepted for s in summaries)
    filtered = sum((Counter(s.filtered) for s in summaries), Counter())
    sampled = sum(s.sampled for s in summaries)
    steps = sum(s.step_count for s in summaries)
    passes = sum(s.nfe_sum for s in summaries)
    repair = sum(s.repair_passes for s in summaries)
    workers = {s.worker.actor: s.worker.model_dump() for s in summaries}
    return {
        "spec_hash": spec.spec_hash(),
        "spec": spec.model_dump(mode="json"),  # resolved: every reader of the build (fine-tuning, eval) takes it from here
        "code_version": code_version(),
        "model": spec.model.id,
        "problems": sum(s.problems for s in summaries),
        "shards": len(summaries),
        "traces_sampled": sampled,
        "accepted": accepted,
        "rejected": {"total": len(rejected), "by_reason": dict(sorted(rejected.by_reason.items()))},
        "filtered": {"total": sum(filtered.values()), "by_reason": dict(sorted(filtered.items()))},
        "mean_nfe": passes / sampled if sampled else None,
        # Yield: what the passes bought, each pass one canvas through one forward. Sampling and repair
        # are the budgeted sampler passes; scoring is the step scorer's canvases, counted apart.
        "passes": {"sampling": passes - repair, "repair": repair, "scoring": sum(s.scoring_canvases for s in summaries)},
        "passes_per_accepted": passes / accepted if accepted else None,
        "duplicate_share": filtered["duplicate"] / sampled if sampled else None,
        "unsolved": rows["unsolved"],
        "mean_step_score": sum(s.step_score_sum for s in summaries) / steps if steps else None,
        "rows": rows,
        "files": files,
        "empty_configs": [name for name, count in rows.items() if count == 0],
        "workers": sorted(workers.values(), key=lambda w: w["actor"]),
    }


CARD_BODY = """
# Posterior reasoning traces from {model}

Built by `factory build` (mdlm-factory {code_version}) from spec `{spec_hash}`: the model wrote
{traces_sampled} reasoning traces for {problems} problems (strategy `{strategy}`: {strategy_doc}),
scored every step with the model itself (no rollouts, no other model), and kept {accepted}. Each
problem was sampled in rounds until it had {target} accepted trace(s) or had spent {budget} forward passes.

Yield (a pass is one canvas through one forward): {passes_spent} sampler passes ({repair_passes} of them
repairing traces) and {scoring_passes} scoring passes; {passes_per_accepted} sampler passes per accepted trace; {duplicate_share} of the
sampled traces were duplicates; {unsolved} problems got no accepted trace (config `unsolved`).

| config | contents |
|---|---|
| `traces` | every accepted trace with its step scores, step labels and provenance |
| `filtered` | every other trace, the same columns, with the `filter_reason` it failed |
| `sft` | chat `messages`: the question alone, then reasoning and `\\boxed{{answer}}` |
| `prm` | TRL stepwise `prompt`, step `completions`, `labels` and the `label_scores` behind them; `accepted` False: a filtered trace |
| `unsolved` | problems left without an accepted trace, with the passes spent on them and why each trace failed |
| `rejected` | source rows that could not be used, with the reason |

`prm` holds the accepted traces and, as negatives, the filtered ones with a step labelled bad
(`accepted` False; never a duplicate). A step's label is True while it and every step before it
pass: {label_source} score at least {label_threshold} nats, a true equation, and for the last step
the gold answer reached.

Rejected rows: {rejected}. Filtered traces: {filtered}. Mean forward passes per trace: {mean_nfe}.
Fingerprint (a digest of every row): `{fingerprint}`.

Increments (each run that added problems to this build; earlier rows never change):

{increments}
Configs with no rows, left out of `configs` because `datasets` cannot load an empty config: {empty}.

```python
from datasets import load_dataset
sft = load_dataset("path/to/this/dir", "sft", split="train")
```

## Spec

```yaml
{spec_yaml}```
"""


CARD_TAGS = ["synthetic", "reasoning", "math", "process-reward-model", "masked-diffusion"]


def size_category(rows: int) -> str:
    """The Hub's size bucket for a dataset of `rows` rows (its card metadata)."""
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if rows < bound:
            return name
    return "1M<n<10M" if rows < 10_000_000 else "n>10M"


def dataset_card(spec: BuildSpec, manifest: dict) -> str:
    """`datasets` cannot load a config whose files hold no rows at all, so only configs with rows are
    listed. Each config names its files one by one: `datasets` caches a local dataset by its card, so a
    card that changes with the files keeps a rebuilt or grown directory from loading the old rows."""
    listed = [name for name in CONFIGS if name not in manifest["empty_configs"]]
    configs = [{"config_name": name, "data_files": [{"split": "train", "path": manifest["files"][name]}]} for name in listed]
    if configs:
        configs[0]["default"] = True
    metadata = {"task_categories": ["text-generation"], "tags": CARD_TAGS, "size_categories": [size_category(manifest["accepted"])]}
    front = yaml.safe_dump({**metadata, "configs": configs}, sort_keys=False)
    body = CARD_BODY.format(
        **{k: manifest[k] for k in ("model", "code_version", "spec_hash", "traces_sampled", "problems", "accepted")},
        label_source=spec.scoring.label_source,
        label_threshold=spec.scoring.label_threshold,
        rejected=manifest["rejected"]["by_reason"] or "none",
        filtered=manifest["filtered"]["by_reason"] or "none",
        mean_nfe=f"{manifest['mean_nfe']:.1f}" if manifest["mean_nfe"] is not None else "n/a",
        strategy=spec.sampler.strategy,
        strategy_doc=" ".join(STRATEGIES[spec.sampler.strategy].__doc__.split(".")[0].split()),
        target=spec.sampler.target,
        budget=spec.sampler.budget,
        passes_spent=manifest["passes"]["sampling"] + manifest["passes"]["repair"],
        repair_passes=manifest["passes"]["repair"],
        scoring_passes=manifest["passes"]["scoring"],
        passes_per_accepted=f"{manifest['passes_per_accepted']:.2f}" if manifest["passes_per_accepted"] is not None else "n/a",
        duplicate_share=f"{manifest['duplicate_share']:.1%}" if manifest["duplicate_share"] is not None else "n/a",
        unsolved=manifest["unsolved"],
        empty=", ".join(manifest["empty_configs"]) or "none",
        fingerprint=manifest["fingerprint"],
        increments="\n".join(
            f"- {i['date']}: {i['problems_added']} problems, {i['rows_added']} traces accepted" for i in manifest["increments"]
        ),
        spec_yaml=spec.to_yaml(),
    )
    return f"---\n{front}---\n{body}"
