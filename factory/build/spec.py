"""The build spec: one YAML file that says what `factory build` makes, checked before any compute.

`BuildSpec()` is the default build (the embedded model writing posterior traces for synthetic
problems): its field defaults are the only home of the defaults, and `factory build` with no spec
runs exactly it (`--dry-run` prints it as YAML to copy). Sections that configure an existing
component (template, sampler, synthetic source) are derived from that component's config dataclass,
so field names live in one place; a build overrides a default only where a build differs from the
component (sampling temperature). Every section forbids unknown keys, and choices are Literal
types, so a typo fails with the allowed values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_type_hints

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from factory.core.rules import RULES, check_rule, make_rule, rule_defaults
from factory.core.sampler import SamplerConfig
from factory.core.scoring import ESTIMATORS, LABEL_SOURCES
from factory.core.strategies import LOCATORS, STRATEGIES, make_strategy, strategy_defaults
from factory.core.template import TemplateConfig
from factory.models.adapter import DTYPES, KINDS
from factory.synthetic.problems import SYMBOLS, SyntheticConfig, make_problem

SECTION = ConfigDict(extra="forbid")
RuleName = Literal[tuple(RULES)]
StrategyName = Literal[tuple(STRATEGIES)]


class SpecError(ValueError):
    """A spec that cannot be built; the message names every bad key and what is allowed there."""


def section_from_dataclass(config_class: type, name: str, **types: Any) -> type[BaseModel]:
    """A pydantic section with the dataclass's fields and defaults; `types` narrows some fields (e.g. to a Literal)."""
    hints = get_type_hints(config_class)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(config_class):
        default = f.default if f.default is not dataclasses.MISSING else Field(default_factory=f.default_factory)
        fields[f.name] = (types.get(f.name, hints[f.name]), default)
    return create_model(name, __config__=SECTION, __doc__=f"Fields of {config_class.__qualname__}.", **fields)


# ---- sources --------------------------------------------------------------------------------


class Columns(BaseModel):
    """Which columns of a table hold the question, the answer and (optionally) gold steps."""

    model_config = SECTION

    question: str = "question"
    answer: str = "answer"
    steps: str | None = None


class SyntheticSource(section_from_dataclass(SyntheticConfig, "SyntheticKnobs", operations=tuple[Literal[SYMBOLS], ...])):
    kind: Literal["synthetic"] = "synthetic"
    n: int = Field(48, ge=1, description="problems to generate")
    seed: int = Field(0, description="problem seed, separate from the sampling seed")

    def to_config(self) -> SyntheticConfig:
        return SyntheticConfig(**self.model_dump(exclude={"kind", "n", "seed"}))

    @model_validator(mode="after")
    def _knobs_fit(self):
        config = self.to_config()  # SyntheticConfig checks the ranges
        for steps in {config.min_steps, config.max_steps}:  # knobs too tight for any problem fail here, not mid-build
            make_problem(random.Random(0), steps, config)
        return self


class HFSource(BaseModel):
    """A Hugging Face dataset via `datasets.load_dataset(path, name, split=split)`."""

    model_config = SECTION

    kind: Literal["hf"]
    path: str
    name: str | None = None
    split: str = "train"
    columns: Columns = Columns()
    answer_format: Literal["gsm8k", "number"] = Field("gsm8k", description="gsm8k: reasoning, then '#### answer'")


class LocalSource(BaseModel):
    """A local JSONL or Parquet file."""

    model_config = SECTION

    kind: Literal["local"]
    path: str
    format: Literal["jsonl", "parquet"] | None = Field(None, description="by file extension when unset")
    columns: Columns = Columns()
    answer_format: Literal["gsm8k", "number"] = "number"


SourceSpec = Annotated[SyntheticSource | HFSource | LocalSource, Field(discriminator="kind")]


# ---- model, template, sampler, scoring ------------------------------------------------------


class ModelSpec(BaseModel):
    model_config = SECTION

    id: str = Field("embedded", description="hub id or local path; 'embedded' is the model shipped in the package")
    kind: Literal[KINDS] = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    # float32 by default: a trace must not depend on its batch, and in bfloat16 some do (the precision
    # section of docs/benchmarks.md). Left out of the dump at float32, so the spec hash, and with it
    # every trace id, of a spec without the key is the one it had before the setting existed.
    dtype: Literal[DTYPES] = Field(
        "float32",
        exclude_if=lambda dtype: dtype == "float32",
        description="the weights' precision; auto: bfloat16 where the hardware runs it fast (GPUs, CPUs with AVX512-BF16/AMX)",
    )

    @model_validator(mode="after")
    def _remote_code_is_pinned(self):
        if self.trust_remote_code and not self.revision:
            raise ValueError("trust_remote_code needs a pinned revision (a commit hash), so the code that runs is known")
        return self


class TemplateSpec(section_from_dataclass(TemplateConfig, "TemplateFields")):
    def to_config(self) -> TemplateConfig:
        return TemplateConfig(**self.model_dump())


BUILD_ONLY = {"strategy", "strategy_params", "target", "budget", "locators"}


class SamplerSpec(section_from_dataclass(SamplerConfig, "SamplerFields", rule=RuleName)):
    """How a problem's traces are drafted and how many passes it may spend. A problem is worked in
    rounds until it has `target` distinct accepted traces or its `budget` is spent, so an easy problem
    stops costing passes once it is done and a hard one gets the rest (DART-Math's difficulty-aware
    sampling, with the budget in forward passes rather than samples)."""

    # A build samples (the component's default, 0, is greedy and writes one trace over and over).
    temperature: float = Field(0.7, description="sampling temperature; 0 is greedy, which makes a second trace a copy")
    strategy: StrategyName = Field("repair", description="how each round's traces are drafted (factory.core.strategies)")
    strategy_params: dict = Field(default_factory=dict, description="the strategy's parameters")
    target: int = Field(1, ge=1, description="distinct accepted traces wanted per problem")
    budget: int = Field(32, ge=1, description="sampler forward passes a problem may spend, sampling and repair together")
    locators: tuple[Literal[tuple(LOCATORS)], ...] = Field(
        ("calculator", "step_labels"), description="how repair finds a failed trace's first bad step (the earliest any finds)"
    )

    def to_config(self) -> SamplerConfig:
        return SamplerConfig(**self.model_dump(exclude=BUILD_ONLY))

    @model_validator(mode="after")
    def _sampler_config_is_valid(self):
        self.to_config()  # SamplerConfig checks the rule's parameter names, temperature, top-k/p, batch size, early exit
        make_strategy(self.strategy, **self.strategy_params)
        # Resolved to every parameter, so the dry run and the card show the values that ran.
        self.rule_params = {**rule_defaults(self.rule), **self.rule_params}
        self.strategy_params = {**strategy_defaults(self.strategy), **self.strategy_params}
        if self.target > self.budget:
            raise ValueError(f"target {self.target} traces cannot be bought with budget {self.budget} passes: a trace takes at least one")
        if self.strategy == "repair" and not self.locators:
            raise ValueError("strategy 'repair' needs at least one locator to find the step to repair from: calculator, step_labels")
        return self


class ScoringSpec(BaseModel):
    model_config = SECTION

    estimator: Literal[ESTIMATORS] = "marginal"
    self_consistency: bool = True
    batch_size: int = Field(128, ge=1)
    label_source: Literal[tuple(LABEL_SOURCES)] = Field(
        "self_consistency", description="the per-step score PRM labels come from (answer_delta: the answer-conditioned step score)"
    )
    # Calibrated on the embedded model's own posterior traces (`factory bench scoring` reports the
    # labels' accuracy and the best threshold); another model needs its own.
    label_threshold: float = Field(
        -0.7, allow_inf_nan=False, description="a step passes when its label_source score is at least this (nats)"
    )

    @model_validator(mode="after")
    def _label_source_is_scored(self):
        if self.label_source == "self_consistency" and not self.self_consistency:
            raise ValueError("label_source 'self_consistency' needs self_consistency: true (or label_source: answer_delta)")
        return self


class FilterSpec(BaseModel):
    """A trace is kept only if it passes every filter; each drop is counted by reason."""

    model_config = SECTION

    answer_match: bool = Field(
        True,
        description="the last number of the last step, and the answer slots (a prior trace writes its own), must equal the gold answer",
    )
    verify_arithmetic: bool = Field(True, description="every 'a op b = c' in a step must be true (a calculator check)")
    grounded: bool = Field(
        True,
        description="every operand must be stated in the question or be an earlier result: keeps out traces that reach a clamped"
        " answer with numbers they invented (and those that use a constant the question leaves unstated)",
    )
    min_step_score: float | None = Field(None, description="drop traces with any step score below this")
    step_labels: bool = Field(
        True, description="drop traces with a step labelled bad: a low label_source score, a false equation or the gold answer missed"
    )
    dedupe: bool = Field(True, description="drop exact duplicate reasoning within a problem")
    min_steps: int = Field(1, ge=0)
    max_steps: int | None = Field(None, ge=1)


class OutputSpec(BaseModel):
    model_config = SECTION

    dir: str = "out/build"
    shard_size: int = Field(8, ge=1, description="problems per shard: the unit of work, of resume and of output files")


class ResourceSpec(BaseModel):
    model_config = SECTION

    num_actors: int = Field(2, ge=1, description="model replicas (Ray actors): one per CPU core pair here, one per GPU on a cluster")
    num_gpus_per_actor: float = Field(0, ge=0, description="0 on CPU")
    cpu_fallback: bool = Field(
        False, description="an actor that holds GPUs but whose torch sees no CUDA runs on CPU (logical GPUs in tests); off: it fails"
    )
    num_cpus_per_actor: float = Field(1, gt=0)
    batch_size: int = Field(1, ge=1, description="shards per Ray map_batches call")


class BuildSpec(BaseModel):
    model_config = SECTION

    seed: int = Field(0, description="sampling seed; each problem's seed derives from it and the problem id")
    limit: int | None = Field(None, ge=1, description="use at most this many usable problems")
    source: SourceSpec = SyntheticSource()
    model: ModelSpec = ModelSpec()
    template: TemplateSpec = TemplateSpec()
    sampler: SamplerSpec = SamplerSpec()
    scoring: ScoringSpec = ScoringSpec()
    filters: FilterSpec = FilterSpec()
    output: OutputSpec = OutputSpec()
    resources: ResourceSpec = ResourceSpec()

    @model_validator(mode="before")
    @classmethod
    def _source_defaults_to_synthetic(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("source"), dict) and "kind" not in data["source"]:
            return {**data, "source": {"kind": "synthetic", **data["source"]}}
        return data

    @model_validator(mode="after")
    def _sampler_fits_the_build(self):
        if self.sampler.target > 1 and self.sampler.temperature == 0:
            raise ValueError(
                f"sampler.target is {self.sampler.target} but sampler.temperature is 0: greedy decoding writes the same trace"
                " every round, and every copy but the first is filtered as a duplicate; raise the temperature or set target: 1"
            )
        if self.sampler.early_exit_gamma is not None:
            raise ValueError(
                "sampler.early_exit_gamma: a build samples posterior traces, the gold answer clamped into the answer"
                " slots, and early exit watches masked answer slots, so it would never fire; leave it unset"
            )
        region = self.template.reasoning_slots + self.template.answer_slots
        try:
            check_rule(make_rule(self.sampler.rule, **self.sampler.rule_params), region)
        except ValueError as err:
            raise ValueError(f"sampler rule {self.sampler.rule!r} with rule_params {self.sampler.rule_params} {err}") from None
        return self

    def spec_hash(self) -> str:
        """sha256 of the canonical JSON of what determines the data. Where it is written (output) and
        on how many workers (resources) do not change a single trace, so they are left out: a build
        can resume on a different cluster, and trace ids do not depend on sharding."""
        content = self.model_dump(mode="json", exclude={"output", "resources"})
        return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def with_overrides(self, output_dir: str | Path | None = None, limit: int | None = None) -> BuildSpec:
        """A re-validated copy with the command line's --output and --limit applied where given."""
        data = self.model_dump()
        if output_dir is not None:
            data["output"]["dir"] = str(output_dir)
        if limit is not None:
            data["limit"] = limit
        return validate_spec(data, origin="spec with command-line overrides")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_spec(path: str | Path | None = None) -> BuildSpec:
    """Read and validate a spec file; None is the default build, `BuildSpec()`."""
    if path is None:
        return BuildSpec()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise SpecError(f"{path}: cannot read spec: {err}") from None
    return validate_spec(data if data is not None else {}, origin=str(path))


def validate_spec(data: Any, origin: str = "spec") -> BuildSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{origin}: a spec is a mapping of sections, got {type(data).__name__}")
    try:
        return BuildSpec.model_validate(data)
    except ValidationError as err:
        problems = "\n".join(f"  - {describe_error(e)}" for e in err.errors())
        raise SpecError(f"{origin}: invalid build spec\n{problems}") from None


def describe_error(error: dict) -> str:
    """One readable line per pydantic error: the dotted key, what was given, what is allowed. A key
    that is not printable (a newline, a control character) is shown quoted, so the line stays one."""
    loc = error["loc"]
    if error["type"] == "extra_forbidden":
        names, model = walk(loc[:-1])
        allowed = ", ".join(model.model_fields) if model else "?"
        return f"{'.'.join(map(printable, [*names, str(loc[-1])]))}: unknown key; allowed keys: {allowed}"
    names, _ = walk(loc)
    message = " ".join(error["msg"].removeprefix("Value error, ").split())
    given = f" (got {error['input']!r})" if error["type"] in ("literal_error", "enum") else ""
    return f"{'.'.join(map(printable, names)) or 'spec'}: {message}{given}"


def printable(key: str) -> str:
    return key if key.isprintable() and key.strip() == key and key else repr(key)


def walk(loc: tuple) -> tuple[list[str], type[BaseModel] | None]:
    """The readable key path of an error location and the section model it ends in. Pydantic puts a
    tagged union's tag (e.g. 'hf') into the location; it is not a key, so it is skipped."""
    model: type[BaseModel] | None = BuildSpec
    names: list[str] = []
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        names.append(str(part))
        field = model.model_fields.get(part) if model and isinstance(part, str) else None
        if field is None:
            model = None
            continue
        choices = [a for a in (get_args(field.annotation) or (field.annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(choices) > 1:
            tag = parts.pop(0) if parts else None
            model = next((c for c in choices if get_args(c.model_fields["kind"].annotation) == (tag,)), None)
        else:
            model = choices[0] if choices else None
    return names, model
