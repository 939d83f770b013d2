"""Regression tests for the defects found when the library was tried hard (runtime v2 issue, item 5)."""
from __future__ import annotations

import copy
import gc
import threading
import weakref

import pytest
import torch

import vtprune
from families import Family, greedy, picture

LLAVA = Family("llava")


@pytest.fixture(scope="module")
def model():
    return LLAVA.model(seed=11)


def _two_rows():
    return LLAVA.inputs([["user:", picture(90, 90, 1), "what", "is", "in", "the", "image", "?", "assistant:"],
                         ["user:", picture(70, 120, 2), "describe", "assistant:"]])


def _extend(inputs, new: torch.Tensor) -> dict:
    return {"input_ids": torch.cat([inputs["input_ids"], new], dim=1),
            "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(new)], dim=1)}


def test_sdpa_continuation_with_several_new_tokens_matches_unpruned(model):
    """A second turn reusing past_key_values feeds several tokens at once; at full budget it equals the model (no
    padding anywhere: the case where SDPA's own causal flag, aligned to the first key, would be used)."""
    inputs = LLAVA.inputs([["user:", picture(90, 90, 1), "what", "is", "in", "the", "image", "?", "assistant:"]])
    new = torch.tensor([[6, 7, 12]])
    with torch.no_grad():
        reference_cache = model(**inputs, use_cache=True).past_key_values
        extended = _extend(inputs, new)
        reference = model(input_ids=new, attention_mask=extended["attention_mask"],
                          past_key_values=reference_cache).logits
        with vtprune.apply(model, "fastv", ratio=1.0):
            cache = model(**inputs, use_cache=True).past_key_values
            logits = model(input_ids=new, attention_mask=extended["attention_mask"], past_key_values=cache).logits
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)


def test_second_generate_on_a_pruned_cache_feeds_only_the_new_tokens(model):
    """generate() slices a continued prompt at the cache's length: a pruned cache reports the tokens it has seen."""
    inputs = _two_rows()
    fed = []
    with torch.no_grad(), vtprune.apply(model, "uniform", keep=9):
        handle = model.model.language_model.register_forward_pre_hook(
            lambda module, args, kwargs: fed.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
        first = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        turn = torch.tensor([[6, 7], [13, 14]])
        second_inputs = _extend({"input_ids": first.sequences, "attention_mask": torch.cat(
            [inputs["attention_mask"], torch.ones(2, 3, dtype=torch.long)], dim=1)}, turn)
        fed.clear()
        second = model.generate(**second_inputs, past_key_values=first.past_key_values, max_new_tokens=3,
                                do_sample=False, output_logits=True, return_dict_in_generate=True)
        handle.remove()
        recomputed = greedy(model, {**second_inputs, "pixel_values": inputs["pixel_values"]}, steps=3,
                            use_cache=False)
    assert fed[0] == 3  # the last generated token of turn 1 (not yet cached) and the two new ones
    assert torch.equal(second.sequences[:, second_inputs["input_ids"].shape[1]:], recomputed[0])
    torch.testing.assert_close(torch.stack(second.logits, 1), recomputed[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("query", ["text", "all"])
def test_fastv_text_and_all_queries_on_a_left_padded_row(model, query, monkeypatch):
    """Padded query rows have no visible key: their softmax must not turn the scores into NaN (which made the kept
    set the first k patches of a padded row)."""
    from vtprune.methods.fastv import _FastVDrop

    scores, original = [], _FastVDrop.scores
    monkeypatch.setattr(_FastVDrop, "scores", lambda self, ctx: scores.append(original(self, ctx)) or scores[-1])
    short = ["user:", picture(70, 120, 6), "describe", "assistant:"]
    inputs = LLAVA.inputs([["user:", picture(90, 90, 1), "what", "is", "in", "the", "image", "?", "assistant:"],
                           short])
    with torch.no_grad(), vtprune.apply(model, "fastv", keep=6, query=query, layer=2) as pruner:
        model(**inputs)
        batched = pruner.stats.kept_patches(1)
        model(**LLAVA.inputs([short]))
        alone = pruner.stats.kept_patches(0)
    assert all(bool(torch.isfinite(s).all()) for s in scores)
    assert torch.equal(batched, alone)
    if query == "text":  # ('all' favours early tokens by construction: each row sees only the keys before it)
        assert not torch.equal(alone.nonzero().flatten(), torch.arange(6))


def test_deepcopy_of_a_pruned_model_is_refused(model):
    with vtprune.apply(model, "fastv", keep=4):
        with pytest.raises(RuntimeError, match="a copy would be half-pruned.*Copy the model before vtprune.apply"):
            copy.deepcopy(model)
    copy.deepcopy(model)  # fine again once removed


def test_remove_restores_earlier_instance_overrides():
    model = LLAVA.model(seed=12)
    inputs = _two_rows()
    original_features = model.model.get_image_features

    def get_image_features(*args, **kwargs):  # e.g. a user's instrumentation
        return original_features(*args, **kwargs)

    block = model.model.vision_tower.vision_model.encoder.layers[1] if hasattr(
        model.model.vision_tower, "vision_model") else model.model.vision_tower.encoder.layers[1]
    original_forward = block.forward

    def forward(*args, **kwargs):  # e.g. accelerate's device-placement wrapper
        return original_forward(*args, **kwargs)

    model.model.get_image_features = get_image_features
    block.forward = forward
    with torch.no_grad():
        reference = model(**inputs).logits
        with vtprune.apply(model, "tome", keep=16):
            model(**inputs)
        after = model(**inputs).logits
    assert model.model.__dict__["get_image_features"] is get_image_features
    assert block.__dict__["forward"] is forward
    assert torch.equal(after, reference)


def test_per_call_vision_feature_layer_is_honoured(model):
    inputs = _two_rows()
    with torch.no_grad():
        reference = model(**inputs, vision_feature_layer=-3).logits
        with vtprune.apply(model, "fastervlm", ratio=1.0):
            full = model(**inputs, vision_feature_layer=-3).logits
        with vtprune.apply(model, "fastervlm", keep=6) as pruner:
            model(**inputs, vision_feature_layer=-3)
            minus_three = pruner.stats.kept_patches(0)
            model(**inputs)
            minus_two = pruner.stats.kept_patches(0)
        tower = model.model.vision_tower(inputs["pixel_values"][:1], output_hidden_states=True)
        block = len(tower.hidden_states) - 3 - 1  # hidden_states[-3] is the output of this block
        layer = model.model.vision_tower.encoder.layers[block]
        from vtprune.models import clip
        row = clip.attention_rows(layer, tower.hidden_states[block], torch.tensor([0]))[0, :, 0, 1:].mean(0)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(full[valid], reference[valid], atol=1e-5, rtol=1e-5)
    assert torch.equal(minus_three.nonzero().flatten(), row.topk(6).indices.sort().values)
    assert not torch.equal(minus_three, minus_two)


def test_a_pruner_never_removed_does_not_keep_its_model_alive():
    model = LLAVA.model(seed=13)
    vtprune.apply(model, "fastv", keep=4)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_random_on_bf16_images_matches_fp32(model):
    inputs = _two_rows()
    bf16_model = LLAVA.model(seed=11, dtype=torch.bfloat16)
    with torch.no_grad():
        with vtprune.apply(model, "random", keep=7) as pruner:
            model(**inputs)
        fp32 = [pruner.stats.kept_patches(b) for b in range(2)]
        with vtprune.apply(bf16_model, "random", keep=7) as pruner:
            bf16_model(**{**inputs, "pixel_values": inputs["pixel_values"].to(torch.bfloat16)})
        bf16 = [pruner.stats.kept_patches(b) for b in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(fp32, bf16))


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
@pytest.mark.parametrize("options", [{"num_beams": 3}, {"num_return_sequences": 2, "do_sample": True}],
                         ids=["beams", "return_sequences"])
def test_beams_and_return_sequences_expand_the_images(family, options):
    family = Family(family)
    net = family.model(seed=14)
    inputs = family.inputs([["user:", picture(100, 160, 3), "what", "?"], ["user:", picture(90, 90, 4), "?"]])
    kwargs = dict(max_new_tokens=3, **options, **({"do_sample": False} if "do_sample" not in options else {}))
    with torch.no_grad():
        torch.manual_seed(0)
        reference = net.generate(**inputs, **kwargs)
        with vtprune.apply(net, "fastv", ratio=1.0):
            torch.manual_seed(0)
            full = net.generate(**inputs, **kwargs)
        with vtprune.apply(net, "divprune", keep=5) as pruner:
            pruned = net.generate(**inputs, **kwargs)
    assert torch.equal(full, reference)
    expanded = 6 if "num_beams" in options else 4
    assert pruned.shape[0] == reference.shape[0] and pruner.stats.visual_tokens.shape[0] == expanded
    assert (pruner.stats.visual_tokens[:, 0] == 5).all()


def test_placeholders_with_a_text_token_inside_are_refused(model):
    inputs = _two_rows()
    ids = inputs["input_ids"].clone()
    run = (ids[0] == 99).nonzero().flatten()
    ids[0, run[10]], ids[0, -1] = 7, 99  # a text token inside the image run, the placeholder moved to the end
    with vtprune.apply(model, "random", keep=4), \
            pytest.raises(ValueError, match="must be consecutive; row 0 has a gap"):
        model(**{**inputs, "input_ids": ids})


def test_fastv_keeps_its_budget_per_image(model):
    inputs = LLAVA.inputs([["user:", picture(90, 90, 1), "and", picture(80, 100, 2), "compare", "?"]])
    with torch.no_grad(), vtprune.apply(model, "fastv", keep=16, layer=1) as pruner:
        model(**inputs)
    assert pruner.stats.tokens_per_image[0][:, -1].tolist() == [16, 16]


@pytest.mark.parametrize("method", ["uniform", "fastervlm", "fastv"])
def test_prompt_lookup_decoding(model, method):
    """Assisted decoding verifies draft tokens several at a time and crops the cache after a rejection. For methods
    whose choice does not depend on the last token it equals plain greedy; FastV's first forward holds the prompt
    and the first draft tokens, so it scores with the last draft token (documented), and still decodes cleanly."""
    inputs = LLAVA.inputs([["user:", picture(90, 90, 1), "what", "is", "in", "the", "image", "?", "what", "is"]])
    with torch.no_grad(), vtprune.apply(model, method, keep=6, **({"layer": 1} if method == "fastv" else {})):
        plain = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, prompt_lookup_num_tokens=2,
                             return_dict_in_generate=True)
        cache = out.past_key_values
        assert cache.get_seq_length() == out.sequences.shape[1] - 1
        assert len({layer.keys.shape[-2] for layer in cache.layers[1 if method == "fastv" else 0:]}) == 1
    if method != "fastv":
        assert torch.equal(out.sequences, plain)


def test_two_threads_on_one_pruned_model(model):
    first = LLAVA.inputs([["user:", picture(90, 90, 1), "what", "?"]])
    second = LLAVA.inputs([["user:", picture(70, 120, 2), "describe", "the", "image", "?"]])
    results = {}
    with torch.no_grad(), vtprune.apply(model, "fastv", keep=6, layer=1):
        expected = {name: greedy(model, inputs, steps=5)[0] for name, inputs in (("a", first), ("b", second))}

        def run(name, inputs):
            with torch.no_grad():
                for _ in range(3):
                    results.setdefault(name, []).append(greedy(model, inputs, steps=5)[0])

        threads = [threading.Thread(target=run, args=args) for args in (("a", first), ("b", second))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for name in ("a", "b"):
        assert len(results[name]) == 3 and all(torch.equal(r, expected[name]) for r in results[name])


def test_an_interrupted_forward_leaves_no_state_behind(model):
    inputs = _two_rows()
    layer = model.model.language_model.layers[2]

    def fail(module, args, kwargs):
        raise RuntimeError("interrupted")

    embeds = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model.model.language_model(inputs_embeds=embeds).last_hidden_state
        with vtprune.apply(model, "fastv", keep=4, layer=1):
            handle = layer.register_forward_pre_hook(fail, with_kwargs=True)
            with pytest.raises(RuntimeError, match="interrupted"):
                model(**inputs)
            handle.remove()
            direct = model.model.language_model(inputs_embeds=embeds).last_hidden_state
    torch.testing.assert_close(direct, reference)
