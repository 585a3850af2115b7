"""Train the embedded masked diffusion LM on synthetic problems laid out on the reasoning canvas.

Objective (as in LLaDA): per row t ~ U(eps, 1), each response slot (reasoning and answer) is masked
with probability t, and the cross-entropy on masked slots is weighted by 1/t, with t the row's
realised mask ratio (masked slots / response slots). With the drawn t instead, a row with t near eps
weighs up to 1000x the others and, after gradient clipping, a batch learns from a handful of tokens:
a 5M model plateaued at 77% masked accuracy that way, unable even to copy a number. Two more layouts
teach the model what the step scorer asks of it:
  prefix     the question and the first k gold steps visible, every later slot masked;
  corrupted  the same, but one visible step is wrong and the masked remainder (later steps and the
             answer) is recomputed from the error, so the answer learns to follow the reasoning.
             The wrong step is visible, never a loss target, so the model does not learn to slip.
  results    every step's result and the answer masked, everything else visible: the arithmetic
             facts themselves, the state the self-consistency scorer reads. Under uniform masking a
             result is mostly masked together with its operands, so the model copies well long
             before it computes (0.03 answer accuracy after 2,000 steps with operands copied right).
             A later step names an earlier result as its operand, so only the last one must be
             computed here; the others can be copied from further on.
  next_result the state of left-to-right decoding at a result: the question, the first k steps and
             step k+1 up to its '=' visible, everything after masked; the loss is on that result
             and the token after it (the next step's separator, or the filler where it ends). The
             result cannot be copied from anywhere: 41 of 43 wrong answers of the stage-3 model
             (48 problems decoded left to right) were arithmetic slips, its results-layout
             accuracy 0.84 flattered by the copies; the stage-4 model, trained on the result
             alone, stopped 39 of 96 traces early, after a correct intermediate result.
  next_token the same state at any token of a step up to its result (an operand, the operator):
             the loss is on the rest of that step and the token after it. 14 of the stage-5
             model's 39 wrong answers (96 problems) copied an earlier result wrongly, mostly one
             from two steps back (66 for 67, 31 for 41), a choice no other layout trains in the
             state decoding makes it in.
Two aids for the arithmetic: `--drill-every N` makes every Nth batch a drill (one step from each of
several problems packed under a short question, results masked), and `--fourier-numbers` writes
each number's value into its embedding (see `init_fourier_numbers`).

Resumable: `--out DIR` holds checkpoint.pt (model, optimiser, step) and an exported HF model in
DIR/hf after every checkpoint. Example:
    python jobs/train_mdlm.py --out runs/mdlm --steps 2000
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForMaskedLM, AutoTokenizer, ModernBertForMaskedLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from factory.models.embedded import embedded_config  # noqa: E402
from factory.models.tokenizer import build_tokenizer  # noqa: E402
from factory.sources import synthetic  # noqa: E402
from factory.template import ReasoningTemplate, TemplateError  # noqa: E402

EPS = 1e-3
TRAIN_KINDS = ("slip_recomputed", "wrong_operand", "wrong_operation")
LAYOUTS = ("uniform", "prefix", "corrupted", "results", "next_result", "next_token", "far_operand", "answer_ahead", "hidden_operand")
STEP_CUT_LAYOUTS = ("next_result", "next_token", "far_operand", "hidden_operand")  # cut inside one step; the loss on its rest


def far_operands(problem: synthetic.SyntheticProblem) -> list[tuple[int, bool]]:
    """(step, is_left) for each operand that names a result from two or more steps back: the running
    total that a "bags with N each" step interrupts, which stage 6 copied wrongly (66 for 67) in 80 of
    its 95 wrong answers."""
    return [
        (index, is_left)
        for index, op in enumerate(problem.ops)
        for is_left, operand in ((True, op.left), (False, op.right))
        if operand.step is not None and operand.step < index - 1
    ]


def bf16_is_fast() -> bool:
    """bf16 autocast pays off on CPUs with native bf16 (AVX512-BF16, AMX): a training step of the
    embedded model took 1.1-1.2 s against 1.7-2.1 s in fp32 on an AVX512-BF16 core pair. On AVX2 it is
    ~50x slower. torch's capability string says only "AVX512" on such a CPU, so ask for the feature."""
    native = (getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(native) or torch.cuda.is_available()


class BatchMaker:
    """Builds (input_ids, attention, labels, weights) batches; rows depend only on (seed, step)."""

    def __init__(
        self, template: ReasoningTemplate, seed: int, mix: tuple[float, ...], step_weights: list[float], filler_weight: float = 1.0
    ):
        self.template, self.seed, self.mix, self.step_weights = template, seed, mix, step_weights
        self.filler_weight = filler_weight
        self.equals_id = template.tokenizer.convert_tokens_to_ids("=")
        self.config = synthetic.SyntheticConfig(1, 6)

    def _problem(self, rng: random.Random, max_steps: int | None) -> synthetic.SyntheticProblem:
        """A problem of 1..max_steps steps in the copy warm-up, else drawn by the step weights."""
        steps = rng.randint(1, max_steps) if max_steps else rng.choices(range(1, 7), weights=self.step_weights)[0]
        return synthetic.make_problem(rng, steps, self.config)

    def row(self, rng: random.Random, warmup_max_steps: int | None = None) -> tuple[list[int], list[bool], list[bool]]:
        """One canvas, which of its slots are masked and which of those carry loss (all of them but
        in the STEP_CUT_LAYOUTS and answer_ahead). Warm-up rows mask reasoning only (uniform layout)."""
        warmup = warmup_max_steps is not None
        tpl = self.template
        while True:
            problem = self._problem(rng, warmup_max_steps)
            layout = "uniform" if warmup else rng.choices(LAYOUTS, weights=self.mix)[0]
            steps, answer, first_visible_error = problem.steps, problem.answer, None
            far = far_operands(problem) if layout == "far_operand" else None
            if far == []:
                continue
            if layout == "corrupted" or (layout == "answer_ahead" and rng.random() < 0.5):
                trace = synthetic.corrupt(problem, rng.choice(TRAIN_KINDS), rng)
                if trace is None or trace.answer < 0:
                    continue
                steps, answer, first_visible_error = trace.steps, trace.answer, trace.first_error
            try:
                question = tpl.encode_question(problem.question)
                reasoning = tpl.encode_reasoning(steps)
                answer_ids = tpl.encode_answer(str(answer))
            except TemplateError:
                continue
            ids = tpl.canvas(question, reasoning, answer_ids)
            spans = tpl.spans(len(ids))
            response = list(range(spans.reasoning.start, spans.reasoning.stop))
            if not warmup:
                response += list(range(spans.answer.start, spans.answer.stop))
            masked = [False] * len(ids)
            if layout == "uniform":
                t = rng.uniform(EPS, 1.0)
                chosen = [p for p in response if rng.random() < t] or [rng.choice(response)]
                for p in chosen:
                    masked[p] = True
                return ids, masked, masked
            if layout == "results":
                masked = self._mask_results(ids, reasoning)
                return ids, masked, masked
            step_spans = tpl.step_spans(reasoning)
            step_cut = layout in STEP_CUT_LAYOUTS
            if step_cut:
                if far:  # just before an operand that names a result two or more steps back
                    index, is_left = rng.choice(far)
                    start, end = step_spans[index]
                    offset = 0 if is_left else reasoning[start:end].index(self.equals_id) - 1
                else:  # after the step's '=', or anywhere up to it
                    start, end = rng.choice(step_spans)
                    equals = reasoning[start:end].index(self.equals_id)
                    offset = {"next_result": equals + 1, "hidden_operand": equals - 1}.get(layout)
                    offset = rng.randint(0, equals + 1) if offset is None else offset
                visible_end = spans.reasoning.start + start + offset
            else:
                low = 0 if first_visible_error is None else first_visible_error + 1
                if layout == "answer_ahead":  # one or two steps left to compute in the answer slots
                    k = max(low, len(step_spans) - rng.choice((1, 1, 2)))
                else:
                    k = rng.randint(low, len(step_spans))
                # The token after step k (separator, or end filler after the last step) is visible half
                # the time. Always masked after the last step only, a masked token after a result told
                # the model the reasoning ended there: decoding left to right, it then read the answer
                # as the result just written, confidently (early exit at entropy 0.1 took it in 0.87 -> 0.53).
                visible_end = spans.reasoning.start + (step_spans[k - 1][1] + rng.randint(0, 1) if k else 0)
            for p in response:
                masked[p] = p >= visible_end
            if layout == "answer_ahead":
                # The loss on the answer alone: one-pass step scoring reads it with the later steps
                # masked, and in the prefix layout it is one target among ~40 (stage 7, clean prefixes
                # with one step left: the answer's argmax was the gold one 4% of the time).
                return ids, masked, [masked[p] and p >= spans.answer.start for p in range(len(ids))]
            if not step_cut:
                return ids, masked, masked
            if layout == "hidden_operand":
                # The result alone, its last operand masked: one pass must infer the operand and compute
                # with it (stage 8: the result right 0.15-0.31 of the time so, always with the operand written).
                first = visible_end + 2
                return ids, masked, [first <= p < spans.reasoning.start + end for p in range(len(ids))]
            # The rest of the step and the token after it: the next step's separator or the end filler,
            # where left-to-right decoding decides whether the reasoning goes on.
            loss = [visible_end <= p <= spans.reasoning.start + end and masked[p] for p in range(len(ids))]
            return ids, masked, loss

    def _mask_results(self, ids: list[int], reasoning: list[int]) -> list[bool]:
        """Every step's result (the tokens after '=') and the answer masked, nothing else."""
        spans, masked = self.template.spans(len(ids)), [False] * len(ids)
        for start, end in self.template.step_spans(reasoning):
            equals = start + reasoning[start:end].index(self.equals_id)
            for p in range(spans.reasoning.start + equals + 1, spans.reasoning.start + end):
                masked[p] = True
        for p in range(spans.answer.start, spans.answer.stop):
            masked[p] = True
        return masked

    def drill_row(self, rng: random.Random) -> tuple[list[int], list[bool], list[bool]]:
        """Arithmetic drill: one step from each of several problems packed into one reasoning region
        under a short question, results masked: many facts in a row shorter than a problem's. One
        step per problem, so no visible step names another's result (stage 3 packed whole problems,
        and a later step gave the earlier result away)."""
        tpl, steps = self.template, []
        question = tpl.encode_question("How many" + self._problem(rng, None).question.split("How many")[-1])
        for _ in range(12):  # keep adding steps while they fit
            candidate = [*steps, rng.choice(self._problem(rng, None).steps)]
            try:
                tpl.encode_reasoning(candidate)
            except TemplateError:
                continue
            steps = candidate
        reasoning = tpl.encode_reasoning(steps)
        ids = tpl.canvas(question, reasoning, tpl.encode_answer(steps[-1].split(" = ")[1]))
        masked = self._mask_results(ids, reasoning)
        return ids, masked, masked

    def batch(self, step: int, size: int, warmup_max_steps: int | None = None, drill: bool = False):
        rng = random.Random(f"train:{self.seed}:{step}")
        warmup = warmup_max_steps is not None
        rows = [self.drill_row(rng) if drill else self.row(rng, warmup_max_steps) for _ in range(size)]
        ids, attention = self.template.collate([r[0] for r in rows])
        length = ids.shape[1]
        masked = torch.zeros_like(ids, dtype=torch.bool)
        loss = torch.zeros_like(masked)
        for i, (row, row_mask, row_loss) in enumerate(rows):
            masked[i, length - len(row) :] = torch.tensor(row_mask)
            loss[i, length - len(row) :] = torch.tensor(row_loss)
        # 1/t with t the realised mask ratio: every row contributes its mean masked-slot loss.
        weights = (response_slots(self.template) / loss.sum(1).clamp(min=1).float()).unsqueeze(1).expand(ids.shape).clone()
        weights = torch.where(loss, weights, 0.0)
        # The masked filler slots of a row share the weight of one slot. Counted one by one they are
        # most of the targets (35 of 40 slots in a 1-step trace), and a fresh model then learns the
        # canvas but never copies an operand: measured number accuracy 0.03 after 300 steps, against
        # 0.65 with the filler out of the loss.
        filler = loss & (ids == self.template.filler_id)
        filler_count = filler.sum(1, keepdim=True).clamp(min=1).float()
        weights = torch.where(filler, weights * self.filler_weight / filler_count, weights)
        if warmup:
            # Copy warm-up: the reasoning's own tokens, every one alike, on problems that grow from one
            # step. A fresh model learns to copy operands from the question only while no filler and
            # no answer-from-question targets compete (hidden 128, 1-step problems, 300 steps: number
            # accuracy 0.65 without them, 0.08-0.10 with either), and only on short problems first
            # (the full 1-6 mix: none after 360 steps; a jump from 1-step to the full mix undid it).
            content = masked & ~filler
            weights = torch.where(content, response_slots(self.template) * size / content.sum().clamp(min=1).float(), 0.0)
        inputs = ids.masked_fill(masked, self.template.mask_id)
        return inputs, attention, ids, masked, weights


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


def response_slots(template: ReasoningTemplate) -> int:
    return template.config.reasoning_slots + template.config.answer_slots


@torch.no_grad()
def one_pass_answer_accuracy(model, template: ReasoningTemplate, problems) -> float:
    """Share of problems whose answer slots, read in one pass from the question alone, spell the gold answer."""
    rows = [template.canvas(template.encode_question(p.question)) for p in problems]
    ids, attention = template.collate(rows)
    logits = model(input_ids=ids, attention_mask=attention).logits
    spans = template.spans(ids.shape[1])
    pred = logits[:, spans.answer].argmax(-1)
    return sum(template.parse_answer(pred[i].tolist()) == str(p.answer) for i, p in enumerate(problems)) / len(problems)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--mix",
        type=float,
        nargs=len(LAYOUTS),
        default=(0.15, 0.1, 0.1, 0.05, 0.15, 0.25, 0.2, 0, 0),
        metavar=tuple(name.upper() for name in LAYOUTS),
    )
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
    maker = BatchMaker(template, args.seed, tuple(args.mix), list(args.step_weights), args.filler_weight)
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
        logits = logits[masked].float()
        ce = F.cross_entropy(logits, targets[masked], reduction="none")
        loss = (ce * weights[masked]).sum() / (inputs.shape[0] * n_response)
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
