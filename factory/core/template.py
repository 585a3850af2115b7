"""Reasoning-as-infilling canvas: question | reasoning slots | answer delimiter | answer slots | end.

Every row of a batch shares the same suffix (separator, reasoning slots, delimiter, answer slots,
end), and prompts are left-padded, so the reasoning and answer spans sit at the same absolute
positions in every row: one pair of slices serves the whole batch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import torch

from factory.core.numbers import is_integer


class TemplateError(ValueError):
    """A problem or trace that does not fit the canvas. `reason` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# What opens a step's result in a trace ('a + b = c'): the scorer reads around it, step rules wait on it.
RESULT_MARK = "="


@dataclass(frozen=True)
class TemplateConfig:
    """Canvas lengths and delimiters. LLaDA/GSM8k as in the paper: reasoning_slots=256 - 10 - len(delimiter
    tokens), answer_slots=10, delimiter='The answer is \\boxed{'."""

    reasoning_slots: int = 40
    answer_slots: int = 4
    delimiter: str = "The answer is \\boxed{"
    answer_close: str = "}"
    step_separator: str = "\n"
    max_question_tokens: int = 112


@dataclass(frozen=True)
class Spans:
    """Absolute positions of the canvas regions in a left-padded batch."""

    reasoning: slice
    answer: slice


class ReasoningTemplate:
    def __init__(self, tokenizer, config: TemplateConfig | None = None, filler_id: int | None = None):
        self.tokenizer = tokenizer
        self.config = config or TemplateConfig()
        if tokenizer.mask_token_id is None:
            raise ValueError("the tokenizer has no mask token; a masked diffusion model needs one")
        self.mask_id = tokenizer.mask_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # Unused slots hold a token the model learned to emit; LLaDA and our model use end-of-text.
        self.filler_id = filler_id if filler_id is not None else tokenizer.eos_token_id
        self.separator_ids = self.encode_text(self.config.step_separator)
        self._token_texts: dict[int, str] = {}
        # A word-level tokenizer decodes with a space between every token ('123 45 \n 6'); a BPE one
        # round-trips, and the clean-up decode() needs for the first would merge '3 2-liter' into '32-liter'.
        probe = "12345\n6"
        self.spaced_decoding = tokenizer.decode(self.encode_text(probe), skip_special_tokens=True) != probe
        self.delimiter_ids = self.encode_text(" " + self.config.delimiter.strip())
        self.close_ids = self.encode_text(self.config.answer_close)
        self.end_ids = [tokenizer.eos_token_id]

    # ---- encoding -------------------------------------------------------------------------

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _check_known(self, ids: list[int], text: str, what: str) -> None:
        unk = self.tokenizer.unk_token_id
        if unk is not None and unk in ids:
            pieces = [tok for tok, i in zip(self.tokenizer.convert_ids_to_tokens(ids), ids) if i == unk]
            unknown = [w for w in re.findall(r"\S+", text) if unk in self.encode_text(w)]
            raise TemplateError("unknown_tokens", f"{what} has text outside the tokenizer vocabulary: {unknown[:5] or pieces[:5]}")

    def encode_question(self, question: str) -> list[int]:
        if not question or not question.strip():
            raise TemplateError("empty_question", "the question is empty")
        ids = self.encode_text(question.strip())
        self._check_known(ids, question, "question")
        if len(ids) > self.config.max_question_tokens:
            raise TemplateError(
                "question_too_long",
                f"{len(ids)} tokens > max_question_tokens={self.config.max_question_tokens}; raise it or drop the row",
            )
        return ids + self.separator_ids

    def encode_reasoning(self, steps: list[str]) -> list[int]:
        """Steps joined by the separator, then filler to the slot count."""
        ids = self.encode_text(self.config.step_separator.join(s.strip() for s in steps))
        self._check_known(ids, " ".join(steps), "reasoning")
        free = self.config.reasoning_slots - len(ids)
        if free < 0:
            raise TemplateError("reasoning_too_long", f"{len(ids)} tokens > reasoning_slots={self.config.reasoning_slots}")
        return ids + [self.filler_id] * free

    def encode_answer(self, answer: str) -> list[int]:
        if not is_integer(answer):
            raise TemplateError("non_numeric_answer", f"answer {answer!r} is not an integer")
        ids = self.encode_text(answer.strip()) + self.close_ids
        self._check_known(ids, answer, "answer")
        free = self.config.answer_slots - len(ids)
        if free < 0:
            raise TemplateError("answer_too_long", f"{len(ids)} tokens > answer_slots={self.config.answer_slots}")
        return ids + [self.filler_id] * free

    @cached_property
    def suffix_length(self) -> int:
        return self.config.reasoning_slots + len(self.delimiter_ids) + self.config.answer_slots + len(self.end_ids)

    def canvas(self, question_ids: list[int], reasoning: list[int] | None = None, answer: list[int] | None = None) -> list[int]:
        """One row; a region given as None is left masked."""
        cfg = self.config
        reasoning = reasoning if reasoning is not None else [self.mask_id] * cfg.reasoning_slots
        answer = answer if answer is not None else [self.mask_id] * cfg.answer_slots
        assert len(reasoning) == cfg.reasoning_slots and len(answer) == cfg.answer_slots
        return question_ids + reasoning + self.delimiter_ids + answer + self.end_ids

    def spans(self, length: int) -> Spans:
        """Region positions for a batch whose rows are left-padded to `length`."""
        answer_end = length - len(self.end_ids)
        answer_start = answer_end - self.config.answer_slots
        reasoning_end = answer_start - len(self.delimiter_ids)
        return Spans(slice(reasoning_end - self.config.reasoning_slots, reasoning_end), slice(answer_start, answer_end))

    def collate(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad rows into (input_ids, attention_mask)."""
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, length - len(row) :] = torch.tensor(row)
            attention[i, length - len(row) :] = 1
        return ids, attention

    # ---- decoding -------------------------------------------------------------------------

    def decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if i not in (self.filler_id, self.mask_id, self.pad_id)]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if self.spaced_decoding:  # join the digit chunks of one number; no spaces around newlines
            text = re.sub(r" *\n *", "\n", re.sub(r"(?<=\d) (?=\d)", "", text))
        return text.strip()

    def written_length(self, region_ids: list[int]) -> int:
        """Where the written part of a reasoning or answer region ends: its first filler slot. Tokens
        after it are strays the model left in unused slots; no step, answer or text includes them."""
        return next((i for i, t in enumerate(region_ids) if t == self.filler_id), len(region_ids))

    def reasoning_text(self, reasoning_ids: list[int]) -> str:
        return self.decode(reasoning_ids[: self.written_length(reasoning_ids)])

    def token_text(self, token_id: int) -> str:
        """One token's text, decoded once per id (BPE merges make ids differ where texts agree)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def is_result_mark(self, token_id: int) -> bool:
        """Whether a token opens a step's result ('a + b = c'): found by text, as a BPE tokenizer
        fuses ' =' with its neighbours."""
        return RESULT_MARK in self.token_text(token_id)

    def step_spans(self, reasoning_ids: list[int]) -> list[tuple[int, int]]:
        """Token spans [start, end) of the steps in a reasoning region, separators excluded.

        Byte-level BPE tokenizers (Qwen's, hence Dream's) write a separator fused with its
        neighbours: '.\n' or '\n\n' is one token, not the id of '\n'. So a one-token separator is
        found by text: a token holding it ends the step, and stays in it when it also holds the
        step's last characters. A separator of several tokens is matched as a sequence."""
        sep, text_sep, end = self.separator_ids, self.config.step_separator, self.written_length(reasoning_ids)
        spans, start, i = [], 0, 0
        while i < end:
            width = len(sep) if len(sep) > 1 and reasoning_ids[i : i + len(sep)] == sep else 0
            text = self.token_text(reasoning_ids[i]) if len(sep) == 1 else ""
            if width or text_sep in text:
                step_end = i + 1 if text.split(text_sep)[0].strip() else i
                if step_end > start:
                    spans.append((start, step_end))
                i += max(width, 1)
                start = i
            else:
                i += 1
        if end > start:
            spans.append((start, end))
        return spans

    def split_steps(self, reasoning_ids: list[int]) -> list[str]:
        return [self.decode(reasoning_ids[a:b]) for a, b in self.step_spans(reasoning_ids)]

    def parse_answer(self, answer_ids: list[int]) -> str | None:
        """The integer written in the answer slots before the closing brace, or None."""
        text = self.decode(answer_ids[: self.written_length(answer_ids)])
        text = text.split(self.config.answer_close)[0].replace(",", "").strip()
        return text if is_integer(text) else None
