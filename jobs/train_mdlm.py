"""Train the embedded masked diffusion LM on synthetic problems laid out on the reasoning canvas.

Each batch row is a generated problem on the canvas, masked by a training layout drawn from
`--mix name=weight ...` (the layouts are registered in `factory/train/layouts.py`, one small
function each, shared with `factory finetune`; `--list-layouts` prints them). Two aids for the
arithmetic: `--drill-every N` makes every Nth batch a drill (one step from each of several
problems packed under a short question, results masked), and `--fourier-numbers` writes each
number's value into its embedding (see `init_fourier_numbers`). The first `--warmup-copy-steps`
batches are a copy warm-up (uniform masking of the reasoning alone, on problems that grow from one
step): a fresh model learns to copy operands only while no other target competes.

Resumable: `--out DIR` holds checkpoint.pt (model, optimiser, step) and an exported HF model in
DIR/hf after every checkpoint. The model card (factory/models/embedded/README.md) records the mixes
and what each stage measured. Example:
    python jobs/train_mdlm.py --out runs/mdlm --steps 2000
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer, ModernBertForMaskedLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from factory.core.template import ReasoningTemplate  # noqa: E402
from factory.models.adapter import bf16_is_fast  # noqa: E402
from factory.models.embedded import embedded_config  # noqa: E402
from factory.models.tokenizer import build_tokenizer  # noqa: E402
from factory.synthetic import problems as synthetic  # noqa: E402
from factory.train.batches import SyntheticBatches, masked_loss, response_slots  # noqa: E402
from factory.train.layouts import LAYOUTS, parse_mix  # noqa: E402
from factory.train.optim import lr_at  # noqa: E402

# The default mix; a layout not named weighs 0.
DEFAULT_MIX = ("uniform=0.15", "prefix=0.1", "corrupted=0.1", "results=0.05", "next_result=0.15", "next_token=0.25", "far_operand=0.2")


def init_fourier_numbers(model, tokenizer, periods: tuple[int, ...] = (10, 100, 1000)) -> None:
    """Write cos/sin(2 pi n / T) of each number token's value n into the first embedding dims.

    Number tokens are atomic, so a fresh embedding knows nothing of magnitude and every sum is a
    separate fact to memorise. With these features (Fourier number embeddings, as in FoNE) the
    value of n mod 10, mod 100 and mod 1000 is linear in the embedding, and the tied output layer
    can read a result the same way; a sum's features are products of the operands' (GLU-friendly).
    """
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        for token, index in tokenizer.get_vocab().items():
            if token.isdigit():
                angles = torch.tensor([2 * math.pi * int(token) / t for t in periods])
                weight[index, : 2 * len(periods)] = torch.cat([angles.cos(), angles.sin()])


def grow_depth(model: ModernBertForMaskedLM, insert_after: list[int]) -> ModernBertForMaskedLM:
    """The same function with more layers: after each listed layer, a copy of it whose two output
    projections (attention and MLP) are zero, so the new layer adds nothing to the residual stream
    until training gives it a use. Tried for the hops one-pass step scoring needs and the 6-layer model
    lacks (the lookahead table in docs/benchmarks.md; the model card says what 790 steps at 10 layers did)."""
    old = model.model.layers
    if not insert_after or any(not 0 <= i < len(old) for i in insert_after):
        raise ValueError(f"insert_after must name layers 0..{len(old) - 1}, got {insert_after}")
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_hidden_layers = len(old) + len(insert_after)
    config.layer_types = ["full_attention"] * config.num_hidden_layers
    grown = ModernBertForMaskedLM(config)
    sources = [item for i in range(len(old)) for item in [(i, False)] + [(i, True)] * insert_after.count(i)]
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("model.layers.")}
    for index, (source, identity) in enumerate(sources):
        for name, value in old[source].state_dict().items():
            if identity and name.endswith("Wo.weight"):
                value = torch.zeros_like(value)
            state[f"model.layers.{index}.{name}"] = value
    missing, unexpected = grown.load_state_dict(state, strict=False)
    # Layer 0 has no attention norm; a copy of it placed deeper keeps the fresh norm of its slot.
    if unexpected or any(not k.endswith("attn_norm.weight") for k in missing):
        raise RuntimeError(f"grown model does not match: missing {missing}, unexpected {unexpected}")
    return grown


@torch.no_grad()
def one_pass_answer_accuracy(model, template: ReasoningTemplate, problems) -> float:
    """Share of problems whose answer slots, read in one pass from the question alone, spell the gold answer."""
    rows = [template.canvas(template.encode_question(p.question)) for p in problems]
    ids, attention = template.collate(rows)
    logits = model(input_ids=ids, attention_mask=attention).logits
    spans = template.spans(ids.shape[1])
    pred = logits[:, spans.answer].argmax(-1)
    return sum(template.parse_answer(pred[i].tolist()) == str(p.answer) for i, p in enumerate(problems)) / len(problems)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mix", nargs="+", default=list(DEFAULT_MIX), metavar="NAME=WEIGHT", help=f"layout weights, of {list(LAYOUTS)}")
    ap.add_argument("--list-layouts", action="store_true", help="print each layout's rule and exit")
    ap.add_argument("--step-weights", type=float, nargs=6, default=(1, 2, 3, 3, 1.5, 1), help="weights of 1..6-step problems")
    ap.add_argument("--warmup-copy-steps", type=int, default=900, help="steps of the copy warm-up (reasoning tokens only)")
    ap.add_argument("--copy-grow-every", type=int, default=150, help="the warm-up's largest problem grows by one step this often")
    ap.add_argument("--filler-weight", type=float, default=1.0, help="weight of a row's masked filler slots together, in slots")
    ap.add_argument("--rewarm", type=int, default=100, help="linear lr warm-up again over this many steps after the copy warm-up")
    ap.add_argument(
        "--fourier-numbers", action="store_true", help="write Fourier features of each number's value into its embedding before training"
    )
    ap.add_argument("--drill-every", type=int, default=2, help="after the warm-up, every Nth batch is an arithmetic drill (0: none)")
    ap.add_argument("--init-from", type=Path, help="start from an exported model (e.g. the shipped one)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument(
        "--grow-after", type=int, nargs="+", help="with --init-from: insert a function-preserving copy of each listed layer after it"
    )
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.list_layouts:
        print("\n\n".join(f"{name}: {spec.doc}" for name, spec in LAYOUTS.items()))
        return
    try:
        mix = parse_mix(args.mix)
    except ValueError as err:
        ap.error(str(err))

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.out / "checkpoint.pt"
    if args.init_from:
        tokenizer = AutoTokenizer.from_pretrained(args.init_from)
        model = AutoModelForMaskedLM.from_pretrained(args.init_from, dtype=torch.float32)
    else:
        tokenizer = build_tokenizer()
        model = ModernBertForMaskedLM(embedded_config(tokenizer, args.hidden, args.layers, args.heads, args.intermediate))
    if args.grow_after:
        if not args.init_from:
            ap.error("--grow-after grows a trained model: give --init-from")
        model = grow_depth(model, args.grow_after)
    if args.fourier_numbers:  # on a trained model it overwrites those dims, and training re-learns around them
        init_fourier_numbers(model, tokenizer)
    template = ReasoningTemplate(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    start, elapsed = 0, 0.0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, elapsed = state["step"], state["elapsed_s"]
        print(f"resumed at step {start}", flush=True)
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and bf16_is_fast())
    maker = SyntheticBatches(template, args.seed, mix, list(args.step_weights), args.filler_weight)
    val = synthetic.generate(256, seed=987654, config=synthetic.SyntheticConfig(2, 4))
    log = (args.out / "train_log.jsonl").open("a")
    n_response = response_slots(template)
    number_ids = torch.tensor([i for token, i in tokenizer.get_vocab().items() if token.isdigit()])
    model.train()
    t0 = time.time() - elapsed
    for step in range(start, args.steps):
        warmup_max_steps = min(6, 1 + step // args.copy_grow_every) if step < args.warmup_copy_steps else None
        drill = warmup_max_steps is None and args.drill_every > 0 and step % args.drill_every == 0
        inputs, attention, targets, masked, weights = maker.batch(step, args.batch_size, warmup_max_steps, drill)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
            if args.warmup_copy_steps <= step < args.warmup_copy_steps + args.rewarm:
                group["lr"] *= (step - args.warmup_copy_steps + 1) / args.rewarm
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(input_ids=inputs, attention_mask=attention).logits
        loss = masked_loss(logits, targets, masked, weights, n_response)
        logits = logits[masked].float()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        checkpoint_now = (step + 1) % args.checkpoint_every == 0 or step == args.steps - 1
        if step % 10 == 0 or checkpoint_now:
            trained = weights[masked] > 0
            hits = (logits.argmax(-1) == targets[masked])[trained]
            is_number = torch.isin(targets[masked][trained], number_ids)
            record = {
                "step": step,
                "loss": round(loss.item(), 4),
                "masked_acc": round(hits.float().mean().item(), 4),
                "number_acc": round(hits[is_number].float().mean().item(), 4),
                "drill": drill,  # drill batches score lower: every target is a result
                "elapsed_s": round(time.time() - t0, 1),
            }
            if checkpoint_now:
                model.eval()
                record["one_pass_answer_acc"] = one_pass_answer_accuracy(model, template, val)
                model.train()
            print(json.dumps(record), flush=True)
            log.write(json.dumps(record) + "\n")
            log.flush()
        if checkpoint_now:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1, "elapsed_s": time.time() - t0}
            torch.save(state, ckpt_path.with_suffix(".tmp"))
            ckpt_path.with_suffix(".tmp").replace(ckpt_path)  # atomic: a kill never leaves half a checkpoint
            model.save_pretrained(args.out / "hf", safe_serialization=True)
            tokenizer.save_pretrained(args.out / "hf")
            (args.out / "hf" / "training_state.json").write_text(
                json.dumps(
                    {"step": step + 1, "elapsed_s": round(time.time() - t0), "args": {k: str(v) for k, v in vars(args).items()}}, indent=1
                )
            )


if __name__ == "__main__":
    main()
