"""Bad input: a clear error naming the fix, and the model left untouched."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import vtprune
from conftest import N_VISUAL, batch, images, prompt, tiny_llava


@pytest.fixture()
def fresh():
    model = tiny_llava(seed=4)
    ids, mask = batch([prompt([1], [7])])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=images(1)).logits
    return model, ids, mask, ref


def _untouched(model, ids, mask, ref):
    hooks = sum(len(m._forward_pre_hooks) for m in model.modules())
    assert hooks == 0
    assert "get_image_features" not in model.model.__dict__
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=images(1)).logits, ref)


@pytest.mark.parametrize("method,params,error,message", [
    ("fastv", {"keep": N_VISUAL + 1}, ValueError, f"larger than the {N_VISUAL} visual tokens per image; use keep <= {N_VISUAL}"),
    ("divprune", {"keep": 0}, ValueError, "must be a positive number of tokens"),
    ("random", {"keep": -3}, ValueError, "must be a positive number of tokens"),
    ("uniform", {"ratio": 1.5}, ValueError, "must be in (0, 1]"),
    ("nope", {}, ValueError, "unknown method 'nope'; registered methods: divprune, fastervlm, fastv"),
    ("fastv", {"kep": 5}, TypeError, "fastv has no parameter 'kep'; its parameters are: keep, ratio, layer"),
    ("fastv", {"layer": 4}, ValueError, "layer 4 is out of range; this model has 4 decoder layers"),
    ("fastv", {"layer": 0}, ValueError, "before layers 1..3"),
    ("fastv", {"query": "first"}, ValueError, "query='first' must be one of"),
    ("fastv", {"keep": 4, "ratio": 0.5}, ValueError, "either keep= or ratio="),
    ("tome", {"keep": 1}, ValueError, "cannot be reached by merging in the 3 ViT blocks before the feature layer; use keep >= 5"),
    ("pool", {"keep": 7}, ValueError, "cannot be written as h*w"),
])
def test_bad_parameters(fresh, method, params, error, message):
    model, ids, mask, ref = fresh
    with pytest.raises(error) as info:
        vtprune.apply(model, method, **params)
    assert message in str(info.value)
    _untouched(model, ids, mask, ref)


def test_unsupported_model_class():
    llm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, vocab_size=50))
    with pytest.raises(TypeError, match="does not support LlamaForCausalLM; supported model classes: "
                                        "LlavaForConditionalGeneration"):
        vtprune.apply(llm, "fastv")
    assert sum(len(m._forward_pre_hooks) for m in llm.modules()) == 0


def test_batch_without_image(fresh):
    model, ids, mask, ref = fresh
    text_ids, text_mask = batch([[1, 2, 3, 4]])
    with vtprune.apply(model, "fastv", keep=4), pytest.raises(ValueError, match="this batch has no image"):
        model(input_ids=text_ids, attention_mask=text_mask)
    _untouched(model, ids, mask, ref)


def test_apply_twice(fresh):
    model, ids, mask, ref = fresh
    first = vtprune.apply(model, "fastv", keep=4)
    with pytest.raises(RuntimeError, match=r"already has a vtprune pruner \(fastv\); call .remove\(\)"):
        vtprune.apply(model, "divprune", keep=4)
    first.remove()
    _untouched(model, ids, mask, ref)
    vtprune.apply(model, "divprune", keep=4).remove()  # allowed again after removal


def test_labels_are_refused(fresh):
    model, ids, mask, ref = fresh
    with vtprune.apply(model, "random", keep=4), pytest.raises(ValueError, match="labels"):
        model(input_ids=ids, attention_mask=mask, pixel_values=images(1), labels=ids)
    _untouched(model, ids, mask, ref)


def test_unsupported_attention_implementation(fresh):
    model, ids, mask, ref = fresh
    model.model.language_model.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(TypeError, match="attn_implementation='sdpa'"):
            vtprune.apply(model, "fastv")
    finally:
        model.model.language_model.config._attn_implementation = "sdpa"
    _untouched(model, ids, mask, ref)


def test_right_padding_is_refused(fresh):
    model, ids, mask, ref = fresh
    right_ids = torch.cat([ids, torch.zeros(1, 2, dtype=torch.long)], dim=1)
    right_mask = torch.cat([mask, torch.zeros(1, 2, dtype=torch.long)], dim=1)
    with vtprune.apply(model, "fastv", keep=4), pytest.raises(ValueError, match="padding_side = 'left'"):
        model(input_ids=right_ids, attention_mask=right_mask, pixel_values=images(1))
    _untouched(model, ids, mask, ref)
