"""The canvas sampler: batched, continuously refilled, with early exit and posterior (answer-clamped) mode.

Each request is one canvas row (a problem and a sample index). Up to `batch_size` rows decode
together; a row leaves when its region has no masks left (or it exits early) and a waiting request
takes its place, so the batch stays full. Every row has its own random generator, seeded from the
request, so its output does not depend on which rows it shared a batch with.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from factory.core.rules import StepView, make_rule
from factory.core.template import ReasoningTemplate
from factory.models.adapter import ModelAdapter


@dataclass(frozen=True)
class SamplerConfig:
    rule: str = "med_prefix"
    rule_params: dict = field(default_factory=dict)
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    batch_size: int = 64
    # Early exit: once the summed entropy of the still-masked answer slots is <= gamma, write the
    # answer; with exit_fill="all" the rest of the reasoning is written in the same pass.
    early_exit_gamma: float | None = None
    exit_fill: str = "all"
    continuous: bool = True
    # Admit requests shortest question first, so rows that decode together pad to similar lengths;
    # no row's output depends on its batch mates, so the order changes no result, only padding.
    group_by_length: bool = True

    def __post_init__(self):
        make_rule(self.rule, **self.rule_params)  # fail fast on an unknown rule name or parameter
        if self.exit_fill not in ("all", "answer"):
            raise ValueError(f"exit_fill must be 'all' or 'answer', got {self.exit_fill!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or unset), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (or unset), got {self.top_p}")
        if self.early_exit_gamma is not None and not self.early_exit_gamma >= 0:
            raise ValueError(f"early_exit_gamma must be >= 0 (or unset), got {self.early_exit_gamma}")


@dataclass(frozen=True)
class Request:
    question_ids: list[int]
    answer_ids: list[int] | None = None  # posterior mode: clamped into the answer slots
    reasoning_ids: list[int] | None = None  # a partly written reasoning region (masks where to write)
    seed: int = 0
    key: object = None  # returned untouched in the result
    # At most this many passes: the last one writes every slot still masked (a per-problem budget is
    # never exceeded, and the row still ends as a whole trace, to be checked like any other).
    max_nfe: int | None = None


@dataclass
class SampleResult:
    key: object
    reasoning_ids: list[int]
    answer_ids: list[int]
    nfe: int
    exited_early: bool


def gumbel_argmax(logits: torch.Tensor, temperature: float, generators: list[torch.Generator], top_k=None, top_p=None) -> torch.Tensor:
    """Sample token ids from [B, R, V] logits; greedy at temperature 0. Gumbel noise in float64
    (low-precision noise biases which token wins), drawn from each row's own generator, one row at a
    time: float64 noise over a whole batch is tens of GB at LLaDA's 126k-token vocabulary."""
    if temperature == 0:
        return logits.argmax(-1)
    return torch.stack([sample_row(row, temperature, g, top_k, top_p) for row, g in zip(logits, generators, strict=True)])


def sample_row(logits: torch.Tensor, temperature: float, generator: torch.Generator, top_k=None, top_p=None) -> torch.Tensor:
    """One row's [R, V] logits -> [R] token ids, its noise from its own (CPU) generator."""
    scaled = logits.double() / temperature
    if top_k:
        kth = scaled.topk(top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        scaled = scaled.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    noise = torch.rand(scaled.shape, generator=generator, dtype=torch.float64).to(scaled.device)
    gumbel = -torch.log(-torch.log(noise.clamp_min(1e-300)))
    return (scaled + gumbel).argmax(-1)


class CanvasSampler:
    def __init__(self, adapter: ModelAdapter, template: ReasoningTemplate, config: SamplerConfig | None = None):
        self.adapter, self.template = adapter, template
        self.config = config or SamplerConfig()
        self.rule = make_rule(self.config.rule, **self.config.rule_params)
        self.stats = {"forward_s": 0.0, "total_s": 0.0, "forward_passes": 0, "canvases": 0, "tokens": 0, "pad_tokens": 0}

    # ---- public verbs --------------------------------------------------------------------

    def generate(self, questions: list[str], k: int = 1, seed: int = 0) -> list[SampleResult]:
        """Answer masked: the model writes reasoning and answer. Results in input order (k per question)."""
        encoded = [self.template.encode_question(q) for q in questions]
        return self.run([Request(q, seed=seed_for(seed, i, j), key=(i, j)) for i, q in enumerate(encoded) for j in range(k)])

    def posterior(self, questions: list[str], answers: list[str], k: int = 1, seed: int = 0) -> list[SampleResult]:
        """Gold answer clamped: samples reasoning from p(reasoning | question, answer)."""
        encoded = [(self.template.encode_question(q), self.template.encode_answer(a)) for q, a in zip(questions, answers, strict=True)]
        return self.run(
            [Request(q, answer_ids=a, seed=seed_for(seed, i, j), key=(i, j)) for i, (q, a) in enumerate(encoded) for j in range(k)]
        )

    # ---- the loop ------------------------------------------------------------------------

    def run(self, requests: list[Request]) -> list[SampleResult]:
        """Decode every request; results come back in request order."""
        if not requests:
            return []
        cfg, tpl = self.config, self.template
        started = time.perf_counter()
        length = max(len(r.question_ids) for r in requests) + tpl.suffix_length
        spans = tpl.spans(length)
        region = torch.cat([torch.arange(spans.reasoning.start, spans.reasoning.stop), torch.arange(spans.answer.start, spans.answer.stop)])
        n_reason = tpl.config.reasoning_slots
        mask_id = self.adapter.mask_id
        device = self.adapter.device

        order = sorted(enumerate(requests), key=lambda item: len(item[1].question_ids)) if cfg.group_by_length else enumerate(requests)
        waiting = deque(order)
        results: list[SampleResult | None] = [None] * len(requests)
        capacity = min(cfg.batch_size, len(requests))
        ids = torch.full((capacity, length), tpl.pad_id, dtype=torch.long)
        attention = torch.zeros((capacity, length), dtype=torch.long)
        owner = [-1] * capacity  # request index held by each batch slot, -1 when empty
        generators: list[torch.Generator | None] = [None] * capacity
        steps_taken = torch.zeros(capacity, dtype=torch.long)
        caps = torch.zeros(capacity, dtype=torch.long)  # a row's max_nfe; 0: none
        exited = torch.zeros(capacity, dtype=torch.bool)

        def admit(slot: int) -> None:
            index, req = waiting.popleft()
            row = tpl.canvas(req.question_ids, req.reasoning_ids, req.answer_ids)
            ids[slot] = tpl.pad_id
            attention[slot] = 0
            ids[slot, length - len(row) :] = torch.tensor(row)
            attention[slot, length - len(row) :] = 1
            owner[slot], steps_taken[slot], exited[slot] = index, 0, False
            caps[slot] = req.max_nfe or 0
            generators[slot] = torch.Generator().manual_seed(requests[index].seed)

        def retire(slot: int) -> None:
            index = owner[slot]
            row = ids[slot].tolist()
            results[index] = SampleResult(
                requests[index].key, row[spans.reasoning], row[spans.answer], int(steps_taken[slot]), bool(exited[slot])
            )
            owner[slot] = -1

        for slot in range(capacity):
            admit(slot)
        while any(o >= 0 for o in owner):
            active = torch.tensor([o >= 0 for o in owner])
            rows = active.nonzero().squeeze(1)
            t0 = time.perf_counter()
            # Columns that are padding in every active row are left out of the pass: the canvas is
            # as long as the longest question decoding now, not the longest of the whole run.
            first = int(attention[rows].argmax(1).min())
            batch, batch_attention, batch_region = ids[rows, first:], attention[rows, first:], region - first
            self.stats["canvases"] += len(rows)
            self.stats["tokens"] += batch_attention.numel()
            self.stats["pad_tokens"] += int((batch_attention == 0).sum())
            # The [B, R, V] work stays on the model's device; only [B, R] summaries come back.
            logits = self.adapter.logits(batch, batch_attention)[:, batch_region.to(device)]
            logits[..., mask_id] = float("-inf")  # committing a mask would never finish the row
            if logits.is_cuda:
                torch.cuda.synchronize()  # so forward_s times the forward, not its launch
            self.stats["forward_s"] += time.perf_counter() - t0
            self.stats["forward_passes"] += 1
            current = batch[:, batch_region]
            candidates = current == mask_id
            probs = logits.softmax(-1)
            row_gens = [generators[int(r)] for r in rows]
            proposal = gumbel_argmax(logits, cfg.temperature, row_gens, cfg.top_k, cfg.top_p)
            confidence = probs.gather(-1, proposal.unsqueeze(-1)).squeeze(-1).cpu()
            entropy = (-(probs * probs.clamp_min(1e-12).log()).sum(-1)).cpu()
            proposal = proposal.cpu()
            noise = torch.stack([torch.rand(region.numel(), generator=g) for g in row_gens])
            tokens = torch.where(candidates, proposal, current)
            view = StepView(confidence, entropy, candidates, steps_taken[rows], noise, tokens, self.result_marks(tokens))
            commit = self.rule(view)
            if cfg.early_exit_gamma is not None:
                answer_masked = candidates[:, n_reason:]
                answer_entropy = (entropy[:, n_reason:] * answer_masked).sum(1)
                settled = answer_masked.any(1) & candidates[:, :n_reason].any(1) & (answer_entropy <= cfg.early_exit_gamma)
                commit[settled, n_reason:] |= answer_masked[settled]
                if cfg.exit_fill == "all":
                    commit[settled] = candidates[settled]
                exited[rows[settled]] = True
            capped = caps[rows] == steps_taken[rows] + 1
            commit[capped] = candidates[capped]
            current = torch.where(commit, proposal, current)
            batch[:, batch_region] = current
            ids[rows, first:] = batch
            steps_taken[rows] += 1
            finished = ~(current == mask_id).any(1)
            if cfg.exit_fill == "answer":
                finished |= exited[rows] & ~(current[:, n_reason:] == mask_id).any(1)
            for r in rows[finished].tolist():
                retire(r)
                if waiting and cfg.continuous:
                    admit(r)
            if not cfg.continuous and all(o < 0 for o in owner):
                for slot in range(capacity):
                    if waiting:
                        admit(slot)
        self.stats["total_s"] += time.perf_counter() - started
        return results

    def result_marks(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, R] bool: the tokens that open a step's result (`ReasoningTemplate.is_result_mark`)."""
        marked = [t for t in tokens.unique().tolist() if self.template.is_result_mark(t)]
        return torch.isin(tokens, torch.tensor(marked, dtype=tokens.dtype))


def seed_for(seed: int, problem_index: int, sample_index: int) -> int:
    """A row's generator seed: fixed by (run seed, problem, sample), never by batch position."""
    return (seed * 1_000_003 + problem_index) * 1_009 + sample_index
