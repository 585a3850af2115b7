"""One interface over the masked LMs the factory samples from.

- `masked_lm`: any `AutoModelForMaskedLM` (the embedded model, BERT/ModernBERT-style MDLMs);
- `llada`: LLaDA-style checkpoints loaded with `AutoModel` and the repository's own code;
- `dream`: Dream-style models, whose logits at position i predict token i+1 (shifted by one).
Remote code runs only when the user both allows it and pins a revision.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer, PretrainedConfig

from factory.models.embedded import EMBEDDED_MODEL_DIR, EMBEDDED_MODEL_ID

KINDS = ("auto", "masked_lm", "llada", "dream")
# The weights' precision; auto: bfloat16 where the hardware runs it fast (`bf16_is_fast`), else float32.
DTYPES = ("auto", "float32", "bfloat16")
# LLaDA's tokenizer has no mask token registered; its mask id is fixed by the model.
LLADA_MASK_ID = 126336


class RemoteCodeRefused(ValueError):
    pass


@dataclass
class ModelAdapter:
    model: torch.nn.Module
    tokenizer: object
    kind: str
    mask_id: int
    model_id: str
    revision: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Float32 logits aligned so that logits[:, i] is the distribution of token i."""
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        if self.kind == "dream":
            out = self.model(input_ids, *dream_attention(attention_mask)).logits
            return torch.cat([out[:, :1], out[:, :-1]], dim=1).float()
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()

    @classmethod
    def load(
        cls,
        model_id: str | Path | None = None,
        kind: str = "auto",
        revision: str | None = None,
        trust_remote_code: bool = False,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> ModelAdapter:
        """Load a model by hub id or path; `None` or 'embedded' loads the shipped embedded model.
        `dtype`: one of DTYPES or a torch dtype (see `resolve_dtype`)."""
        if kind not in KINDS:
            raise ValueError(f"model kind {kind!r} is not one of {KINDS}")
        path, name = resolve_model(model_id)
        pinned, recorded = revision, model_revision(model_id, revision)
        if not Path(path).is_dir():
            revision = recorded  # the weights come from the commit provenance records, even if the branch moves meanwhile
        raw_config, _ = PretrainedConfig.get_config_dict(path, revision=revision)
        if raw_config.get("auto_map") and not trust_remote_code:
            raise RemoteCodeRefused(f"{name} ships its own model code; set trust_remote_code=true and a pinned revision to run it")
        if trust_remote_code and not pinned:
            raise RemoteCodeRefused(f"{name}: trust_remote_code needs a pinned revision (a commit hash), so the code that runs is known")
        config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
        if kind == "auto":
            kind = guess_kind(getattr(config, "model_type", ""))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = resolve_dtype(dtype, device)
        loader = AutoModelForMaskedLM if kind == "masked_lm" else AutoModel
        model = loader.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype)
        tokenizer = load_tokenizer(model_id, kind, revision, trust_remote_code)
        mask_id = tokenizer.mask_token_id
        return cls(model.to(device).eval(), tokenizer, kind, mask_id, name, recorded)


def bf16_is_fast(device: str | torch.device | None = None) -> bool:
    """bf16 pays off on GPUs and on CPUs with native bf16 (AVX512-BF16, AMX), and is far slower than
    fp32 on AVX2. torch's capability string says only "AVX512" on such a CPU, so ask for the feature
    itself. No device: the one a model would be placed on (a GPU when there is one)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """The torch dtype of a DTYPES name on this device: auto is bfloat16 where `bf16_is_fast`, else
    float32. None keeps what callers got before the setting existed: bfloat16 on CUDA, float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"model dtype {dtype!r} is not one of {DTYPES}")
    if dtype == "auto":
        return torch.bfloat16 if bf16_is_fast(device) else torch.float32
    return getattr(torch, dtype)


def dream_attention(attention_mask: torch.Tensor) -> tuple[torch.Tensor | str, torch.Tensor | None]:
    """(attention mask, position ids) as Dream's own generate passes them: its attention hands the
    mask straight to SDPA, so a left-padded batch needs a [B, 1, L, L] bool mask and positions that
    skip the padding; a batch without padding is "full"."""
    if bool((attention_mask != 0).all()):
        return "full", None
    keep = attention_mask.bool()
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(~keep, 1)
    return keep[:, None, None, :] & keep[:, None, :, None], positions


def resolve_model(model_id: str | Path | None) -> tuple[str | Path, str]:
    """(where to load from, the name recorded in provenance); None or 'embedded' is the shipped model."""
    if model_id in (None, "embedded", EMBEDDED_MODEL_ID):
        return EMBEDDED_MODEL_DIR, EMBEDDED_MODEL_ID
    return model_id, str(model_id)


class ModelNotFound(ValueError):
    """A model id that names nothing this machine can load; the message is one line."""


@cache
def weights_digest(directory: Path) -> str:
    """sha256 of a local checkpoint's weight files: the revision of a model that has none."""
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin")):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as weights:  # in chunks: an 8B checkpoint's shards are GBs each
            while chunk := weights.read(1 << 24):
                digest.update(chunk)
    return f"sha256:{digest.hexdigest()[:12]}"


def looks_like_path(model_id: str) -> bool:
    """A Hub id is 'name' or 'org/name'; anything else (absolute, relative, deeper) is a local path."""
    return model_id.startswith(("/", ".", "~")) or model_id.count("/") > 1 or Path(model_id).exists()


def hub_commit(model_id: str, revision: str | None) -> str:
    """The commit an unpinned (or branch-pinned) Hub id resolves to now: the local cache's snapshot when
    offline (HF_HUB_OFFLINE), else the Hub's answer; one line and no retries when neither has it."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        cached = try_to_load_from_cache(model_id, "config.json", revision=revision)
        if not isinstance(cached, str):
            raise ModelNotFound(f"{model_id!r} is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set")
        return Path(cached).parent.name  # .../snapshots/<commit>/config.json
    try:
        return HfApi().model_info(model_id, revision=revision, timeout=10).sha
    except Exception as err:  # no network, no such repo, no access: say which, once
        detail = " ".join(str(err).split())[:160] or type(err).__name__
        raise ModelNotFound(f"{model_id!r} cannot be resolved on the Hub ({type(err).__name__}: {detail})") from None


def model_revision(model_id: str | Path | None, revision: str | None = None) -> str:
    """What provenance records as the model's revision, checked before any work: for a local
    checkpoint (the embedded one included) its weights' digest, for a Hub id the commit it resolves
    to (a pinned commit as given), so a resume after new weights is refused either way."""
    path, name = resolve_model(model_id)
    if Path(path).is_dir():
        if not any(Path(path).glob("*.safetensors")) and not any(Path(path).glob("*.bin")):
            raise ModelNotFound(f"{name!r} is a directory without model weights (*.safetensors or *.bin)")
        return revision or weights_digest(Path(path))
    if looks_like_path(str(path)):
        raise ModelNotFound(f"no such model directory {name!r}")
    if revision and len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):
        return revision
    return hub_commit(str(path), revision)


def load_tokenizer(
    model_id: str | Path | None = None,
    kind: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """The model's tokenizer, with a mask token registered (LLaDA's lives in the model config, or is
    LLaDA's fixed id). The driver loads it without the weights, so it reads the config itself: the
    driver and the actors must agree on the mask id."""
    path, name = resolve_model(model_id)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.mask_token_id is None:
        raw_config, _ = PretrainedConfig.get_config_dict(path, revision=revision)
        kind = guess_kind(raw_config.get("model_type", "")) if kind == "auto" else kind
        mask_id = raw_config.get("mask_token_id")
        mask_id = LLADA_MASK_ID if mask_id is None and kind == "llada" else mask_id
        if mask_id is None:
            raise ValueError(f"{name}: no mask token id in its tokenizer or config")
        tokenizer.add_special_tokens({"mask_token": tokenizer.convert_ids_to_tokens(mask_id)})
    return tokenizer


def guess_kind(model_type: str) -> str:
    model_type = model_type.lower()
    if "llada" in model_type:
        return "llada"
    if "dream" in model_type:
        return "dream"
    return "masked_lm"
