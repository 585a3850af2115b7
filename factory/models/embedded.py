"""The embedded MDLM: a small ModernBERT masked LM trained by `jobs/train_mdlm.py` and shipped in the package."""

from __future__ import annotations

from pathlib import Path

from transformers import ModernBertConfig

EMBEDDED_MODEL_DIR = Path(__file__).parent / "embedded"
EMBEDDED_MODEL_ID = "factory/embedded-mdlm"


def embedded_config(tokenizer, hidden_size: int = 256, layers: int = 6, heads: int = 4, intermediate: int = 768) -> ModernBertConfig:
    """Every layer attends globally: canvases are short, and sliding windows would hide the answer slots."""
    return ModernBertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        layer_types=["full_attention"] * layers,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        cls_token_id=tokenizer.eos_token_id,
        sep_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
