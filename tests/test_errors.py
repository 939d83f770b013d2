"""Bad input: a clear error naming the fix, raised at apply() where it can be, and the model left untouched."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import vtprune
from conftest import N_VISUAL, batch, images, prompt, tiny_llava
from families import Family, picture


def _hooks(model) -> list:
    # transformers installs capture hooks of its own on the first forward: compare with those, not with zero
    return [(name, list(m._forward_pre_hooks.values()), list(m._forward_hooks.values()))
            for name, m in model.named_modules()]


@pytest.fixture()
def fresh():
    model = tiny_llava(seed=4)
    ids, mask = batch([prompt([1], [7])])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=images(1)).logits
    model._hooks_before = _hooks(model)
    return model, ids, mask, ref


def _untouched(model, ids, mask, ref):
    assert _hooks(model) == model._hooks_before
    assert "get_image_features" not in model.model.__dict__
    assert all("forward" not in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=images(1)).logits, ref)


@pytest.mark.parametrize("method,params,error,message", [
    ("fastv", {"keep": N_VISUAL + 1}, ValueError,
     f"larger than the {N_VISUAL} visual tokens per image; use keep <= {N_VISUAL}"),
    ("fastervlm", {"keep": N_VISUAL + 1}, ValueError, f"larger than the {N_VISUAL} visual tokens per view"),
    ("divprune", {"keep": 0}, ValueError, "keep=0 must be >= 1"),
    ("random", {"keep": -3}, ValueError, "keep=-3 must be >= 1"),
    ("random", {"keep": 4.0}, ValueError, "keep=4.0 must be an integer"),
    ("random", {"keep": True}, ValueError, "keep=True must be an integer"),
    ("uniform", {"ratio": 1.5}, ValueError, "ratio=1.5 must be <= 1"),
    ("uniform", {"ratio": 0}, ValueError, "ratio=0 must be > 0"),
    ("uniform", {"ratio": True}, ValueError, "ratio=True must be a number"),
    ("nope", {}, ValueError, "unknown method 'nope'; registered methods: atp, csp, divprune, fastervlm, fastv"),
    ("fastv", {"kep": 5}, TypeError, "fastv has no parameter 'kep'; its parameters are: keep, ratio, layer"),
    ("fastv", {"layer": 4}, ValueError, "layer 4 is out of range; this model has 4 decoder layers"),
    ("fastv", {"layer": 0}, ValueError, "before layers 1..3"),
    ("fastv", {"layer": 1.5}, ValueError, "layer=1.5 must be an integer"),
    ("fastv", {"query": "first"}, ValueError, "query='first' must be one of"),
    ("fastv", {"positions": "shifted"}, ValueError, "positions='shifted' must be one of ('original', 'renumber')"),
    ("fastv", {"separators": "none"}, ValueError, "separators='none' must be one of"),
    ("fastv", {"keep": 4, "ratio": 0.5}, ValueError, "either keep= or ratio="),
    ("tome", {"keep": 1}, ValueError,
     "cannot be reached by merging in the 3 ViT blocks before the feature layer; use keep >= 5"),
    ("tome", {"r": -3}, ValueError, "r=-3 must be >= 0"),
    ("tome", {"r": 2, "keep": 16}, ValueError, "give either r= (merges per block) or a budget"),
    ("tome", {"proportional_attention": "yes"}, ValueError, "proportional_attention='yes' must be True or False"),
    ("pool", {"keep": 7}, ValueError, "cannot be written as h*w"),
])
def test_bad_parameters(fresh, method, params, error, message):
    model, ids, mask, ref = fresh
    with pytest.raises(error) as info:
        vtprune.apply(model, method, **params)
    assert message in str(info.value)
    _untouched(model, ids, mask, ref)


def test_numpy_scalars_are_budgets(fresh):
    model, ids, mask, ref = fresh
    with torch.no_grad(), vtprune.apply(model, "random", keep=np.int64(5)) as pruner:
        model(input_ids=ids, attention_mask=mask, pixel_values=images(1))
    assert pruner.stats.visual_tokens[0, 0] == 5
    vtprune.apply(model, "uniform", ratio=np.float32(0.5)).remove()
    _untouched(model, ids, mask, ref)


def test_unsupported_model_class():
    llm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, vocab_size=50))
    with pytest.raises(TypeError, match="does not support LlamaForCausalLM; supported model classes: "
                                        "LlavaForConditionalGeneration"):
        vtprune.apply(llm, "fastv")
    assert sum(len(m._forward_pre_hooks) for m in llm.modules()) == 0


@pytest.mark.parametrize("method", ["fastervlm", "tome"])
def test_methods_needing_cls_or_vit_merging_are_refused_on_qwen(method):
    model = Family("qwen2_vl").model()
    needs = r"\[CLS\] token" if method == "fastervlm" else "merged between vision-tower blocks"
    with pytest.raises(TypeError, match=rf"{method} needs a model where .*{needs}.*Qwen2VLForConditionalGeneration.*"
                                        r"Methods that run on it: atp, csp, divprune, fastv, feather, mustdrop_decode, "
                                        r"mustdrop_prefill, pool, pyramiddrop, random, uniform"):
        vtprune.apply(model, method)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_renumbering_is_refused_on_m_rope():
    model = Family("qwen2_5_vl").model()
    with pytest.raises(ValueError, match="positions='renumber' has no meaning for qwen2_5_vl's 3-D M-RoPE"):
        vtprune.apply(model, "divprune", positions="renumber")
    vtprune.apply(model, "divprune").remove()  # its default ('renumber' on LLaVA) becomes 'original' here


def test_apply_twice_and_on_the_inner_model(fresh):
    model, ids, mask, ref = fresh
    first = vtprune.apply(model, "fastv", keep=4)
    for target in (model, model.model):
        with pytest.raises(RuntimeError, match=r"already has a vtprune pruner \(fastv\) on it or on the model that "
                                               r"contains it; call .remove\(\)"):
            vtprune.apply(target, "divprune", keep=4)
    first.remove()
    _untouched(model, ids, mask, ref)
    inner = vtprune.apply(model.model, "divprune", keep=4)
    with pytest.raises(RuntimeError, match="already has a vtprune pruner"):
        vtprune.apply(model, "random", keep=4)
    inner.remove()
    vtprune.apply(model, "divprune", keep=4).remove()  # allowed again after removal
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


def test_unsupported_feature_layer_settings_are_refused():
    model = tiny_llava(seed=5)
    model.config.vision_feature_layer = [-2, -3]
    with pytest.raises(TypeError, match=r"vision_feature_layer=\[-2, -3\]: vtprune supports a single feature layer"):
        vtprune.apply(model, "random")
    model.config.vision_feature_layer = -2
    ids, mask = batch([prompt([1], [7])])
    with vtprune.apply(model, "random", keep=4), \
            pytest.raises(ValueError, match="vision_feature_select_strategy='full'"):
        model(input_ids=ids, attention_mask=mask, pixel_values=images(1), vision_feature_select_strategy="full")


def test_static_cache_is_refused_with_the_fix():
    family = Family("llava")
    model = family.model()
    inputs = family.inputs([["user:", picture(90, 90, 1), "what", "?"]])
    with vtprune.apply(model, "random", keep=4), pytest.raises(ValueError, match="needs a DynamicCache.*drop "
                                                                                   "cache_implementation='static'"):
        model.generate(**inputs, max_new_tokens=3, do_sample=False, cache_implementation="static")


def test_chunked_prefill_is_refused_with_the_fix():
    family = Family("llava")
    model = family.model()
    inputs = family.inputs([["user:", picture(90, 90, 1), "what", "is", "in", "the", "image", "?"]])
    with vtprune.apply(model, "random", keep=4), pytest.raises(ValueError, match="prefill_chunk_size unset"):
        model.generate(**inputs, max_new_tokens=3, do_sample=False, prefill_chunk_size=16)


def test_images_in_a_cached_continuation_are_refused():
    family = Family("llava")
    model = family.model()
    first = family.inputs([["user:", picture(90, 90, 1), "what", "?"]])
    with torch.no_grad(), vtprune.apply(model, "random", keep=4):
        out = model(**first, use_cache=True)
        second = family.inputs([["and", picture(60, 60, 2), "?"]])
        mask = torch.cat([first["attention_mask"], second["attention_mask"]], dim=1)
        with pytest.raises(ValueError, match="continuing a pruned cache with new images is not supported"):
            model(input_ids=second["input_ids"], pixel_values=second["pixel_values"], attention_mask=mask,
                  past_key_values=out.past_key_values)


def test_images_with_inputs_embeds_only_are_refused(fresh):
    model, ids, mask, ref = fresh
    embeds = model.get_input_embeddings()(ids)
    with vtprune.apply(model, "random", keep=4), pytest.raises(ValueError, match="pass input_ids, not inputs_embeds"):
        model(inputs_embeds=embeds, attention_mask=mask, pixel_values=images(1))
    _untouched(model, ids, mask, ref)


def test_a_pruned_cache_is_not_continued_without_its_pruner():
    family = Family("llava")
    model = family.model()
    inputs = family.inputs([["user:", picture(90, 90, 1), "what", "?"]])
    with torch.no_grad():
        with vtprune.apply(model, "fastv", keep=4, layer=1):
            cache = model(**inputs, use_cache=True).past_key_values
        step = {"input_ids": torch.tensor([[6]]),
                "attention_mask": torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)}
        with pytest.raises(RuntimeError, match="its pruner was removed; continue it with that pruner installed"):
            model(**step, past_key_values=cache)
        with vtprune.apply(model, "fastv", keep=4, layer=1), pytest.raises(
                RuntimeError, match="filled under another vtprune pruner"):
            model(**step, past_key_values=cache)
