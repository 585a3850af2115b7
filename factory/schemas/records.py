"""Records that flow through the factory. One definition each; Arrow schemas derive from them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Problem(BaseModel):
    """A question with a known answer and, when available, a gold reasoning trace."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    problem_id: str = Field(description="stable, content-derived id")
    source: str
    question: str
    gold_answer: str = Field(description="canonical integer string, e.g. '38'")
    gold_steps: list[str] = Field(default_factory=list)
    num_steps: int = 0


class Rejected(BaseModel):
    """A source row the factory cannot use, kept with the reason so nothing is dropped silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    problem_id: str | None = Field(default=None, description="set when the row got far enough to have one")
    source: str
    row: int = Field(description="position of the row in its source; -1 for a problem quarantined while it was sampled")
    raw: str = Field(description="the row as JSON")
    reason: str = Field(description="short machine-readable code, e.g. 'unknown_tokens'")
    detail: str


class TraceRow(Problem):
    """One scored posterior trace of a problem, with everything needed to reproduce it."""

    trace_id: str = Field(description="hash of (spec hash, problem_id, sample_index)")
    sample_index: int
    reasoning: str
    steps: list[str]
    answer: str | None = Field(description="the integer read from the answer slots")
    nfe: int = Field(description="sampler forward passes for this trace (for a repair, those of the repair alone)")
    exited_early: bool
    strategy: str = Field(description="the sampling strategy that drafted it (sampler.strategy)")
    clamped: bool = Field(description="sampled with the gold answer clamped (posterior) or not (prior, answer masked)")
    round: int = Field(description="the problem's round it was sampled in (0 first)")
    repaired_from_step: int | None = Field(description="a repair: the first step rewritten, the ones before it kept token for token")
    step_scores: list[float]
    prefix_logp: list[float]
    self_consistency: list[float]
    final_score: float
    min_step_score: float
    step_labels: list[bool] = Field(description="PRM labels: True while the step and all before it pass (see factory.core.checks)")
    filter_reason: str | None = Field(default=None, description="the first filter the trace failed; None when accepted")
    scoring_passes: float = Field(description="the scorer's batched forward calls, this trace's share")
    scoring_canvases: int = Field(description="the distinct canvases the scorer read first for this trace (the unit of nfe)")
    # provenance
    model_id: str
    model_revision: str | None
    sampler: str = Field(description="sampler settings as JSON")
    scorer: str = Field(description="scorer settings as JSON")
    seed: int = Field(description="the problem's sampler seed, derived from (spec seed, problem_id)")
    code_version: str
    spec_hash: str


class Unsolved(Problem):
    """A problem the build could not give a single accepted trace within its budget."""

    passes: int = Field(description="sampling and repair passes spent on it")
    traces: int = Field(description="traces sampled for it")
    filter_reasons: list[str] = Field(description="why each of its traces was filtered, in sampling order")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: str
    content: str


class SFTRow(BaseModel):
    """Chat-format fine-tuning example: the prompt is the question alone, never the answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    messages: list[ChatMessage]
    trace_id: str
    problem_id: str


class PRMRow(BaseModel):
    """Process-reward example in TRL's stepwise format, with the raw scores behind the labels."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str
    completions: list[str]
    labels: list[bool]
    label_scores: list[float] = Field(description="the per-step scores the labels were thresholded from (the spec's label_source)")
    accepted: bool = Field(description="whether the trace passed every filter (False: a filtered trace with a step labelled bad)")
    trace_id: str
    problem_id: str


class WorkerInfo(BaseModel):
    """Where a shard ran: the actor process and the accelerators Ray gave it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    actor: str = Field(description="host:pid of the process that sampled the shard")
    device: str
    dtype: str = Field(description="the precision the model's weights ran in (model.dtype resolved on this actor)")
    cuda_visible_devices: str | None
    gpu_ids: list[str] = Field(default_factory=list, description="GPU ids Ray assigned to the actor")


class ShardPlan(BaseModel):
    """One shard's problems, written before it runs: the unit of work, of resume and of output files."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shard: int
    increment: int = Field(description="the run that planned it: 0 for the first, then one more for each run that added problems")
    date: str = Field(description="when that run planned it (UTC, ISO 8601)")
    problems: list[Problem]


class ShardStats(BaseModel):
    """What sampling one shard produced, before any of it is stored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shard: int
    increment: int
    date: str
    problems: int
    sampled: int
    accepted: int
    filtered: dict[str, int] = Field(description="filtered traces by reason (kept in the `filtered` config)")
    nfe_sum: int = Field(description="sampler passes over all sampled traces: sampling and repair")
    repair_passes: int = Field(description="the part of nfe_sum spent repairing traces")
    scoring_canvases: int = Field(description="the step scorer's canvases over all sampled traces (one canvas, one forward: nfe's unit)")
    step_score_sum: float = Field(description="over all steps of all sampled traces")
    step_count: int
    sample_s: float
    score_s: float
    worker: WorkerInfo


class ShardResult(ShardStats):
    """A shard's stats with its rows, as sampling hands them to whoever stores them."""

    traces: list[TraceRow] = Field(description="the accepted traces")
    filtered_traces: list[TraceRow] = Field(description="the rest, each with its filter_reason")
    unsolved: list[Unsolved] = Field(default_factory=list, description="problems left without an accepted trace")
    quarantined: list[Rejected] = Field(default_factory=list, description="problems whose sampling or scoring raised, with the error")


class ShardSummary(ShardStats):
    """A stored shard: its stats, the data files that hold its rows, and its quarantined problems (few,
    so they travel here and the driver never reads a row). Written as the shard's completion marker."""

    files: dict[str, str] = Field(description="config -> the data file holding this shard's rows of it")
    rows: dict[str, int] = Field(description="config -> rows in that file")
    quarantined: list[Rejected] = Field(default_factory=list)
