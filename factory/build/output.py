"""The output directory of a build: resumable shard parts, then a Hugging Face dataset.

    OUT/_build/spec.json                  the spec and its hash; a rerun with another spec is refused
    OUT/_build/shards/00003.plan.json        the problems of shard 3 and the increment that added them, written before it runs
    OUT/_build/shards/00003.traces.parquet   accepted traces of shard 3
    OUT/_build/shards/00003.filtered.parquet the shard's other traces, each with its filter_reason
    OUT/_build/shards/00003.done.json        its completion marker (a ShardSummary), written after the part
    OUT/data/{traces,filtered,sft,prm}/train-00003-<digest>.parquet   one file per shard, named by its rows' digest
    OUT/data/rejected/train-00000-<digest>.parquet
    OUT/README.md                          dataset card; its `configs:` front matter names the data files
    OUT/manifest.json                      counts: problems, accepted, rejected and filtered by reason, rows per config, means, fingerprint

Every file is written to a temporary name and renamed into place, so a build killed at any moment
leaves each file either complete or absent, and a shard either done (marker present) or to redo.

Incremental: a problem is known by its content digest (`problem_id`). A rerun over a source that
gained rows plans only the problems no shard holds yet, as new shards after the existing ones; rows
that moved or repeat change nothing. A finished shard's rows, and so its files' names and bytes, never
change, so a publish of the grown build only adds files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from factory.build.provenance import code_version
from factory.build.spec import BuildSpec
from factory.build.stages import plan_shards
from factory.core.scoring import LABEL_SOURCES
from factory.models.adapter import model_revision
from schemas.arrow import arrow_schema, from_table, to_table
from schemas.records import ChatMessage, PRMRow, Problem, Rejected, SFTRow, ShardResult, ShardSummary, TraceRow

CONFIGS = {"traces": TraceRow, "filtered": TraceRow, "sft": SFTRow, "prm": PRMRow, "rejected": Rejected}
TMP_MARK = ".tmp-"


class BuildError(RuntimeError):
    """A build that must not start, e.g. an output directory made from another spec."""


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a hidden temporary file in the same directory, then rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_parquet(path: Path, table: pa.Table) -> None:
    atomic_write(path, lambda tmp: pq.write_table(table, tmp) if table.num_rows else write_empty_parquet(table.schema, tmp))


def write_empty_parquet(schema: pa.Schema, path: Path) -> None:
    """Schema only, no row group: `datasets` skips such a file, but fails on an empty row group."""
    pq.ParquetWriter(path, schema).close()


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


# ---- the directory -------------------------------------------------------------------------


class BuildDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.state = self.root / "_build" / "spec.json"
        self.shards = self.root / "_build" / "shards"

    def part(self, shard: int) -> Path:
        return self.shards / f"{shard:05d}.traces.parquet"

    def filtered_part(self, shard: int) -> Path:
        return self.shards / f"{shard:05d}.filtered.parquet"

    def quarantine_part(self, shard: int) -> Path:
        return self.shards / f"{shard:05d}.quarantined.parquet"

    def marker(self, shard: int) -> Path:
        return self.shards / f"{shard:05d}.done.json"

    def plan_file(self, shard: int) -> Path:
        return self.shards / f"{shard:05d}.plan.json"

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
        if self.state.exists():
            found = json.loads(self.state.read_text())
            for key, value in wanted.items():
                if found.get(key) != value:
                    raise BuildError(
                        f"{self.root} holds a build with {key} {found.get(key)}, but this one has {key} {value}; a dataset never"
                        f" mixes two: start a new version with another --output (e.g. {self.root.name}-v2)"
                    )
        elif self.root.exists() and any(self.root.iterdir()):
            raise BuildError(f"{self.root} is not empty and holds no factory build; choose another --output")
        else:
            write_text(self.state, json.dumps({**wanted, "spec": spec.model_dump(mode="json")}, indent=2))
        for leftover in self.root.rglob(f".*{TMP_MARK}*"):  # from a build killed mid-write
            leftover.unlink()

    def plans(self) -> dict[int, dict]:
        """Every shard planned so far: {shard: {"increment", "date", "problems"}}."""
        return {int(p.name.split(".")[0]): json.loads(p.read_text()) for p in sorted(self.shards.glob("*.plan.json"))}

    def plan(self, problems: list[Problem], shard_size: int) -> tuple[dict[int, list[Problem]], int]:
        """Plan the problems no shard holds yet as new shards after the existing ones, each written
        before it runs (so a killed run redoes exactly those shards); returns every shard's problems
        and how many were added. Problems are known by content: a row that moved or repeats is none.
        Each plan names its increment, so the increments are read back from the plans alone."""
        plans = self.plans()
        known = {p["problem_id"] for plan in plans.values() for p in plan["problems"]}
        new = [p for p in problems if p.problem_id not in known]
        first = max(plans, default=-1) + 1
        increment = max((plan["increment"] for plan in plans.values()), default=-1) + 1
        date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for shard, chunk in enumerate(plan_shards(new, shard_size), start=first):
            plans[shard] = {"increment": increment, "date": date, "problems": [p.model_dump(mode="json") for p in chunk]}
            write_text(self.plan_file(shard), json.dumps(plans[shard]))
        return {shard: [Problem.model_validate(p) for p in plan["problems"]] for shard, plan in plans.items()}, len(new)

    def increments(self, summaries: list[ShardSummary]) -> list[dict]:
        """Each run that added problems: its date, the problems it added and the traces they gave."""
        grouped: dict[int, dict] = {}
        for shard, plan in self.plans().items():
            entry = grouped.setdefault(plan["increment"], {"date": plan["date"], "problems_added": 0, "rows_added": 0})
            entry["problems_added"] += len(plan["problems"])
            entry["rows_added"] += summaries[shard].accepted
        return [grouped[i] for i in sorted(grouped)]

    def done_shards(self) -> set[int]:
        return {int(p.name.split(".")[0]) for p in self.shards.glob("*.done.json")}

    def write_shard(self, result: ShardResult) -> None:
        write_parquet(self.part(result.shard), to_table(result.traces, TraceRow))
        write_parquet(self.filtered_part(result.shard), to_table(result.filtered_traces, TraceRow))
        write_parquet(self.quarantine_part(result.shard), to_table(result.quarantined, Rejected))
        write_text(self.marker(result.shard), result.summary().model_dump_json(indent=2))

    def quarantined(self, num_shards: int) -> list[Rejected]:
        parts = [self.quarantine_part(i) for i in range(num_shards)]
        return [row for part in parts if part.exists() for row in from_table(pq.read_table(part, schema=arrow_schema(Rejected)), Rejected)]

    def summaries(self, num_shards: int) -> list[ShardSummary]:
        return [ShardSummary.model_validate_json(self.marker(i).read_text()) for i in range(num_shards)]

    def derive(self, spec: BuildSpec, shard: int) -> dict[str, list]:
        """A shard's rows of every config but `rejected`."""
        traces, filtered = (read_traces(path) for path in (self.part(shard), self.filtered_part(shard)))
        return {"traces": traces, "filtered": filtered, "sft": [sft_row(t, spec) for t in traces], "prm": prm_rows(traces + filtered, spec)}

    def assemble(self, spec: BuildSpec, num_shards: int, rejected: list[Rejected]) -> dict:
        """Write the dataset from the finished shards; returns the manifest. Data files of an
        earlier assembly are removed only after the card points at the new ones, so a kill at any
        moment leaves a directory that loads. Problems quarantined while sampling join the source's
        rejected rows."""
        rejected = rejected + self.quarantined(num_shards)
        files: dict[str, list[str]] = {name: [] for name in CONFIGS}
        counts = dict.fromkeys(CONFIGS, 0)
        for shard in range(num_shards):
            for name, rows in self.derive(spec, shard).items():
                files[name].append(self.write_rows(name, rows, data_file(name, shard, rows)))
                counts[name] += len(rows)
        files["rejected"].append(self.write_rows("rejected", rejected, data_file("rejected", 0, rejected)))
        counts["rejected"] = len(rejected)
        # The build's identity (manifest, card, publish tag, fine-tuned models' cards): a digest of every
        # file name, each of which carries its rows' digest, so the rows are read and hashed once.
        fingerprint = hashlib.sha256("\n".join(n for names in files.values() for n in names).encode()).hexdigest()[:12]
        summaries = self.summaries(num_shards)
        manifest = build_manifest(spec, summaries, rejected, files, counts)
        manifest |= {"fingerprint": fingerprint, "increments": self.increments(summaries)}
        # The card first, the manifest last: a finished manifest always has its card (publish reads both).
        write_text(self.root / "README.md", dataset_card(spec, manifest))
        write_text(self.root / "manifest.json", json.dumps(manifest, indent=2) + "\n")
        written = {name for names in files.values() for name in names}
        for config in CONFIGS:  # only files the factory names, never a user's own
            for stale in (self.root / "data" / config).glob(DATA_FILE_GLOB):
                if stale.relative_to(self.root).as_posix() not in written:
                    stale.unlink()
        return manifest

    def write_rows(self, config: str, rows: list, name: str) -> str:
        """A data file is named by its rows' digest, so one that exists already holds these rows: it is
        left as it is (its bytes never change, whatever writes Parquet today)."""
        if not (self.root / name).exists():
            write_parquet(self.root / name, to_table(rows, CONFIGS[config]))
        return name


def read_traces(path: Path) -> list[TraceRow]:
    return from_table(pq.read_table(path, schema=arrow_schema(TraceRow)), TraceRow)


# ---- manifest and card ---------------------------------------------------------------------


def build_manifest(
    spec: BuildSpec, summaries: list[ShardSummary], rejected: list[Rejected], files: dict[str, list[str]], rows: dict[str, int]
) -> dict:
    accepted = sum(s.accepted for s in summaries)
    filtered = sum((Counter(s.filtered) for s in summaries), Counter())
    sampled = sum(s.sampled for s in summaries)
    steps = sum(s.step_count for s in summaries)
    workers = {s.worker.actor: s.worker.model_dump() for s in summaries}
    return {
        "spec_hash": spec.spec_hash(),
        "code_version": code_version(),
        "model": spec.model.id,
        "problems": sum(s.problems for s in summaries),
        "shards": len(summaries),
        "traces_sampled": sampled,
        "accepted": accepted,
        "rejected": {"total": len(rejected), "by_reason": dict(sorted(Counter(r.reason for r in rejected).items()))},
        "filtered": {"total": sum(filtered.values()), "by_reason": dict(sorted(filtered.items()))},
        "mean_nfe": sum(s.nfe_sum for s in summaries) / sampled if sampled else None,
        "mean_step_score": sum(s.step_score_sum for s in summaries) / steps if steps else None,
        "rows": rows,
        "files": files,
        "empty_configs": [name for name, count in rows.items() if count == 0],
        "workers": sorted(workers.values(), key=lambda w: w["actor"]),
    }


CARD_BODY = """
# Posterior reasoning traces from {model}

Built by `factory build` (mdlm-factory {code_version}) from spec `{spec_hash}`: the model wrote
{traces_sampled} reasoning traces for {problems} problems with the gold answer clamped into the
answer slots, scored every step with the model itself (no rollouts, no other model), and kept {accepted}.

| config | contents |
|---|---|
| `traces` | every accepted trace with its step scores, step labels and provenance |
| `filtered` | every other trace, the same columns, with the `filter_reason` it failed |
| `sft` | chat `messages`: the question alone, then reasoning and `\\boxed{{answer}}` |
| `prm` | TRL stepwise `prompt`, step `completions`, `labels` and the `label_scores` behind them; `accepted` False: a filtered trace |
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
        empty=", ".join(manifest["empty_configs"]) or "none",
        fingerprint=manifest["fingerprint"],
        increments="\n".join(
            f"- {i['date']}: {i['problems_added']} problems, {i['rows_added']} traces accepted" for i in manifest["increments"]
        ),
        spec_yaml=spec.to_yaml(),
    )
    return f"---\n{front}---\n{body}"
