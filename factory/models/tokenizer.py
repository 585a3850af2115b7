"""Builds the embedded model's word-level tokenizer.

Numbers split into chunks of at most three digits, as Llama-3-style tokenizers do, so every
integer below 1000 is one token and larger answers span several answer slots.
"""

from __future__ import annotations

import itertools
import re

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from factory.synthetic import problems as synthetic

PAD, MASK, UNK, EOS = "[PAD]", "[MASK]", "[UNK]", "[EOS]"
SPECIAL_TOKENS = (PAD, MASK, UNK, EOS)
BOXED = "\\boxed{"
# Longest alternatives first: the boxed opener, digit chunks, words, newline, any other symbol.
PIECE_PATTERN = r"\\boxed\{|\d{1,3}|[A-Za-z]+|\n|[^\s]"

PUNCTUATION = list(".,?!:;'\"()[]{}+-*/=%$#&<>_^|~`@\\") + ["\n", BOXED]
# Words a word-problem source may use beyond the generator's own vocabulary.
EXTRA_WORDS = """
The the answer is a an and or of to in on at for with from by each every more less than as many much
How What Who Which how what who which does do did have has had now then Then total left altogether
He She They he she they his her their him them it its this that these those one share shares
times twice half same before after each per friends friend box boxes bag bags
""".split()


def _digit_chunks() -> list[str]:
    return [("".join(t)) for width in (1, 2, 3) for t in itertools.product("0123456789", repeat=width)]


def generator_words() -> set[str]:
    """Every word the synthetic generator can emit, found by rendering its vocabulary lists."""
    words: set[str] = set()
    for text in [*synthetic.NAMES, *synthetic.ITEMS, *synthetic.FRIENDS, *synthetic.HE_SHE.values()]:
        words.update(text.split())
    for problem in synthetic.generate(3000, seed=12345, config=synthetic.SyntheticConfig(1, 6)):
        for piece in pre_tokenize(problem.question):
            if piece.isalpha():
                words.add(piece)
    return words


def pre_tokenize(text: str) -> list[str]:
    return re.findall(PIECE_PATTERN, text)


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab_list = list(SPECIAL_TOKENS) + sorted(generator_words() | set(EXTRA_WORDS)) + PUNCTUATION + _digit_chunks()
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(PIECE_PATTERN), behavior="isolated"),
        ]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        mask_token=MASK,
        unk_token=UNK,
        eos_token=EOS,
        model_max_length=512,
    )
