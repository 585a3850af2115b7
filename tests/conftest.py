import os

import pytest
import torch
from transformers import ModernBertForMaskedLM

from factory.models.adapter import ModelAdapter
from factory.models.embedded import embedded_config
from factory.models.tokenizer import build_tokenizer
from factory.template import ReasoningTemplate

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def template(tokenizer):
    return ReasoningTemplate(tokenizer)


@pytest.fixture(scope="session")
def tiny_adapter(tokenizer):
    """A randomly initialised two-layer model: fast, and its predictions are arbitrary but fixed."""
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(embedded_config(tokenizer, hidden_size=64, layers=2, heads=2, intermediate=128)).eval()
    return ModelAdapter(model, tokenizer, "masked_lm", tokenizer.mask_token_id, "tiny-random")


@pytest.fixture(scope="session")
def embedded_adapter():
    return ModelAdapter.load("embedded", device="cpu")
