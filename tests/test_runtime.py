"""Runtime mechanisms on tiny random LLaVA models: kept sets and positions, per-layer caches, and the transitions
beyond dropping (merging inside the LLM, bringing tokens back, layer-0 drops, soft masks for training, decode-time
eviction). Invariants across every family and method are in test_invariants.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import vtprune
from vtprune.methods import Method
from vtprune.methods.fastv import _FastVDrop
from vtprune.runtime import DecodeOperator, LayerOperator, Transition
from conftest import N_VISUAL, batch, greedy, images, prompt, tiny_llava


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


def _positions_seen(model, steps: int, **params) -> list[list[torch.Tensor]]:
    """position_ids handed to every decoder layer, per forward (prefill, then each decode step)."""
    seen: list[list[torch.Tensor]] = []
    layers = model.model.language_model.layers

    def spy(index):
        def hook(module, args, kwargs):
            if index == 0:
                seen.append([])
            seen[-1].append(kwargs["position_ids"][0].clone())
        return hook

    ids, mask = batch([prompt([1, 5, 6], [7, 8, 9])])
    with torch.no_grad(), vtprune.apply(model, **params):  # spies after the pruner's hooks: they see what layers get
        handles = [layer.register_forward_pre_hook(spy(i), with_kwargs=True) for i, layer in enumerate(layers)]
        greedy(model, ids, mask, images(1), steps=steps)
    for handle in handles:
        handle.remove()
    return seen


def test_renumbered_positions_continue_during_decode(model):
    """With positions='renumber', the kept sequence is contiguous and decoding continues right after it."""
    seen = _positions_seen(model, 3, method="uniform", keep=4, positions="renumber")
    n_kept = 3 + 4 + 1 + 3
    assert torch.equal(seen[0][0], torch.arange(n_kept))
    assert [int(step[0][-1]) for step in seen[1:]] == [n_kept, n_kept + 1]


def test_fastv_renumber_renumbers_layers_after_k_only(model):
    """FastV positions='renumber': layers < K keep the original positions, layers >= K count only the survivors,
    in prefill and in every decode step (each layer decodes with its own positions)."""
    seen = _positions_seen(model, 3, method="fastv", keep=4, layer=2, positions="renumber")
    n = 3 + N_VISUAL + 1 + 3
    kept = n - N_VISUAL + 4
    prefill = seen[0]
    assert torch.equal(prefill[1], torch.arange(n)) and torch.equal(prefill[2], torch.arange(kept))
    for step, positions in enumerate(seen[1:]):
        assert int(positions[0][-1]) == n + step and int(positions[1][-1]) == n + step
        assert int(positions[2][-1]) == kept + step and int(positions[3][-1]) == kept + step
    original = _positions_seen(model, 2, method="fastv", keep=4, layer=2)
    assert not torch.equal(original[0][2], prefill[2])


def test_in_llm_drop_gives_per_layer_cache_lengths(model):
    ids, mask = batch([prompt([1, 5, 6], [7, 8, 9])])
    with torch.no_grad(), vtprune.apply(model, "fastv", keep=5, layer=2):
        out = model(input_ids=ids, attention_mask=mask, pixel_values=images(1), use_cache=True)
        assert out.past_key_values.get_seq_length() == ids.shape[1]  # the logical length: tokens seen
    lengths = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    n = ids.shape[1]
    assert lengths == [n, n, n - N_VISUAL + 5, n - N_VISUAL + 5]


class _Scripted(Method):
    """A test method whose operators are given directly."""

    name = "scripted"
    paper = "test"
    stages = ("pre_llm", "layer", "decode")

    def __init__(self, *ops, **values) -> None:
        super().__init__(**values)
        self.ops = list(ops)

    def operators(self, adapter):
        return self.ops


class _Drop(LayerOperator):
    """Keep visual tokens whose row number is even (or: merge each odd one into the even one after it)."""

    needs_previous_input = False

    def __init__(self, layer: int, merge: bool = False) -> None:
        self.layers, self.merge = (layer,), merge

    def transform(self, ctx):
        keep = ctx.rows % 2 == 0
        merge_into = None
        if self.merge:
            merge_into = torch.where(ctx.candidate & ~keep, torch.arange(ctx.rows.shape[1]) + 1, -1)
        return Transition(keep=keep, merge_into=merge_into)


class _Restore(LayerOperator):
    """Bring back every visual token of the LLM-input sequence that is not present, with its layer-0 state."""

    needs_previous_input = False

    def __init__(self, layer: int) -> None:
        self.layers = (layer,)

    def transform(self, ctx):
        present = torch.zeros_like(ctx.universe_visual).scatter(1, ctx.rows.clamp_min(0), ctx.valid)
        missing = ctx.universe_visual & ~present
        rows = torch.where(missing, torch.arange(missing.shape[1]), -1)
        hidden = ctx.universe_hidden
        return Transition(restore=rows, restore_hidden=hidden)


def _inputs_per_layer(model, params, ids, mask, pixels):
    seen = {}

    def spy(index):
        def hook(module, args, kwargs):
            seen[index] = (args[0] if args else kwargs["hidden_states"]).clone()
        return hook

    with torch.no_grad(), vtprune.apply(model, params) as pruner:
        handles = [layer.register_forward_pre_hook(spy(i), with_kwargs=True)
                   for i, layer in enumerate(model.model.language_model.layers)]
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True)
    for handle in handles:
        handle.remove()
    return seen, pruner.stats, out


def test_merge_inside_the_llm_is_a_size_weighted_mean(model):
    ids, mask = batch([prompt([1, 5, 6], [7, 8, 9])])
    pixels = images(1)
    plain, _, _ = _inputs_per_layer(model, _Scripted(_Drop(2)), ids, mask, pixels)
    merged, stats, _ = _inputs_per_layer(model, _Scripted(_Drop(2, merge=True)), ids, mask, pixels)
    # Rows 0-2 are text, 3-38 the image: odd row 3 merges into even row 4, which moves to index 3 after the drop.
    layer_one = _inputs_per_layer(model, _Scripted(), ids, mask, pixels)[0][2]
    torch.testing.assert_close(merged[2][0, 3], (layer_one[0, 3] + layer_one[0, 4]) / 2)
    torch.testing.assert_close(plain[2][0, 3], layer_one[0, 4])
    assert not torch.equal(plain[2][0, 3], merged[2][0, 3])
    assert stats.visual_tokens[0].tolist() == [N_VISUAL, N_VISUAL, N_VISUAL // 2, N_VISUAL // 2]
    assert bool(stats.kept_patches(0).all())  # every dropped token lives on in the token it merged into


def test_restored_tokens_rejoin_in_order_with_three_cache_lengths(model):
    ids, mask = batch([prompt([1, 5, 6], [7, 8, 9]), prompt([2], [4, 4])])
    pixels = images(2)
    method = _Scripted(_Drop(1), _Restore(3))
    seen, stats, out = _inputs_per_layer(model, method, ids, mask, pixels)
    n = ids.shape[1]
    assert stats.visual_tokens[0].tolist() == [N_VISUAL, N_VISUAL // 2, N_VISUAL // 2, N_VISUAL]
    assert [layer.keys.shape[-2] for layer in out.past_key_values.layers] == [n, n - N_VISUAL // 2,
                                                                              n - N_VISUAL // 2, n]
    assert seen[3].shape[1] == n
    # Restored with their layer-0 state: row 3 (patch 0, dropped at layer 1) enters layer 3 as its LLM input
    # embedding; row 4 (patch 1, never dropped) does not.
    embeddings = model.model.get_image_features(pixel_values=pixels).pooler_output[0]
    torch.testing.assert_close(seen[3][0, 3], embeddings[0])
    assert not torch.allclose(seen[3][0, 4], embeddings[1])
    with torch.no_grad(), vtprune.apply(model, _Scripted(_Drop(1), _Restore(3))):
        cached = greedy(model, ids, mask, pixels)
        recomputed = greedy(model, ids, mask, pixels, use_cache=False)
    assert torch.equal(cached[0], recomputed[0])
    torch.testing.assert_close(cached[1], recomputed[1], atol=1e-4, rtol=1e-4)


def test_layer_zero_drop_equals_pre_llm_selection(model):
    """Dropping before layer 0 (no attention needed) = selecting the same tokens before the LLM."""
    ids, mask = batch([prompt([1, 5, 6], [7, 8, 9])])
    pixels = images(1)
    with torch.no_grad():
        with vtprune.apply(model, _Scripted(_Drop(0))) as pruner:
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits[:, -1]
        kept = pruner.stats.kept_patches(0)
    assert kept.sum() == N_VISUAL // 2 and pruner.stats.visual_tokens[0].tolist() == [N_VISUAL // 2] * 4
    even = torch.arange(N_VISUAL)[kept]
    assert torch.equal(even, torch.arange(0, N_VISUAL, 2) + (3 % 2))  # rows 3, 5, ... are patches 0, 2, ...
    with torch.no_grad(), vtprune.apply(model, "uniform", keep=N_VISUAL) as full:
        reference = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits[:, -1]
    assert full.stats is not None and not torch.allclose(logits, reference)


class _Threshold(LayerOperator, nn.Module):
    """A trainable test operator: keep a token when its (fixed) score exceeds a learned threshold; soft in training."""

    def __init__(self, layer: int, sharpness: float = 1e4) -> None:
        nn.Module.__init__(self)
        self.layers, self.sharpness = (layer,), sharpness
        self.threshold = nn.Parameter(torch.tensor(0.5))

    def transform(self, ctx):
        score = (ctx.rows.float() * 0.37).remainder(1.0)
        if ctx.training:
            return Transition(weight=torch.sigmoid(self.sharpness * (score - self.threshold)))
        return Transition(keep=score > self.threshold)


def test_soft_mask_with_binary_weights_equals_the_physical_drop(model):
    """Training mode keeps every token and masks them softly; at 0/1 weights the text logits equal the physically
    pruned forward (hard mode = soft mode > 0.5), and the threshold gets a gradient."""
    ids, mask = batch([prompt([1, 5, 6], [7, 8, 9]), prompt([2], [4, 4])])
    pixels = images(2)
    operator = _Threshold(2)
    pruner = vtprune.apply(model, _Scripted(operator))
    try:
        with torch.no_grad():
            hard = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
            positions = pruner.stats.output_positions
        pruner.train()
        soft = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        soft_positions = pruner.stats.output_positions
        assert pruner.stats.visual_tokens[:, -1].tolist() == [N_VISUAL, N_VISUAL]  # every token stays
        for b in range(2):
            text = torch.isin(soft_positions[b], positions[b][positions[b] >= 0]) & (soft_positions[b] >= 0)
            torch.testing.assert_close(soft[b][text], hard[b][positions[b] >= 0], atol=1e-4, rtol=1e-4)
        operator.sharpness = 5.0
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits[:, -1].sum().backward()
        assert operator.threshold.grad is not None and operator.threshold.grad != 0
        state = pruner.state_dict()
        assert set(state) == {"0.threshold"}
    finally:
        pruner.remove()
    restored = _Threshold(2)
    with vtprune.apply(model, _Scripted(restored)) as again:
        again.load_state_dict({"0.threshold": torch.tensor(0.25)})
    assert restored.threshold.item() == 0.25


def test_generation_is_refused_after_a_soft_prefill(model):
    ids, mask = batch([prompt([1, 5, 6], [7, 8, 9])])
    with vtprune.apply(model, _Scripted(_Threshold(2))) as pruner, torch.no_grad():
        pruner.train()
        with pytest.raises(RuntimeError, match=r"call pruner.eval\(\) before generating"):
            model.generate(input_ids=ids, attention_mask=mask, pixel_values=images(1), max_new_tokens=2)


class _TrimVisualCache(DecodeOperator):
    """Drop every visual entry from the KV cache of layers >= 2 right after prefill."""

    def trim(self, ctx):
        return {layer: torch.zeros_like(ctx.visual[layer]) for layer in (2, 3)}


class _EvictAtStep(DecodeOperator):
    """Evict every visual entry of layers 2 and 3 at the first decode step, compacting every ``interval`` steps."""

    step_layers = (2, 3)

    def __init__(self, interval: int = 1) -> None:
        self.compact_interval = interval

    def step(self, ctx):
        assert ctx.query_attention().shape[-1] == ctx.keys.shape[2]
        return ctx.visual if ctx.step == 0 else None


def test_decode_stage_trims_kv_cache_and_keeps_generating(model):
    ids, mask = batch([prompt([1, 5, 6], [7, 8, 9]), prompt([2], [4, 4])])
    pixels = images(2)
    with torch.no_grad(), vtprune.apply(model, _Scripted(_TrimVisualCache())):
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=3,
                             do_sample=False, return_dict_in_generate=True)
    lengths = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    # Prefill of the longer prompt, then 2 cached decode steps (the 3rd token is sampled, not cached).
    n = ids.shape[1]
    assert lengths == [n + 2, n + 2, n - N_VISUAL + 2, n - N_VISUAL + 2]


@pytest.mark.parametrize("interval", [1, 10])
def test_per_step_eviction_equals_masking_the_same_entries(model, interval):
    """Evicting at the first decode step gives the logits of removing the same entries right after prefill
    (i.e. of attention with those entries masked), whether the cache is compacted at once or later."""
    ids, mask = batch([prompt([1, 5, 6], [7, 8, 9]), prompt([2], [4, 4])])
    pixels = images(2)
    with torch.no_grad():
        with vtprune.apply(model, _Scripted(_TrimVisualCache())):
            reference = greedy(model, ids, mask, pixels, steps=5)
        with vtprune.apply(model, _Scripted(_EvictAtStep(interval))):
            out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=5,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True)
    tokens, logits = out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)
    assert torch.equal(tokens, reference[0])
    torch.testing.assert_close(logits, reference[1], atol=1e-5, rtol=1e-5)
    lengths = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    n = ids.shape[1]
    if interval == 1:
        assert lengths[2:] == [n - N_VISUAL + 4] * 2
    else:
        assert lengths[2:] == [n + 4] * 2  # masked, not yet compacted


def test_labels_are_aligned_to_the_pruned_output():
    """A loss with labels: equal to the unpruned loss at full budget, and over the same answer tokens when pruned."""
    model = tiny_llava(seed=6)
    ids, mask = batch([prompt([1, 5, 6], [7, 8, 9, 10, 11])])
    labels = torch.full_like(ids, -100)
    labels[:, -3:] = ids[:, -3:]
    pixels = images(1)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
        with vtprune.apply(model, "uniform", keep=N_VISUAL):
            full = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
        with vtprune.apply(model, "fastv", keep=4) as pruner:
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
    torch.testing.assert_close(full, reference)
    positions = pruner.stats.output_positions[0]
    aligned = torch.where(positions >= 0, labels[0][positions.clamp_min(0)], -100)
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], aligned[1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_gradients_reach_the_projector_through_a_pre_llm_selection():
    """Training a model under a pruner: the kept image features stay differentiable."""
    model = tiny_llava(seed=8)
    ids, mask = batch([prompt([1, 5, 6], [7, 8, 9])])
    with vtprune.apply(model, "divprune", keep=6):
        model(input_ids=ids, attention_mask=mask, pixel_values=images(1)).logits[:, -1].sum().backward()
    assert model.model.multi_modal_projector.linear_2.weight.grad.abs().sum() > 0


class _TagEvery(vtprune.runtime.PreLLMOperator):
    """Keep every token; tag every fifth one as 'protected'."""

    def reduce_image(self, ctx, index, image):
        tags = {"protected": (torch.arange(len(image.features)) % 5 == 0).float()}
        return vtprune.runtime.Reduction(image.features, image.sources, tags)


class _KeepProtected(LayerOperator):
    """Keep only the tagged tokens; record where the tokens it saw lie on the grid."""

    def __init__(self) -> None:
        self.layers, self.seen = (2,), {}

    def transform(self, ctx):
        self.seen = {"row": ctx.row.clone(), "col": ctx.col.clone(), "visual": ctx.visual.clone()}
        return Transition(keep=ctx.tags["protected"] > 0)


def test_tags_and_grid_coordinates_reach_layer_operators(model):
    ids, mask = batch([prompt([1, 5, 6], [7, 8, 9]), prompt([2], [4, 4])])
    layer_op = _KeepProtected()
    with torch.no_grad(), vtprune.apply(model, _Scripted(_TagEvery(), layer_op)) as pruner:
        model(input_ids=ids, attention_mask=mask, pixel_values=images(2))
    protected = torch.arange(0, N_VISUAL, 5)
    for b in range(2):
        assert torch.equal(pruner.stats.kept_patches(b).nonzero().flatten(), protected)
        visual = layer_op.seen["visual"][b]
        patches = layer_op.seen["row"][b][visual] * 6 + layer_op.seen["col"][b][visual]
        assert torch.equal(patches, torch.arange(N_VISUAL))  # the 6x6 grid, in raster order
    assert pruner.stats.visual_tokens[0].tolist() == [N_VISUAL, N_VISUAL, len(protected), len(protected)]


def _vtprune_syncs(monkeypatch, run) -> int:
    """Host syncs (tensor -> Python value) made by vtprune's own code while ``run()`` executes."""
    import os
    import sys

    package = os.path.dirname(vtprune.__file__)
    count = [0]

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            frame = sys._getframe(1)
            if frame.f_code.co_filename.startswith(package):
                count[0] += 1
            return original(self, *args, **kwargs)
        return wrapper

    for name in ("__bool__", "item", "tolist", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    run()
    monkeypatch.undo()
    return count[0]


@pytest.mark.parametrize("method,params", [("fastv", {"keep": 6, "layer": 1}), ("divprune", {"keep": 6}),
                                           ("fastv", {"keep": 6, "layer": 1, "positions": "renumber"})])
def test_decode_steps_make_no_host_sync(model, monkeypatch, method, params):
    """Whatever a prefill decides once, a decode step adds no host-device synchronisation of vtprune's own."""
    ids, mask = batch([prompt([1, 5, 6], [7, 8, 9]), prompt([2], [4, 4])])
    pixels = images(2)

    def generate(steps):
        return lambda: model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                                      max_new_tokens=steps, do_sample=False)

    with torch.no_grad(), vtprune.apply(model, method, **params):
        short = _vtprune_syncs(monkeypatch, generate(2))
        long = _vtprune_syncs(monkeypatch, generate(8))
    assert short == long > 0


def test_a_new_token_masked_out_stays_invisible_to_later_steps(model):
    """Decode steps fed one token each, the second one masked out by the caller's attention mask: later steps must
    not see it, exactly as the unpruned model (full budget) does."""
    ids, mask = batch([prompt([1, 5, 6], [7, 8, 9])])
    pixels = images(1)
    feeds = [(torch.tensor([[11]]), 1), (torch.tensor([[12]]), 0), (torch.tensor([[13]]), 1)]

    def run():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True)
        cache, full_mask, logits = out.past_key_values, mask, []
        for token, keep in feeds:
            full_mask = torch.cat([full_mask, torch.tensor([[keep]])], dim=1)
            step = model(input_ids=token, attention_mask=full_mask, past_key_values=cache, use_cache=True)
            cache = step.past_key_values
            logits.append(step.logits[:, -1])
        return torch.stack(logits, 1)

    with torch.no_grad():
        reference = run()
        with vtprune.apply(model, "fastv", ratio=1.0):
            pruned = run()
    torch.testing.assert_close(pruned[:, [0, 2]], reference[:, [0, 2]], atol=1e-5, rtol=1e-5)
