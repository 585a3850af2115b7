"""`factory finetune`: train a masked diffusion LM on what builds wrote, under `accelerate`.

Rows are read with `datasets.load_dataset(build, config)` and laid back onto the canvas the build
sampled them on (its template comes from the resolved spec in the build's manifest.json), so the fine-tuned model samples
with the template it was trained on. A row that does not fit is counted by reason, never dropped
unseen. Batches draw a build by weight, a trace from it, and a training layout from the mix
(`factory/train/layouts.py`); the loss is `batches.masked_loss`. Everything that can be wrong with
the input (no such config, an empty build, another tokenizer, a template the base tokenizer cannot
write) stops the run with one line before the model trains.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from factory.build.spec import BuildSpec, SpecError, validate_spec
from factory.core.template import ReasoningTemplate, TemplateError
from factory.models.adapter import bf16_is_fast, load_tokenizer, looks_like_path, model_revision, resolve_model
from factory.train.batches import Example, collate, make_row, masked_loss, response_slots
from factory.train.layouts import check_mix, mix_weights, parse_mix
from factory.train.optim import lr_at

# LLaDA's SFT loss beside the layouts a trained MDLM decodes with: uniform masking alone erodes the
# targeted decoding a model learned. docs/benchmarks.md (bench:finetune) holds what this mix measures.
DEFAULT_MIX = {"sft": 0.25, "prefix": 0.15, "results": 0.1, "next_result": 0.2, "next_token": 0.3}
CONFIGS = ("sft", "traces")


class FinetuneError(ValueError):
    """Input that cannot be trained on; the message is one line naming the build and the reason."""


@dataclass
class BuildData:
    """One build's rows on the canvas, and what could not be used."""

    path: str
    config: str
    weight: float
    fingerprint: str | None
    model: str | None
    examples: list[Example]
    rejected: dict[str, int] = field(default_factory=dict)


@dataclass
class FinetuneConfig:
    steps: int = 300
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 3e-5  # bench finetune: at 1e-4 every trace arm lost 1-4 pt on the stage-6 base; at 3e-5 less (docs)
    warmup: int = 20
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    precision: str = "auto"  # auto | fp32 | bf16
    checkpoint_every: int = 100
    seed: int = 0
    filler_weight: float = 1.0

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise FinetuneError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.warmup < 0:
            raise FinetuneError(f"lr must be > 0 and warmup >= 0, got lr {self.lr}, warmup {self.warmup}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise FinetuneError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")


# ---- reading builds ------------------------------------------------------------------------------


def build_manifest(path: str) -> dict:
    """The build's manifest.json (counts, files, fingerprint and the resolved spec): from the directory,
    or from the Hub for a dataset id. Every reader of a build takes its facts from here."""
    local = Path(path) / "manifest.json"
    if local.exists():
        text = local.read_text()
    elif Path(path).exists():
        raise FinetuneError(f"{path}: no manifest.json; not a finished factory build directory")
    elif looks_like_path(path):
        raise FinetuneError(f"{path}: no such build directory")
    else:
        from huggingface_hub import hf_hub_download

        try:
            text = Path(hf_hub_download(path, "manifest.json", repo_type="dataset")).read_text()
        except Exception as err:  # offline, no such repo, no manifest: one line, whatever the client raised
            raise FinetuneError(
                f"{path}: cannot read its manifest.json ({type(err).__name__}); give a build directory or a Hub dataset id"
            ) from None
    try:
        manifest = json.loads(text)
    except ValueError:
        raise FinetuneError(f"{path}: its manifest.json is not valid JSON") from None
    return manifest if isinstance(manifest, dict) else {}


def build_spec(path: str, manifest: dict | None = None) -> BuildSpec:
    """The resolved spec a build ran with, as its manifest records it."""
    manifest = build_manifest(path) if manifest is None else manifest
    if "spec" not in manifest:
        raise FinetuneError(f"{path}: its manifest.json holds no build spec; was it written by `factory build`?")
    try:
        return validate_spec(manifest["spec"], origin=f"{path} manifest")
    except SpecError as err:
        raise FinetuneError(" ".join(str(err).split())) from None


def read_rows(path: str, config: str) -> list[dict]:
    import datasets

    if config not in CONFIGS:
        raise FinetuneError(f"{path}: config {config!r}; choose from {CONFIGS}")
    try:
        return list(datasets.load_dataset(path, config, split="train"))
    except Exception as err:  # a missing config, an unreadable file: one line
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FinetuneError(f"{path}: cannot load config {config!r}: {message}") from None


def row_example(row: dict, config: str, template: ReasoningTemplate) -> Example:
    """A `traces` row keeps steps and answer apart; an `sft` row's assistant turn is split back at
    the template's delimiter, the way `build.output.sft_row` wrote it."""
    if config == "traces":
        return Example(row["question"], list(row["steps"]), str(row["gold_answer"]))
    messages = {m["role"]: m["content"] for m in row["messages"]}
    if "user" not in messages or "assistant" not in messages:
        raise TemplateError("not_a_chat", "the row needs a user and an assistant turn")
    delimiter, close = template.config.delimiter, template.config.answer_close
    reasoning, found, rest = messages["assistant"].rpartition(delimiter)
    if not found or close not in rest:
        raise TemplateError("no_delimiter", f"the assistant turn has no {delimiter!r}...{close!r}")
    steps = [s.strip() for s in reasoning.split(template.config.step_separator) if s.strip()]
    return Example(messages["user"], steps, rest.split(close)[0].strip())


def fits(example: Example, template: ReasoningTemplate) -> None:
    """Raise the template's reason when the trace cannot be laid on the canvas."""
    template.encode_question(example.question)
    template.encode_reasoning(example.steps)
    template.encode_answer(example.answer)


def tokenizer_digest(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([vocab, tokenizer.mask_token_id]).encode()).hexdigest()[:12]


def check_template(template: ReasoningTemplate, where: str) -> None:
    """The base tokenizer must write the build's delimiter, closing brace and separator."""
    unk = template.tokenizer.unk_token_id
    for name, text in (("delimiter", template.config.delimiter), ("answer_close", template.config.answer_close)):
        if unk is not None and unk in template.encode_text(text):
            raise FinetuneError(f"{where}: the base model's tokenizer cannot encode the build's template.{name} {text!r}")


def load_build(path: str, config: str, weight: float, base_tokenizer) -> tuple[BuildData, ReasoningTemplate]:
    manifest = build_manifest(path)
    spec = build_spec(path, manifest)
    template = ReasoningTemplate(base_tokenizer, spec.template.to_config())
    check_template(template, path)
    try:
        build_tokenizer = load_tokenizer(spec.model.id, spec.model.kind, spec.model.revision, spec.model.trust_remote_code)
    except Exception:  # a Hub model this machine cannot reach: the rows are still checked token by token
        build_tokenizer = None
    if build_tokenizer is not None and tokenizer_digest(build_tokenizer) != tokenizer_digest(base_tokenizer):
        raise FinetuneError(
            f"{path}: built with {spec.model.id}, whose tokenizer differs from the base model's; fine-tune a model of the same family"
        )
    if manifest.get("rows", {}).get(config) == 0:  # `factory build` leaves an empty config out of the card
        raise FinetuneError(f"{path}: config {config!r} holds no rows (an empty build: {manifest.get('accepted')} traces accepted)")
    rows = read_rows(path, config)
    if not rows:
        raise FinetuneError(f"{path}: config {config!r} holds no rows")
    examples, rejected = [], Counter()
    for row in rows:
        try:
            example = row_example(row, config, template)
            fits(example, template)
        except TemplateError as err:
            rejected[err.reason] += 1
            continue
        examples.append(example)
    if not examples:
        raise FinetuneError(f"{path}: none of its {len(rows)} rows fits the template: {dict(rejected)}")
    data = BuildData(path, config, weight, manifest.get("fingerprint"), spec.model.id, examples, dict(rejected))
    return data, template


def parse_build_arg(text: str) -> tuple[str, float]:
    """`PATH` or `PATH=WEIGHT`."""
    path, sep, weight = text.rpartition("=")
    if not sep or not re.fullmatch(r"[0-9.]+", weight):
        return text, 1.0
    return path, float(weight)


# ---- batches -------------------------------------------------------------------------------------


class TraceBatches:
    """Batches of traces from several builds: a build drawn by weight, a trace uniformly from it, a
    layout from the mix. Rows depend only on (seed, step, micro-batch, process), so a resume and a
    rerun draw the same batches."""

    def __init__(self, template: ReasoningTemplate, builds: list[BuildData], mix: dict[str, float], seed: int, filler_weight: float = 1.0):
        check_mix(mix, traces_only=True)
        self.template, self.builds, self.weights, self.seed = template, builds, mix_weights(mix), seed
        self.filler_weight = filler_weight

    def draw(self, rng: random.Random) -> Example:
        build = rng.choices(self.builds, weights=[b.weight for b in self.builds])[0]
        return rng.choice(build.examples)

    def batch(self, step: int, size: int, micro: int = 0, process: int = 0):
        rng = random.Random(f"finetune:{self.seed}:{step}:{micro}:{process}")
        rows = [make_row(self.template, rng, self.draw, self.weights) for _ in range(size)]
        return collate(self.template, rows, filler_weight=self.filler_weight)


# ---- the loop ------------------------------------------------------------------------------------

BatchFn = Callable[[int, int, int, int], tuple]  # (step, size, micro, process) -> a collated batch


def train(
    model,
    tokenizer,
    template: ReasoningTemplate,
    batches: BatchFn,
    config: FinetuneConfig,
    output: Path,
    card: Callable[[dict], str],
    log: Callable[[str], None] = print,
) -> dict:
    """Optimise `model` on `batches` for `config.steps` optimizer steps under `accelerate`, checkpoint
    every `checkpoint_every` steps into OUTPUT/checkpoint (model, optimizer and step, renamed into
    place), resume from it, and export a Hugging Face model directory into OUTPUT."""
    from accelerate import Accelerator

    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and bf16_is_fast())
    accelerator = Accelerator(mixed_precision="bf16" if use_bf16 else "no", gradient_accumulation_steps=config.grad_accum)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01, betas=(0.9, 0.98))
    model, optimizer = accelerator.prepare(model, optimizer)
    output.mkdir(parents=True, exist_ok=True)
    checkpoint, start, history = output / "checkpoint", 0, []
    resume = latest_checkpoint(checkpoint)
    if resume is not None:
        accelerator.load_state(str(resume))
        state = json.loads((resume / "state.json").read_text())
        start, history = state["step"], state["history"]
        log(f"[finetune] resumed at step {start}")
    n_response = response_slots(template)
    model.train()
    started, tokens = time.perf_counter(), 0
    for step in range(start, config.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config.steps, config.lr, config.warmup)
        step_loss = 0.0
        for micro in range(config.grad_accum):
            inputs, attention, targets, masked, weights = (
                t.to(accelerator.device) for t in batches(step, config.batch_size, micro, accelerator.process_index)
            )
            with accelerator.accumulate(model):  # the prepared model runs its forward in the chosen precision
                loss = masked_loss(model(input_ids=inputs, attention_mask=attention).logits, targets, masked, weights, n_response)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.item() / config.grad_accum
            tokens += int(attention.sum()) * accelerator.num_processes
        step_loss = accelerator.reduce(torch.tensor(step_loss, device=accelerator.device), reduction="mean").item()  # over processes
        history.append({"step": step + 1, "loss": round(step_loss, 4)})
        done = step + 1
        if accelerator.is_main_process and (done % 10 == 0 or done == config.steps):
            elapsed = time.perf_counter() - started
            eta = elapsed / (done - start) * (config.steps - done)
            log(f"[finetune] step {done}/{config.steps} loss {step_loss:.4f} {tokens / elapsed:,.0f} tokens/s ETA {eta:.0f}s")
        if done % config.checkpoint_every == 0 or done == config.steps:
            save_checkpoint(accelerator, checkpoint, done, history)
    accelerator.wait_for_everyone()
    summary = {"steps": config.steps, "final_loss": history[-1]["loss"] if history else None, "precision": "bf16" if use_bf16 else "fp32"}
    if accelerator.is_main_process:
        export(accelerator.unwrap_model(model), tokenizer, template, output, card(summary))
    return summary


def save_checkpoint(accelerator, checkpoint: Path, step: int, history: list[dict]) -> None:
    """Written beside the last one, then swapped in: a kill at any moment leaves a whole checkpoint at
    `checkpoint` or, mid-swap, at its `.old` twin (`latest_checkpoint` takes either)."""
    fresh, old = (checkpoint.with_name(checkpoint.name + suffix) for suffix in (".tmp", ".old"))
    accelerator.save_state(str(fresh))
    accelerator.wait_for_everyone()  # every process has written its part before the swap
    if accelerator.is_main_process:
        (fresh / "state.json").write_text(json.dumps({"step": step, "history": history}))
        if checkpoint.exists():
            if old.exists():
                shutil.rmtree(old)
            checkpoint.rename(old)
        fresh.rename(checkpoint)
        if old.exists():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def latest_checkpoint(checkpoint: Path) -> Path | None:
    """The whole checkpoint to resume from, if any."""
    for path in (checkpoint, checkpoint.with_name(checkpoint.name + ".old")):
        if (path / "state.json").exists():
            return path
    return None


def export(model, tokenizer, template: ReasoningTemplate, output: Path, card: str) -> None:
    """A Hugging Face model directory. Its config.json records the canvas it was trained on
    (`factory_template`), so `factory eval` and builds decode it on that canvas."""
    model.config.factory_template = asdict(template.config)
    model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    (output / "README.md").write_text(card)


# ---- the model card ------------------------------------------------------------------------------


def model_card(base: str, revision: str | None, builds: list[BuildData], config: FinetuneConfig, template, summary: dict) -> str:
    front = yaml.safe_dump({"library_name": "transformers", "tags": ["masked-diffusion", "reasoning", "mdlm-factory"]}, sort_keys=False)
    sources = "\n".join(
        f"| `{b.path}` | `{b.config}` | {b.fingerprint or 'n/a'} | {b.weight:g} | {len(b.examples)} | {b.rejected or 'none'} |"
        for b in builds
    )
    settings = yaml.safe_dump({**asdict(config), **summary}, sort_keys=False)
    return f"""---
{front}---
# Fine-tuned from {base}

`factory finetune` trained this masked diffusion LM from `{base}` (revision `{revision}`) on the
reasoning traces of the builds below, laid out on the build's canvas: reasoning slots
{template.config.reasoning_slots}, answer slots {template.config.answer_slots}, delimiter
`{template.config.delimiter}`. Sample with that template (`model.id: <this directory>` in a build spec).

| build | config | fingerprint | weight | rows used | rows that did not fit |
|---|---|---|---|---|---|
{sources}

## Settings

```yaml
{settings}```
"""


# ---- the command ---------------------------------------------------------------------------------


def finetune(
    builds: list[tuple[str, float]],
    base: str,
    output: Path,
    config: FinetuneConfig,
    data_config: str = "sft",
    log: Callable[[str], None] = print,
) -> dict:
    """Fine-tune `base` on the builds; every input check runs before the model loads."""
    from transformers import AutoModelForMaskedLM

    try:
        check_mix(config.mix, traces_only=True)
    except ValueError as err:
        raise FinetuneError(f"--mix: {err}") from None
    base_path, base_name = resolve_model(base)
    try:
        tokenizer = load_tokenizer(base)
    except Exception as err:  # no such directory, no network for a Hub id: one line, before any build is read
        raise FinetuneError(f"--model {base}: cannot load its tokenizer ({type(err).__name__})") from None
    loaded = [load_build(path, data_config, weight, tokenizer) for path, weight in builds]
    data, templates = [d for d, _ in loaded], {t.config for _, t in loaded}
    if len(templates) > 1:
        raise FinetuneError(f"the builds use different templates {sorted(map(str, templates))}; fine-tune on builds of one canvas")
    template = loaded[0][1]
    for d in data:
        log(f"[finetune] {d.path} ({d.config}): {len(d.examples)} rows, did not fit: {d.rejected or 'none'}")  # every process checks
    model = AutoModelForMaskedLM.from_pretrained(base_path, dtype=torch.float32)
    batches = TraceBatches(template, data, config.mix, config.seed, config.filler_weight)
    revision = model_revision(base)

    def card(summary: dict) -> str:
        return model_card(base_name, revision, data, config, template, summary)

    summary = train(model, tokenizer, template, batches.batch, config, output, card, log)
    return {**summary, "rows": {d.path: len(d.examples) for d in data}, "did_not_fit": {d.path: d.rejected for d in data}}


def cli_finetune(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="factory finetune", description="Fine-tune a masked diffusion LM on builds' traces.")
    ap.add_argument("builds", nargs="+", help="build directories or Hub dataset ids, each optionally PATH=WEIGHT")
    ap.add_argument("--model", default="embedded", help="the base model: a directory, a Hub id, or 'embedded'")
    ap.add_argument("--output", required=True, type=Path, help="the fine-tuned model directory (and its checkpoint)")
    ap.add_argument("--config", default="sft", choices=CONFIGS, help="which config of the builds to read")
    defaults = FinetuneConfig()
    ap.add_argument("--steps", type=int, default=defaults.steps)
    ap.add_argument("--batch-size", type=int, default=defaults.batch_size)
    ap.add_argument("--grad-accum", type=int, default=defaults.grad_accum)
    ap.add_argument("--lr", type=float, default=defaults.lr)
    ap.add_argument("--warmup", type=int, default=defaults.warmup)
    ap.add_argument("--mix", nargs="+", metavar="NAME=WEIGHT", help=f"training layouts (default {DEFAULT_MIX})")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=defaults.precision)
    ap.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    ap.add_argument("--seed", type=int, default=defaults.seed)
    args = ap.parse_args(argv)
    try:
        mix = parse_mix(args.mix) if args.mix else dict(DEFAULT_MIX)
        config = FinetuneConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            lr=args.lr,
            warmup=args.warmup,
            mix=mix,
            precision=args.precision,
            checkpoint_every=args.checkpoint_every,
            seed=args.seed,
        )
        summary = finetune([parse_build_arg(b) for b in args.builds], args.model, args.output, config, args.config)
    except (FinetuneError, ValueError) as err:
        sys.exit(f"factory finetune: {err}")
    print(json.dumps(summary))
