"""The adapter over custom-code diffusion models, proven on tiny models the test writes itself."""

import copy
import json
import shutil
import textwrap

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from factory.core.sampler import CanvasSampler, SamplerConfig
from factory.core.template import ReasoningTemplate
from factory.models.adapter import ModelAdapter, RemoteCodeRefused, load_tokenizer

MODELING = textwrap.dedent(
    '''
    import torch
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import MaskedLMOutput


    class CopyConfig(PretrainedConfig):
        model_type = "{model_type}"

        def __init__(self, vocab_size=8, shift=False, **kwargs):
            super().__init__(**kwargs)
            self.vocab_size, self.shift = vocab_size, shift


    class CopyModel(PreTrainedModel):
        """Predicts each position's own token (LLaDA-style) or the next one (Dream-style, shifted)."""

        config_class = CopyConfig

        def __init__(self, config):
            super().__init__(config)
            self.scale = torch.nn.Parameter(torch.tensor(10.0))
            self.post_init()

        def _init_weights(self, module):
            pass

        def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
            if self.config.shift:  # Dream's attention hands the mask straight to SDPA
                q = torch.zeros(input_ids.shape[0], 1, input_ids.shape[1], 4)
                mask = attention_mask if isinstance(attention_mask, torch.Tensor) else None
                torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
                self.received = (attention_mask, position_ids)
            target = torch.roll(input_ids, -1, dims=1) if self.config.shift else input_ids
            logits = torch.nn.functional.one_hot(target, self.config.vocab_size).float() * self.scale
            return MaskedLMOutput(logits=logits)
    '''
)


def write_copy_model(tmp_path, tokenizer, model_type, shift, mask_in_config=False):
    import importlib.util

    (tmp_path / "modeling_copy.py").write_text(MODELING.format(model_type=model_type))
    spec = importlib.util.spec_from_file_location(f"modeling_copy_{model_type}", tmp_path / "modeling_copy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.CopyModel(module.CopyConfig(vocab_size=len(tokenizer), shift=shift)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_copy.CopyConfig", "AutoModel": "modeling_copy.CopyModel"}
    if mask_in_config:  # LLaDA's way: the mask id lives in the model config, not the tokenizer
        config["mask_token_id"] = tokenizer.mask_token_id
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.mask_token = None
    (tmp_path / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("model_type,shift,kind", [("tiny-llada", False, "llada"), ("tiny-dream", True, "dream")])
def test_custom_code_models_load_with_aligned_logits(tmp_path, tokenizer, model_type, shift, kind):
    path = write_copy_model(tmp_path, tokenizer, model_type, shift)
    adapter = ModelAdapter.load(path, trust_remote_code=True, revision="0123abc", device="cpu")
    assert adapter.kind == kind and adapter.mask_id == tokenizer.mask_token_id
    ids = torch.tensor([[5, 9, 11, 7, 3]])
    predicted = adapter.logits(ids, torch.ones_like(ids)).argmax(-1)
    # after alignment, position i predicts token i for both (Dream's first position has no source)
    assert predicted[0, 1:].tolist() == ids[0, 1:].tolist()
    # and the sampler runs on top of it unchanged
    template = ReasoningTemplate(adapter.tokenizer)
    result = CanvasSampler(adapter, template, SamplerConfig(rule="left_to_right")).generate(["Tom has 5 apples."])[0]
    assert result.nfe == template.config.reasoning_slots + template.config.answer_slots


def test_dream_gets_its_own_attention_mask_and_positions_for_a_padded_batch(tmp_path, tokenizer):
    path = write_copy_model(tmp_path, tokenizer, "tiny-dream", True)
    adapter = ModelAdapter.load(path, trust_remote_code=True, revision="0123abc", device="cpu")
    template = ReasoningTemplate(adapter.tokenizer)
    ids, attention = template.collate(
        [template.canvas(template.encode_question(q)) for q in ("Tom has 5 apples.", "Tom has 5 apples. He buys 3.")]
    )
    adapter.logits(ids, attention)  # a 2-D integer mask made SDPA raise here
    mask, positions = adapter.model.received
    pad = int((attention[0] == 0).sum())
    assert mask.dtype == torch.bool and mask.shape == (2, 1, ids.shape[1], ids.shape[1])
    assert not mask[0, 0, pad:, :pad].any() and mask[0, 0, pad:, pad:].all() and mask[1].all()
    assert positions[0, pad:].tolist() == list(range(ids.shape[1] - pad)) and positions[1].tolist() == list(range(ids.shape[1]))
    adapter.logits(ids[1:], attention[1:])
    assert adapter.model.received == ("full", None)  # no padding: Dream's own convention


@pytest.mark.parametrize("kind", ["auto", "llada"])
def test_the_driver_finds_a_mask_id_that_lives_in_the_model_config(tmp_path, tokenizer, kind):
    path = write_copy_model(tmp_path, tokenizer, "tiny-llada", False, mask_in_config=True)
    assert AutoTokenizer.from_pretrained(path).mask_token_id is None
    assert load_tokenizer(path, kind).mask_token_id == tokenizer.mask_token_id  # the driver: no weights loaded
    adapter = ModelAdapter.load(path, kind, trust_remote_code=True, revision="0123abc", device="cpu")
    assert adapter.mask_id == tokenizer.mask_token_id and adapter.kind == "llada"


def test_remote_code_is_refused_unless_allowed_and_pinned(tmp_path, tokenizer):
    path = write_copy_model(tmp_path, tokenizer, "tiny-llada", False)
    with pytest.raises(RemoteCodeRefused, match="trust_remote_code"):
        ModelAdapter.load(path)
    with pytest.raises(RemoteCodeRefused, match="pinned revision"):
        ModelAdapter.load(path, trust_remote_code=True)


def test_embedded_model_loads_with_auto_classes_and_no_remote_code():
    from factory.models.embedded import EMBEDDED_MODEL_DIR

    assert (EMBEDDED_MODEL_DIR / "model.safetensors").exists() and not list(EMBEDDED_MODEL_DIR.glob("*.py"))
    model = AutoModelForMaskedLM.from_pretrained(EMBEDDED_MODEL_DIR)
    assert sum(p.numel() for p in model.parameters()) < 25e6 / 4
    assert ModelAdapter.load("embedded", device="cpu").kind == "masked_lm"


def test_a_local_checkpoint_records_the_digest_of_its_weights(tmp_path, tiny_model_dir):
    """The embedded model and any local directory have no Hub revision; provenance records what was loaded."""
    first = ModelAdapter.load(tiny_model_dir, device="cpu").revision
    assert first.startswith("sha256:") and ModelAdapter.load(tiny_model_dir, revision="v1", device="cpu").revision == "v1"
    changed = tmp_path / "changed"
    shutil.copytree(tiny_model_dir, changed)
    model = AutoModelForMaskedLM.from_pretrained(changed)
    with torch.no_grad():
        model.get_input_embeddings().weight[5] += 1.0
    model.save_pretrained(changed)
    assert ModelAdapter.load(changed, device="cpu").revision not in (first, None)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="not one of"):
        ModelAdapter.load("embedded", kind="gpt")
