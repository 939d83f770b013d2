"""Runtime behaviour on tiny random LLaVA models: identity at full budget, cache and batch parity, budgets,
positions, per-layer caches and restoring the model."""
from __future__ import annotations

import pytest
import torch

import vtprune
from vtprune.methods.fastv import _FastVDrop
from vtprune.methods import Method
from vtprune.runtime import DecodeOperator
from conftest import N_VISUAL, batch, greedy, images, prompt, tiny_llava

ALL = ["random", "uniform", "pool", "fastv", "fastervlm", "divprune", "tome"]
PARAMS = {"tome": {"keep": 16}}  # in-ViT merging needs a budget the 3 tiny blocks can reach


def budget(name: str) -> dict:
    return PARAMS.get(name, {"keep": 9})


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ALL)
def test_full_budget_is_identity(name, attn, model, eager_model):
    net = model if attn == "sdpa" else eager_model
    ids, mask = batch([prompt([1, 5, 6], [7, 8, 9])])
    pixels = images(1)
    with torch.no_grad():
        ref = net(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        ref_tokens, ref_logits = greedy(net, ids, mask, pixels)
        with vtprune.apply(net, name, keep=N_VISUAL):
            out = net(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
            tokens, logits = greedy(net, ids, mask, pixels)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)


def _fixed_scores(self, ctx):
    # A score independent of the query token, so recomputing without a cache ranks identically.
    n = ctx.valid.shape[1]
    return torch.arange(n, dtype=torch.float32).mul(7919).remainder(97).expand_as(ctx.valid)


@pytest.mark.parametrize("name", ALL)
def test_cache_parity(name, model, monkeypatch):
    """Pruned generate with the KV cache == recomputing the pruned sequence from scratch at every step."""
    monkeypatch.setattr(_FastVDrop, "scores", _fixed_scores)
    ids, mask = batch([prompt([1, 5, 6], [7, 8, 9]), prompt([2], [4, 4, 8, 9])])
    pixels = images(2)
    with torch.no_grad(), vtprune.apply(model, name, **budget(name)):
        cached = greedy(model, ids, mask, pixels)
        recomputed = greedy(model, ids, mask, pixels, use_cache=False)
    assert torch.equal(cached[0], recomputed[0])
    torch.testing.assert_close(cached[1], recomputed[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ALL)
def test_batch_parity_left_padding_and_ragged_counts(name, model):
    """A left-padded batch (different lengths, images, and image counts -> different kept counts) == single runs."""
    prompts = [prompt([1, 5], [7, 8, 9, 10, 11]), prompt([2], [4], images=2), prompt([1, 2, 3, 4, 5, 6], [9])]
    pixels = images(4, seed=3)
    per_sample = [pixels[0:1], pixels[1:3], pixels[3:4]]
    ids, mask = batch(prompts)
    with torch.no_grad(), vtprune.apply(model, name, **budget(name)) as pruner:
        tokens, logits = greedy(model, ids, mask, pixels)
        counts = pruner.stats.visual_tokens.clone()
        for row, (tokens_row, pix) in enumerate(zip(prompts, per_sample)):
            single_ids, single_mask = batch([tokens_row])
            single_tokens, single_logits = greedy(model, single_ids, single_mask, pix)
            assert torch.equal(tokens[row], single_tokens[0]), f"sample {row}"
            torch.testing.assert_close(logits[row], single_logits[0], atol=1e-4, rtol=1e-4)
            assert torch.equal(counts[row], pruner.stats.visual_tokens[0])
    assert counts[1, -1] == 2 * counts[0, -1]


@pytest.mark.parametrize("name,keep", [(n, k) for n in ALL for k in (4, 9, 16) if n not in ("tome", "pool")]
                         + [("pool", 4), ("pool", 9), ("pool", 12), ("tome", 16), ("tome", 20)])
def test_exact_budget_and_stats(name, keep, model):
    ids, mask = batch([prompt([1, 5], [7, 8]), prompt([3], [6, 6, 6])])
    with torch.no_grad(), vtprune.apply(model, name, keep=keep) as pruner:
        model(input_ids=ids, attention_mask=mask, pixel_values=images(2))
    layers = len(model.model.language_model.layers)
    expected = torch.full((2, layers), keep)
    if name == "fastv":
        expected[:, :1] = N_VISUAL  # 4 layers: K = max(1, round(2 * 4 / 32)) = 1
    assert torch.equal(pruner.stats.visual_tokens, expected)
    assert torch.equal(pruner.stats.original_visual_tokens, torch.tensor([N_VISUAL, N_VISUAL]))
    for b in range(2):
        assert len(pruner.stats.final_tokens[b]) == keep


def test_fastv_exact_kept_set_and_original_positions(model, monkeypatch):
    """Hand-made scores: the kept set is the top-k of the permutation, handed to layer K in ascending order with
    their original positions, and layers before K see every token."""
    permutation = torch.randperm(N_VISUAL, generator=torch.Generator().manual_seed(5)).float()
    prefix = [1, 5, 6]
    start = len(prefix)

    def scores(self, ctx):
        out = torch.zeros(ctx.valid.shape)
        out[:, start:start + N_VISUAL] = permutation
        return out

    monkeypatch.setattr(_FastVDrop, "scores", scores)
    seen = {}

    def spy(module, args, kwargs):
        seen[len(seen)] = kwargs["position_ids"].clone()

    ids, mask = batch([prompt(prefix, [7, 8, 9])])
    layers = model.model.language_model.layers
    with torch.no_grad(), vtprune.apply(model, "fastv", keep=6, layer=2) as pruner:
        handles = [layer.register_forward_pre_hook(spy, with_kwargs=True) for layer in layers]
        model(input_ids=ids, attention_mask=mask, pixel_values=images(1))
        for handle in handles:
            handle.remove()
    expected = permutation.argsort(descending=True)[:6].sort().values
    assert torch.equal(pruner.stats.kept_patches(0).nonzero().flatten(), expected)
    full = torch.arange(ids.shape[1])
    assert torch.equal(seen[0][0], full) and torch.equal(seen[1][0], full)
    kept_positions = torch.cat([full[:start], start + expected, full[start + N_VISUAL:]])
    assert torch.equal(seen[2][0], kept_positions)
    assert pruner.stats.visual_tokens[0].tolist() == [N_VISUAL, N_VISUAL, 6, 6]


def test_renumbered_positions_continue_during_decode(model):
    """With positions='renumber', the kept sequence is contiguous and decoding continues right after it."""
    seen = []

    def spy(module, args, kwargs):
        seen.append(kwargs["position_ids"].clone())

    ids, mask = batch([prompt([1, 5, 6], [7, 8, 9])])
    layer0 = model.model.language_model.layers[0]
    with torch.no_grad(), vtprune.apply(model, "uniform", keep=4, positions="renumber"):
        handle = layer0.register_forward_pre_hook(spy, with_kwargs=True)
        greedy(model, ids, mask, images(1), steps=3)
        handle.remove()
    n_kept = ids.shape[1] - N_VISUAL + 4
    assert torch.equal(seen[0][0], torch.arange(n_kept))
    assert [int(p[0, -1]) for p in seen[1:]] == [n_kept, n_kept + 1]


def test_in_llm_drop_gives_per_layer_cache_lengths(model):
    ids, mask = batch([prompt([1, 5, 6], [7, 8, 9])])
    with torch.no_grad(), vtprune.apply(model, "fastv", keep=5, layer=2):
        out = model(input_ids=ids, attention_mask=mask, pixel_values=images(1), use_cache=True)
    lengths = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    n = ids.shape[1]
    assert lengths == [n, n, n - N_VISUAL + 5, n - N_VISUAL + 5]


class _TrimVisualCache(DecodeOperator):
    """Test operator: drop every visual entry from the KV cache of layers >= 2 after prefill."""

    def trim(self, ctx):
        return {layer: torch.zeros_like(ctx.cache_visual[layer]) for layer in (2, 3)}


class _TrimMethod(Method):
    name = "trim-test"
    paper = "test"
    stages = ("decode",)

    def operators(self, adapter):
        return [_TrimVisualCache()]


def test_decode_stage_trims_kv_cache_and_keeps_generating(model):
    ids, mask = batch([prompt([1, 5, 6], [7, 8, 9]), prompt([2], [4, 4])])
    pixels = images(2)
    with torch.no_grad(), vtprune.apply(model, _TrimMethod()):
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=3,
                             do_sample=False, return_dict_in_generate=True)
    lengths = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    # Prefill of the longer prompt, then 2 cached decode steps (the 3rd token is sampled, not cached).
    n = ids.shape[1]
    assert lengths == [n + 2, n + 2, n - N_VISUAL + 2, n - N_VISUAL + 2]


def _snapshot(model):
    return (
        repr(model),
        {k: v.clone() for k, v in model.state_dict().items()},
        [(name, dict(m._forward_pre_hooks), dict(m._forward_hooks)) for name, m in model.named_modules()],
        dict(model.model.__dict__).get("get_image_features"),
    )


@pytest.mark.parametrize("name", ALL)
def test_remove_restores_model_exactly(name):
    model = tiny_llava(seed=2)
    ids, mask = batch([prompt([1, 5], [7, 8])])
    pixels = images(1)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        before = _snapshot(model)  # after a plain forward: transformers installs its own capture hooks lazily
        pruner = vtprune.apply(model, name, **budget(name))
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        pruner.remove()
        after = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    snapshot = _snapshot(model)
    assert snapshot[0] == before[0] and snapshot[2] == before[2] and snapshot[3] is before[3] is None
    assert all(torch.equal(before[1][k], v) for k, v in snapshot[1].items())
    assert torch.equal(after, ref)
    assert all("forward" not in layer.__dict__ for layer in model.model.vision_tower.encoder.layers)


@pytest.mark.parametrize("name", ["fastv", "divprune"])
def test_cache_and_batch_parity_with_eager_attention(name, eager_model, monkeypatch):
    monkeypatch.setattr(_FastVDrop, "scores", _fixed_scores)
    prompts = [prompt([1, 5], [7, 8, 9, 10]), prompt([2], [4], images=2)]
    pixels = images(3, seed=8)
    ids, mask = batch(prompts)
    with torch.no_grad(), vtprune.apply(eager_model, name, keep=6):
        cached = greedy(eager_model, ids, mask, pixels)
        recomputed = greedy(eager_model, ids, mask, pixels, use_cache=False)
        single = greedy(eager_model, *batch([prompts[1]]), pixels[1:])
    assert torch.equal(cached[0], recomputed[0]) and torch.equal(cached[0][1], single[0][0])
    torch.testing.assert_close(cached[1], recomputed[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cached[1][1], single[1][0], atol=1e-4, rtol=1e-4)
