import atexit
import contextlib
import os
import random
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest
import torch
from transformers import ModernBertForMaskedLM

from factory.core.template import ReasoningTemplate
from factory.models.adapter import ModelAdapter
from factory.models.embedded import embedded_config
from factory.models.tokenizer import build_tokenizer

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `datasets` caches a local dataset by its card, not its files' contents, and pytest reuses its tmp
# paths across sessions, so a test could load an earlier session's rows (seen: a column added since
# was missing). A cache of this session's own keeps every load honest.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="hf-datasets-")
atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def template(tokenizer):
    return ReasoningTemplate(tokenizer)


# Qwen2's pre-tokenizer split (Dream's tokenizer): punctuation keeps the newlines after it, so '.\n'
# and '.\n\n' become single tokens, and ' =' is one token too.
QWEN_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


@pytest.fixture(scope="session")
def bpe_template():
    """A template over a small byte-level BPE tokenizer trained here the way Qwen's is built."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    pairs = [(rng.randint(1, 99), rng.randint(1, 99)) for _ in range(300)]
    corpus = [f"{a} + {b} = {a + b}.\n\nSo {a} * 2 = {a * 2}.\nThe answer is \\boxed{{{a}}}" for a, b in pairs]
    bpe = Tokenizer(models.BPE())
    split = pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated")
    bpe.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<mask>", "<eos>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer)
    return ReasoningTemplate(PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", mask_token="<mask>", eos_token="<eos>"))


@pytest.fixture(scope="session")
def tiny_adapter(tokenizer):
    """A randomly initialised two-layer model: fast, and its predictions are arbitrary but fixed."""
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(embedded_config(tokenizer, hidden_size=64, layers=2, heads=2, intermediate=128)).eval()
    return ModelAdapter(model, tokenizer, "masked_lm", tokenizer.mask_token_id, "tiny-random")


@pytest.fixture(scope="session")
def embedded_adapter():
    return ModelAdapter.load("embedded", device="cpu")


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_adapter, tmp_path_factory):
    """The tiny model saved like a hub checkpoint, for code that loads its model by path (Ray actors, jobs)."""
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_adapter.model.save_pretrained(path)
    tiny_adapter.tokenizer.save_pretrained(path)
    return path


def session_members(session_id: int) -> list[int]:
    """Live processes in a session (field 6 of /proc/PID/stat): what a command started with start_new_session left behind."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, _, _, session = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:4]
        except (OSError, ValueError):
            continue
        if int(session) == session_id and state != "Z":  # a zombie is already dead, only not yet reaped
            members.append(int(entry.name))
    return members


def kill_session(session_id: int, grace_s: float = 5.0) -> None:
    """SIGTERM every process of the session (so Ray can clean up), then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_members(session_id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while session_members(session_id) and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture
def own_sessions():
    """Register the session ids of processes a test starts with start_new_session=True (e.g. a Ray
    cluster); every process left in them is killed at teardown. Never `ray stop`: it stops every
    Ray on the machine, not only ours."""
    sessions: list[int] = []
    yield sessions.append
    for session_id in sessions:
        kill_session(session_id)
