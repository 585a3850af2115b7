"""`model.dtype`: the setting reaches the model, `auto` is resolved in one place, and the default
(float32) leaves the spec hash, and so every trace id, as it was before the setting existed."""

import pytest
import torch
from pydantic import ValidationError

from factory.build.spec import BuildSpec, ModelSpec, validate_spec
from factory.build.stages import TraceMaker
from factory.models import adapter as adapter_module
from factory.models.adapter import ModelAdapter, resolve_dtype


def test_names_resolve_and_auto_follows_the_hardware(monkeypatch):
    assert resolve_dtype("float32", "cpu") is torch.float32 and resolve_dtype("bfloat16", "cpu") is torch.bfloat16
    assert resolve_dtype(torch.float16, "cpu") is torch.float16
    assert resolve_dtype(None, "cpu") is torch.float32 and resolve_dtype(None, "cuda") is torch.bfloat16  # what callers got before
    monkeypatch.setattr(adapter_module, "bf16_is_fast", lambda device=None: True)
    assert resolve_dtype("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(adapter_module, "bf16_is_fast", lambda device=None: False)
    assert resolve_dtype("auto", "cpu") is torch.float32
    with pytest.raises(ValueError, match="float16"):
        resolve_dtype("float16", "cpu")


def test_the_spec_refuses_an_unknown_dtype_and_its_default_keeps_the_hash():
    assert ModelSpec().dtype == "float32"
    with pytest.raises(ValidationError, match="dtype"):
        ModelSpec(dtype="float16")
    default = BuildSpec()
    assert "dtype" not in default.model_dump()["model"]  # the hash of a spec without the key is unchanged
    assert validate_spec({"model": {"dtype": "float32"}}).spec_hash() == default.spec_hash()
    bf16 = validate_spec({"model": {"dtype": "bfloat16"}})
    assert bf16.spec_hash() != default.spec_hash() and bf16.model_dump()["model"]["dtype"] == "bfloat16"
    assert validate_spec(bf16.model_dump()).model.dtype == "bfloat16"  # the dump round-trips


@pytest.mark.parametrize("dtype,expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_the_dtype_setting_reaches_the_model(tiny_model_dir, dtype, expected):
    assert ModelAdapter.load(tiny_model_dir, device="cpu", dtype=dtype).dtype is expected
    spec = validate_spec({"model": {"id": str(tiny_model_dir), "dtype": dtype}, "source": {"kind": "synthetic", "n": 2}})
    maker = TraceMaker(spec)
    assert maker.adapter.dtype is expected
    assert {p.dtype for p in maker.adapter.model.parameters()} == {expected}


def test_precision_bench_counts_rows_a_batch_changes_and_words_the_default(tiny_adapter, template):
    from factory.core.sampler import CanvasSampler, SamplerConfig
    from factory.lab.evaluate import decode_together, precision_decision, requests, rows_changed_by_batch
    from factory.synthetic.problems import SyntheticConfig, generate

    problems = generate(4, seed=4, config=SyntheticConfig(1, 5))
    sampler = CanvasSampler(tiny_adapter, template, SamplerConfig(rule="left_to_right"))
    batch = requests(template, problems, posterior=False, seed=0)
    assert rows_changed_by_batch(sampler, batch, decode_together(sampler, batch), alone=3) == 0  # float32: none
    changed = {"float32": {"greedy_left_to_right": 0, "build_sampler": 0, "rows": 8}}
    moved = precision_decision({**changed, "bfloat16": {"greedy_left_to_right": 2, "build_sampler": 1, "rows": 8}})
    assert "2 of 8 greedy rows" in moved and "stays `float32` by default" in moved
    assert "stays `float32` by default" in precision_decision({**changed, "bfloat16": changed["float32"]})
