from transformers import AutoTokenizer

from factory.models.embedded import EMBEDDED_MODEL_DIR
from factory.synthetic.problems import SyntheticConfig, generate


def test_every_generated_problem_encodes_without_unknowns(tokenizer):
    for p in generate(1000, seed=11, config=SyntheticConfig(1, 6)):
        ids = tokenizer(p.question + "\n" + "\n".join(p.steps), add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids


def test_numbers_are_whole_tokens_below_1000(tokenizer):
    for n in (0, 7, 42, 999):
        assert len(tokenizer(str(n), add_special_tokens=False)["input_ids"]) == 1
    assert tokenizer.convert_ids_to_tokens(tokenizer("123456 7", add_special_tokens=False)["input_ids"]) == ["123", "456", "7"]


def test_shipped_tokenizer_matches_the_builder(tokenizer):
    shipped = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)
    assert shipped.get_vocab() == tokenizer.get_vocab()
    assert shipped.mask_token_id is not None and shipped.mask_token_id != shipped.eos_token_id
    text = "Ann has 12 coins. The answer is \\boxed{38}"
    assert shipped(text)["input_ids"] == tokenizer(text)["input_ids"]
