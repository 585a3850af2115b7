import pytest

from factory.core.template import ReasoningTemplate, TemplateConfig, TemplateError
from factory.synthetic.problems import SyntheticConfig, generate


def test_round_trip_and_shared_spans(template):
    problems = generate(5, seed=2, config=SyntheticConfig(1, 6))
    rows = []
    for p in problems:
        row = template.canvas(
            template.encode_question(p.question), template.encode_reasoning(p.steps), template.encode_answer(str(p.answer))
        )
        rows.append(row)
    ids, attention = template.collate(rows)
    spans = template.spans(ids.shape[1])
    for i, p in enumerate(problems):
        reasoning = ids[i, spans.reasoning].tolist()
        assert template.decode(reasoning) == "\n".join(p.steps)
        assert template.split_steps(reasoning) == p.steps
        assert template.parse_answer(ids[i, spans.answer].tolist()) == str(p.answer)
        assert attention[i].sum() == len(rows[i])
        assert template.decode(ids[i, : spans.reasoning.start].tolist()).startswith(p.question[:10])


def test_masked_regions_and_multi_token_answer(template):
    q = template.encode_question("Tom has 5 apples. How many apples does Tom have now?")
    row = template.canvas(q)
    spans = template.spans(len(row))
    assert all(t == template.mask_id for t in row[spans.reasoning]) and all(t == template.mask_id for t in row[spans.answer])
    answer = template.encode_answer("1234")  # chunked like Llama-3: '123', '4'
    assert len([t for t in answer if t != template.filler_id]) == 3
    assert template.parse_answer(answer) == "1234"


def test_bad_input_gets_clear_reasons(template):
    cases = [
        (lambda: template.encode_question(""), "empty_question"),
        (lambda: template.encode_question("Tom has 5 apples. " * 30), "question_too_long"),
        (lambda: template.encode_question("Tom has 5 zorblax."), "unknown_tokens"),
        (lambda: template.encode_answer("five"), "non_numeric_answer"),
        (lambda: template.encode_answer("123456789012345"), "answer_too_long"),
        (lambda: template.encode_reasoning(["1 + 1 = 2"] * 20), "reasoning_too_long"),
    ]
    for call, reason in cases:
        with pytest.raises(TemplateError) as err:
            call()
        assert err.value.reason == reason
    with pytest.raises(TemplateError, match="zorblax"):
        template.encode_question("Tom has 5 zorblax.")


def test_llada_style_layout_is_expressible(tokenizer):
    delimiter = "The answer is \\boxed{"
    delimiter_tokens = len(tokenizer(delimiter, add_special_tokens=False)["input_ids"])
    llada = ReasoningTemplate(tokenizer, TemplateConfig(reasoning_slots=256 - 10 - delimiter_tokens, answer_slots=10, delimiter=delimiter))
    q = llada.encode_question("Tom has 5 apples. How many apples does Tom have now?")
    row = llada.canvas(q)
    spans = llada.spans(len(row))
    # generation canvas: reasoning + delimiter + answer = 256 tokens
    assert spans.answer.stop - spans.reasoning.start == 256
    assert llada.suffix_length == 256 + 1


@pytest.mark.parametrize("between", ["\n", "\n\n"])
def test_steps_split_where_a_bpe_tokenizer_fuses_the_separator(bpe_template, between):
    """Qwen-style BPE writes '.\n' and '\n\n' as single tokens, none of them the id of '\n'."""
    tpl = bpe_template
    ids = tpl.encode_text(f"4 + 3 = 7.{between}7 * 2 = 14")
    assert tpl.separator_ids[0] not in ids and any(between in tpl.token_text(t) and "." in tpl.token_text(t) for t in ids)
    reasoning = ids + [tpl.filler_id] * 4
    assert tpl.split_steps(reasoning) == ["4 + 3 = 7.", "7 * 2 = 14"]
    (a, b), (c, d) = tpl.step_spans(reasoning)
    assert a == 0 and b == c and d == len(ids)  # the fused token stays with the step it ends
    assert tpl.split_steps(tpl.encode_text("\n4 + 3 = 7\n\n") + [tpl.filler_id]) == ["4 + 3 = 7"]  # bare separators dropped


def test_the_written_reasoning_ends_at_the_first_filler(template):
    """A model can leave stray tokens in unused slots after the end; the text must not carry them
    (they once reached the SFT data as '36 - 28 = 88' where the checked step was '36 - 28 = 8')."""
    written = template.encode_text("36 - 28 = 8")
    strays = template.encode_text("8") + [template.filler_id] + template.encode_text("\n7 + 1 = 9")
    reasoning = written + [template.filler_id] + strays
    reasoning += [template.filler_id] * (template.config.reasoning_slots - len(reasoning))
    assert template.reasoning_text(reasoning) == "36 - 28 = 8" and template.split_steps(reasoning) == ["36 - 28 = 8"]
    answer = template.encode_text("42") + [template.filler_id] + template.encode_text("7 }")
    assert template.parse_answer(answer) == "42"  # not '427'


def test_bpe_text_decodes_as_written(bpe_template):
    """The clean-up a word-level tokenizer needs ('123 45' -> '12345') would corrupt BPE text."""
    assert not bpe_template.spaced_decoding
    for text in ("He buys 3 2-liter bottles.", "In 2 3 days he walks 1 2 miles", "4 + 3 = 7.\n 5"):
        assert bpe_template.decode(bpe_template.encode_text(text)) == text.strip()
