"""MustDrop's oracles (method card, section 12) on tiny random LLaVA models: window similarity, the merge on
injected block-0 outputs (counts, means, order, the tau boundary, per-view counts vs the official batch minimum),
the key set against an eager [CLS] attention, the dual-attention rule on hand-made scores and its criterion against
eager attention, the trim and output-aware cache policies (the latter against a masked eager recomputation), the
budget plans, the all-off identity, and the errors. The registry-driven invariants are in test_invariants.py."""
from __future__ import annotations

import math

import pytest
import torch

import vtprune
from vtprune.methods import Method
from vtprune.methods.fastv import FastV
from vtprune.methods.mustdrop import MustDropDecode, equivalent_tokens, scaled_filter_layers
from vtprune.methods.mustdrop_stages import (
    DualAttentionFilter,
    OutputAwareEviction,
    dual_filter,
    image_mass,
    layer_average,
    solve_view_plan,
)
from vtprune.models import adapter_for
from vtprune.models.clip import encoder_layers
from vtprune.ops import window_indices, window_similarity
from conftest import GRID, IMAGE_TOKEN, N_VISUAL, batch, images, prompt, tiny_llava
from families import Family, greedy, picture

PREFIX, SUFFIX = [1, 5, 6], [7, 8, 9, 10]
WINDOWS = window_indices((GRID, GRID), 3)  # 4 windows of 9 patches on the 6x6 test grid
MUSTDROP_KEEP = {"mustdrop": 18, "mustdrop_prefill": 18, "mustdrop_vision": 20, "mustdrop_decode": 9}


# --- shared with test_invariants.py ----------------------------------------------------------------------------
def check_mustdrop_budget(method: str, keep: int, full, pruned, sample: int, image: int, depth: int) -> None:
    """``keep`` per view, as each variant reads it: the layer average (mustdrop, mustdrop_prefill; the floor of the
    view's key tokens may keep it higher), the tokens entering the LLM (mustdrop_vision), nothing in prefill
    (mustdrop_decode, whose budget is a decode floor)."""
    whole = full.tokens_per_partition[sample][image]
    views = pruned.tokens_per_partition[sample][image]
    if method == "mustdrop_decode":
        assert torch.equal(views, whole)
        return
    if method == "mustdrop_vision":
        assert torch.equal(views, views[:, :1].expand_as(views))  # nothing dropped inside the LLM
        merged = N_VISUAL - 8 * ((N_VISUAL - keep) // 8)
        for view, count in enumerate(views[:, 0].tolist()):
            if whole[view, 0] == N_VISUAL:  # a view unpadding left whole: exactly the merged count
                assert count == merged
            else:
                assert count <= whole[view, 0]
        return
    for view, profile in enumerate(views):
        entering = int(profile[0])
        if entering == 0:
            continue
        if method == "mustdrop_prefill":
            assert entering == whole[view, 0]
        else:  # the window merge never takes a view below its target
            assert entering >= min(keep, int(whole[view, 0]))
        assert bool((profile[1:] <= profile[:-1]).all())
        mean = float(profile.double().mean())
        if entering <= keep:
            assert bool((profile == entering).all())
        else:
            floor = int(profile[-1])
            assert abs(mean - keep) <= 0.5 or (mean > keep and floor in (1, math.ceil(0.08 * entering)))


# --- helpers -------------------------------------------------------------------------------------------------------
def _orthonormal(count: int, dim: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(dim, count, generator=torch.Generator().manual_seed(seed)))
    return q.T  # [count, dim], orthonormal rows


def _crafted(original: torch.Tensor, similar: dict[int, float], seed: int) -> torch.Tensor:
    """One view's block-0 output [1 + 36, D] with window w's tokens at mean pairwise cosine ``similar[w]`` (u + t*e_a
    with orthonormal u, e_a: cos = 1 / (1 + t^2)) and every other window's tokens mutually orthogonal; [CLS] kept."""
    out = original.clone()
    scale = float(original[1:].norm(dim=-1).mean())
    for w, patches in enumerate(WINDOWS.tolist()):
        basis = _orthonormal(10, out.shape[-1], seed * 10 + w)
        if w in similar:
            t = math.sqrt(1 / similar[w] - 1)
            out[1 + torch.tensor(patches)] = scale * (basis[0] + t * basis[1:])
        else:
            out[1 + torch.tensor(patches)] = scale * basis[1:]
    return out


class Injected:
    """A forward hook on ViT block 0 replacing the output of known views (matched by content, so a view gets the same
    crafted output alone or in any batch) by crafted ones."""

    def __init__(self, model, pixels: list[torch.Tensor], plans: list[dict[int, float]]) -> None:
        self.block = encoder_layers(model.model.vision_tower)[0]
        self.table = []
        seen = []
        handle = self.block.register_forward_hook(lambda module, args, out: seen.append(out.detach().clone()))
        with torch.no_grad():
            for view_pixels in pixels:
                model.model.vision_tower(view_pixels[None])
        handle.remove()
        for i, (original, plan) in enumerate(zip(seen, plans)):
            self.table.append((original[0], _crafted(original[0], plan, seed=i)))

    def hook(self, module, args, output):
        out = output.clone()
        for view in range(output.shape[0]):
            for original, crafted in self.table:
                if torch.allclose(output[view], original, atol=1e-5):
                    out[view] = crafted
        return out

    def __enter__(self):
        self.handle = self.block.register_forward_hook(self.hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _block_input(model, block: int, run) -> list[torch.Tensor]:
    """The hidden states entering ViT block ``block`` during ``run()`` (one per tower call)."""
    seen = []
    norm = encoder_layers(model.model.vision_tower)[block].layer_norm1
    handle = norm.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        run()
    finally:
        handle.remove()
    return seen


def _forward(model, method, pixels=None, prompts=None, **params):
    ids, mask = batch(prompts or [prompt(PREFIX, SUFFIX)])
    pixels = images(len(ids)) if pixels is None else pixels
    with torch.no_grad(), vtprune.apply(model, method, **params) as pruner:
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    return pruner.stats


def _kept(stats, sample: int = 0) -> set[int]:
    return set(stats.kept_patches(sample).nonzero().flatten().tolist())


def _eager_cls(eager, hidden: torch.Tensor) -> torch.Tensor:
    """Head-mean [CLS] -> token attention of the last ViT block, by eager attention from the stock CLIP layers, for
    ``hidden`` entering block 1 [views, 1 + k, D]: [views, k]."""
    layers = encoder_layers(eager.model.vision_tower)
    with torch.no_grad():
        for layer in layers[1:-1]:
            hidden = layer(hidden, None)
        _, weights = layers[-1].self_attn(hidden_states=layers[-1].layer_norm1(hidden))
    return weights[:, :, 0, 1:].float().mean(1)


def _patches_of_slots(similar: dict[int, float], slots: list[int]) -> set[int]:
    """Patches of the given slots of a view merged as in ``similar`` (merged windows by descending similarity, then
    every other patch in raster order)."""
    merged = sorted(similar, key=lambda w: -similar[w])
    rest = sorted(p for w in range(len(WINDOWS)) if w not in similar for p in WINDOWS[w].tolist())
    groups = [WINDOWS[w].tolist() for w in merged] + [[p] for p in rest]
    return {p for s in slots for p in groups[s]}


# --- 1. window similarity ------------------------------------------------------------------------------------------
def test_window_similarity_identical_orthogonal_and_brute_force():
    x = torch.randn(2, N_VISUAL, 32, generator=torch.Generator().manual_seed(0))
    x[0, WINDOWS[1]] = x[0, 5].clone()  # nine identical tokens
    x[1, WINDOWS[2]] = _orthonormal(9, 32, 1) * 3.0
    similarity = window_similarity(x, WINDOWS)
    assert similarity.shape == (2, 4)
    torch.testing.assert_close(similarity[0, 1], torch.tensor(1.0))
    torch.testing.assert_close(similarity[1, 2], torch.tensor(0.0), atol=1e-6, rtol=0)
    for v in range(2):
        for w, patches in enumerate(WINDOWS.tolist()):
            pairs = [torch.nn.functional.cosine_similarity(x[v, a], x[v, b], dim=0)
                     for a in patches for b in patches if a != b]
            assert len(pairs) == 72
            torch.testing.assert_close(similarity[v, w], torch.stack(pairs).mean(), atol=1e-6, rtol=1e-6)


def test_windows_tile_the_grid_in_raster_order():
    assert WINDOWS[0].tolist() == [0, 1, 2, 6, 7, 8, 12, 13, 14]
    assert sorted(WINDOWS.flatten().tolist()) == list(range(N_VISUAL))
    assert window_indices((24, 24), 3).shape == (64, 9)
    with pytest.raises(ValueError, match="do not tile"):
        window_indices((16, 16), 3)


# --- 2. the merge on injected block-0 outputs ---------------------------------------------------------------------
@pytest.mark.parametrize("similar", [{0: 0.9, 1: 1.0}, {0: 0.9, 1: 1.0, 2: 0.95}, {}], ids=["m2", "m3", "m0"])
def test_merge_count_means_and_order(model, similar):
    pixels = images(1)
    with Injected(model, [pixels[0]], [similar]) as injected:
        crafted = injected.table[0][1]
        stats = {}
        seen = _block_input(model, 1, lambda: stats.update(s=_forward(model, "mustdrop_vision", pixels)))
    m = len(similar)
    merged_input = seen[0][0]
    assert merged_input.shape[0] == 1 + N_VISUAL - 8 * m
    assert stats["s"].visual_tokens[0].tolist() == [N_VISUAL - 8 * m] * 4
    torch.testing.assert_close(merged_input[0], crafted[0])  # [CLS] untouched
    by_similarity = sorted(similar, key=lambda w: -similar[w])
    for slot, w in enumerate(by_similarity):  # merged windows first, most similar first, each the plain mean
        torch.testing.assert_close(merged_input[1 + slot], crafted[1 + WINDOWS[w]].mean(0), atol=1e-6, rtol=1e-6)
    rest = sorted(p for w in range(4) if w not in similar for p in WINDOWS[w].tolist())
    torch.testing.assert_close(merged_input[1 + m:], crafted[1 + torch.tensor(rest, dtype=torch.long)])
    # the LLM gets the same order: the merged windows' patches, then the rest in raster order
    sources = stats["s"].dense_sources(0)
    assert [set(row.nonzero().flatten().tolist()) for row in sources[:m]] == [set(WINDOWS[w].tolist())
                                                                             for w in by_similarity]
    assert [int(row.nonzero()) for row in sources[m:]] == rest


def test_tau_is_inclusive(model):
    pixels = images(1)
    with Injected(model, [pixels[0]], [{0: 0.85}]) as injected:
        similarity = window_similarity(injected.table[0][1][None, 1:], WINDOWS)[0, 0]
        at = _forward(model, "mustdrop_vision", pixels, tau=float(similarity))
        above = _forward(model, "mustdrop_vision", pixels, tau=float(torch.nextafter(similarity, torch.tensor(2.0))))
    assert at.visual_tokens[0, 0] == N_VISUAL - 8
    assert above.visual_tokens[0, 0] == N_VISUAL


def test_raster_order_option(model):
    pixels = images(1)
    with Injected(model, [pixels[0]], [{3: 0.9, 1: 0.95}]):
        stats = _forward(model, "mustdrop_vision", pixels, order="raster")
    sources = stats.dense_sources(0)
    centre = (sources @ torch.arange(N_VISUAL).float()) / sources.sum(-1)
    assert bool((centre[1:] > centre[:-1]).all())
    assert len(sources) == N_VISUAL - 16


def test_merge_count_is_per_view_and_batch_min_shares_it(model):
    """An image's merged tokens are the same alone and beside another image (padding masked as keys in every later
    block); the official batch minimum makes them depend on the batch."""
    pixels = images(2, seed=4)
    plans = [{0: 0.9, 2: 1.0}, {1: 0.95}]

    def features(pixel_values, **params):
        with torch.no_grad(), vtprune.apply(model, "mustdrop_vision", **params):
            records = model.model.get_image_features(pixel_values=pixel_values).images()
        return [record.merged[0] if record.merged is not None else record.carrier for record in records]

    with Injected(model, list(pixels), plans):
        together = features(pixels)
        alone = [features(pixels[i:i + 1])[0] for i in range(2)]
        shared = features(pixels, merge_count="batch_min")
    assert [len(f) for f in together] == [N_VISUAL - 16, N_VISUAL - 8]
    for i in range(2):
        torch.testing.assert_close(together[i], alone[i], atol=1e-5, rtol=1e-5)
    assert [len(f) for f in shared] == [N_VISUAL - 8, N_VISUAL - 8]  # image 0 merges less beside image 1


# --- 3. the key set ------------------------------------------------------------------------------------------------
def test_key_set_is_top_cls_attention_of_the_last_block(model, eager_model):
    """gamma_g = 1 with gamma_i > 1 drops every other token: the survivors are the key set, ceil(0.08 * 36) = 3
    tokens, the top of the last block's head-mean [CLS] attention computed by the stock eager tower."""
    pixels = images(1, seed=7)
    stats = _forward(model, "mustdrop_prefill", pixels, gamma_g=1.0, gamma_i=2.0)
    with torch.no_grad():
        attentions = eager_model.model.vision_tower(pixels, output_attentions=True).attentions
    scores = attentions[-1][0, :, 0, 1:].float().mean(0)
    assert _kept(stats) == set(scores.topk(math.ceil(0.08 * N_VISUAL)).indices.tolist())
    assert stats.visual_tokens[0].tolist() == [N_VISUAL, 3, 3, 3]


def test_key_set_of_a_merged_view(model, eager_model):
    """After merging, |K| = ceil(0.08 * N1) and K = the top [CLS] attention over the merged sequence's tokens."""
    pixels = images(1, seed=8)
    similar = {0: 0.9, 3: 1.0}
    with Injected(model, [pixels[0]], [similar]):
        stats = {}
        seen = _block_input(model, 1, lambda: stats.update(s=_forward(model, "mustdrop", pixels, gamma_g=1.0,
                                                                       gamma_i=2.0, decode=False)))
    n1 = N_VISUAL - 16
    scores = _eager_cls(eager_model, seen[0])[0]
    k = math.ceil(0.08 * n1)
    assert stats["s"].visual_tokens[0].tolist()[1:] == [k] * 3
    assert _kept(stats["s"]) == _patches_of_slots(similar, scores.topk(k).indices.tolist())


def test_key_set_per_view_on_llava_next():
    family = Family("llava_next")
    model = family.model()
    inputs = family.inputs([["user:", picture(100, 190, 1), "what", "?", "assistant:"]])
    with torch.no_grad(), vtprune.apply(model, "mustdrop_prefill", gamma_g=1.0, gamma_i=2.0) as pruner:
        model(**inputs)
    views = pruner.stats.tokens_per_partition[0][0]
    for entering, last in zip(views[:, 0].tolist(), views[:, -1].tolist()):
        assert last == math.ceil(0.08 * entering)


# --- 4. the dual-attention filter ----------------------------------------------------------------------------------
def test_dual_filter_rule_on_hand_made_attention():
    """|T| = 3 text rows, |V| = 6 tokens of one image: kept == {g >= gamma_g * sum g or m >= gamma_i} | K."""
    attention = torch.tensor([[0.30, 0.01, 0.02, 0.05, 0.001, 0.20],
                              [0.10, 0.02, 0.01, 0.04, 0.002, 0.05],
                              [0.05, 0.03, 0.00, 0.30, 0.001, 0.01]])
    g, m = attention.sum(0)[None], attention.amax(0)[None]
    candidate = torch.ones(1, 6, dtype=torch.bool)
    image = torch.zeros(1, 6, dtype=torch.long)
    key = torch.tensor([[False, False, False, False, True, False]])
    mass = image_mass(g, candidate, image, 1)
    torch.testing.assert_close(mass, g.sum().expand(1, 6))

    def kept(gamma_g, gamma_i):
        return set(dual_filter(g, m, mass, candidate, key, gamma_g, gamma_i)[0].nonzero().flatten().tolist())

    for gamma_g, gamma_i in [(0.1, 0.1), (0.05, 0.25), (0.2, 0.02), (0.0, 5.0), (1.0, 0.0)]:
        expected = {v for v in range(6) if g[0, v] >= gamma_g * g.sum() or m[0, v] >= gamma_i} | {4}
        assert kept(gamma_g, gamma_i) == expected
    assert kept(0.1, 0.1) == {0, 3, 4, 5}
    assert kept(0.0, 5.0) == kept(1.0, 0.0) == set(range(6))  # either threshold at its "off" value: no drop
    assert kept(1.0, 1.5) == {4}  # both beyond reach: the key set alone
    for low, high in [((0.05, 0.05), (0.1, 0.05)), ((0.05, 0.05), (0.05, 0.2)), ((0.1, 0.1), (0.3, 0.4))]:
        assert kept(*high) <= kept(*low)  # raising a threshold never keeps more


def test_dual_filter_masses_are_per_image():
    g = torch.tensor([[0.0, 0.4, 0.1, 0.05, 0.01, 0.5]])
    image = torch.tensor([[-1, 0, 0, 1, 1, -1]])
    candidate = image >= 0
    mass = image_mass(g, candidate, image, 2)
    assert mass[0, 1:5].tolist() == pytest.approx([0.5, 0.5, 0.06, 0.06])
    keep = dual_filter(g, g, mass, candidate, torch.zeros_like(candidate), 0.3, 1.0)
    assert keep[0].tolist() == [False, True, False, True, False, False]


def test_filter_applies_the_rule_to_its_scores_and_keeps_the_key_set(model, monkeypatch):
    """The operator drops exactly what the rule says for its (g, m), keeps K, and later layers see the survivors."""
    generator = torch.Generator().manual_seed(11)
    table = torch.rand(2, N_VISUAL, generator=generator) ** 4  # (g, m) per image token

    def scores(self, ctx):
        image_rows = ctx.rows - len(PREFIX)
        inside = (image_rows >= 0) & (image_rows < N_VISUAL)
        values = table[:, image_rows.clamp(0, N_VISUAL - 1)]
        return tuple(torch.where(inside, v, 0.0) for v in values)

    monkeypatch.setattr(DualAttentionFilter, "scores", scores)
    keys = _kept(_forward(model, "mustdrop_prefill", layers=(1,), gamma_g=1.0, gamma_i=2.0))
    assert len(keys) == 3
    gamma_g, gamma_i = 0.03, 0.4
    stats = _forward(model, "mustdrop_prefill", layers=(1,), gamma_g=gamma_g, gamma_i=gamma_i)
    g, m = table
    expected = {v for v in range(N_VISUAL) if g[v] >= gamma_g * g.sum() or m[v] >= gamma_i} | keys
    assert _kept(stats) == expected
    assert stats.visual_tokens[0].tolist() == [N_VISUAL, N_VISUAL, len(expected), len(expected)]


def test_filter_criterion_is_the_layers_own_eager_attention():
    """(g, m) == sum / max over the text rows after the image of layer l's eager attention (head mean), with left
    padding and a prompt with two images; gamma_g = 0 drops nothing, so layer l runs on the scored sequence."""
    model = tiny_llava(attn="eager")
    captured, attention = {}, {}
    original = DualAttentionFilter.scores

    def recording(self, ctx):
        captured["rows"] = ctx.rows.clone()
        captured["scores"] = original(self, ctx)
        return captured["scores"]

    hook = model.model.language_model.layers[1].self_attn.register_forward_hook(
        lambda module, args, output: attention.update(weights=output[1]))
    prompts = [prompt(PREFIX, SUFFIX), prompt([1], [10, 11], images=2)]
    try:
        DualAttentionFilter.scores = recording
        _forward(model, "mustdrop_prefill", images(3), prompts, layers=(1,), gamma_g=0.0)
    finally:
        DualAttentionFilter.scores = original
        hook.remove()
    ids, mask = batch(prompts)
    probs = attention["weights"].float().mean(1)  # [B, n, n]
    visual = ids == IMAGE_TOKEN
    for b in range(2):
        first = int(visual[b].nonzero()[0])
        rows = [t for t in range(ids.shape[1]) if mask[b, t] and not visual[b, t] and t > first]
        expected_g = probs[b, rows].sum(0)
        expected_m = probs[b, rows].amax(0)
        torch.testing.assert_close(captured["scores"][0][b], expected_g, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(captured["scores"][1][b], expected_m, atol=1e-5, rtol=1e-5)


# --- 5. decoding --------------------------------------------------------------------------------------------------
def _generate(model, method, prompts, steps=4, **params):
    ids, mask = batch(prompts)
    with torch.no_grad(), vtprune.apply(model, method, **params) as pruner:
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=images(len(ids)), max_new_tokens=steps,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out, pruner.stats


def test_trim_policy_cache_sizes_per_layer(model):
    """Layers before the first filtering layer keep every entry; every later layer holds the final set, so tokens
    dropped at a later filtering layer leave the earlier layers' caches too; the key set is among the final set."""
    params = dict(vision=False, layers=(1, 2), keep=24)  # a budget: 36 -> 18 -> 9 tokens
    out, stats = _generate(model, "mustdrop", [prompt(PREFIX, SUFFIX)], **params)
    counts = stats.visual_tokens[0].tolist()
    assert counts[0] == counts[1] == N_VISUAL and counts[2] > counts[3]  # drops before layers 2 and 3
    text = len(PREFIX) + 1 + len(SUFFIX) + 3  # the prompt's text plus three cached generated tokens
    lengths = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    assert lengths == [text + N_VISUAL] + [text + counts[3]] * 3
    untrimmed, _ = _generate(model, "mustdrop", [prompt(PREFIX, SUFFIX)], decode=False, **params)
    assert [layer.keys.shape[-2] for layer in untrimmed.past_key_values.layers] == [text + c for c in counts]
    keys = _kept(_forward(model, "mustdrop", vision=False, layers=(1, 2), gamma_g=1.0, gamma_i=2.0, decode=False))
    assert keys <= _kept(stats)


def _key_columns(eager, ids, pixels) -> list[set[int]]:
    """The input columns of each sample's key tokens: the top 3 of the eager tower's last-block [CLS] attention."""
    with torch.no_grad():
        attentions = eager.model.vision_tower(pixels, output_attentions=True).attentions
    scores = attentions[-1][:, :, 0, 1:].float().mean(1)
    starts = [int((row == IMAGE_TOKEN).nonzero()[0]) for row in ids]
    return [{start + p for p in scores[b].topk(3).indices.tolist()} for b, start in enumerate(starts)]


@pytest.mark.parametrize("threshold,patience", [(0.0222, 2), (0.0226, 1)])  # this model's attention: 0.020-0.025
def test_output_aware_eviction_equals_the_masked_recomputation(threshold, patience, monkeypatch):
    """The evictions and logits of output-aware decoding == an unpruned eager model whose decode steps mask the
    evicted entries per layer, with the evictions re-derived from that model's own attention weights by the rule:
    the step's attention over the cached entries (renormalised without its own key), head mean, below ``threshold``
    for ``patience`` consecutive steps -> gone from the next step; key tokens stay."""
    model = tiny_llava(attn="eager", seed=2)
    prompts = [prompt(PREFIX, SUFFIX), prompt([2], [4, 4, 6])]
    ids, mask = batch(prompts)
    pixels = images(2)
    steps, layers = 6, (1, 2, 3)
    recorded: dict[tuple[int, int], torch.Tensor] = {}
    original = OutputAwareEviction.step

    def recording(self, ctx):
        evict = original(self, ctx)
        gone = torch.zeros(ids.shape[0], ids.shape[1] + steps, dtype=torch.bool)
        gone.scatter_(1, ctx.rows.clamp_min(0), evict & (ctx.rows >= 0))
        recorded[ctx.step, ctx.layer] = gone
        return evict

    monkeypatch.setattr(OutputAwareEviction, "step", recording)
    with torch.no_grad(), vtprune.apply(model, "mustdrop_decode", layers=(1,), evict_threshold=threshold,
                                        patience=patience):
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=steps,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
    pruned_logits = torch.stack(out.logits, 1)

    # The reference: the stock model under the same generate(), each decode step with a per-layer mask of the
    # entries the rule has evicted, the rule re-derived from that step's eager attention weights.
    keys = _key_columns(model, ids, pixels)
    candidate = (ids == IMAGE_TOKEN) & mask.bool()
    for b, columns in enumerate(keys):
        candidate[b, list(columns)] = False
    width, prompt_length = ids.shape[1] + steps, ids.shape[1]
    evicted = {i: torch.zeros(ids.shape[0], width, dtype=torch.bool) for i in layers}
    low = {i: torch.zeros(ids.shape[0], prompt_length, dtype=torch.long) for i in layers}
    weights, expected, calls = {}, {}, [0]
    decoder = model.model.language_model.layers

    def masking(index):
        def hook(module, args, kwargs):
            if calls[0] == 0:
                return None  # the prefill runs unmasked
            bias = kwargs["attention_mask"]
            gone = evicted[index][:, None, None, :bias.shape[-1]]
            kwargs["attention_mask"] = (bias & ~gone if bias.dtype == torch.bool
                                        else bias.masked_fill(gone, torch.finfo(bias.dtype).min))
            return args, kwargs
        return hook

    def rule(module, args, kwargs, output):
        if calls[0] > 0:  # decode step calls[0] - 1: decide what goes from the next step on
            for i in layers:
                cached = weights[i][:, :, -1, :-1].float()  # the rule reads the cached entries' share
                attention = (cached / cached.sum(-1, keepdim=True)).mean(1)[:, :prompt_length]
                below = candidate & ~evicted[i][:, :prompt_length] & (attention < threshold)
                low[i] = torch.where(below, low[i] + 1, 0)
                new = below & (low[i] >= patience)
                expected[calls[0], i] = torch.cat([new, torch.zeros(ids.shape[0], steps, dtype=torch.bool)], 1)
                evicted[i][:, :prompt_length] |= new
        calls[0] += 1

    handles = [decoder[i].register_forward_pre_hook(masking(i), with_kwargs=True) for i in layers]
    handles += [decoder[i].self_attn.register_forward_hook(
        lambda module, args, output, i=i: weights.update({i: output[1]})) for i in layers]
    handles.append(model.register_forward_hook(rule, with_kwargs=True))
    try:
        with torch.no_grad():
            reference = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=steps,
                                       do_sample=False, output_logits=True, return_dict_in_generate=True)
    finally:
        for handle in handles:
            handle.remove()
    reference_logits = list(reference.logits)
    for (step, layer), gone in recorded.items():
        want = expected.get((step, layer), torch.zeros_like(gone))
        assert torch.equal(gone, want), (step, layer)
    torch.testing.assert_close(pruned_logits, torch.stack(reference_logits, 1), atol=1e-5, rtol=1e-5)
    assert sum(int(g.sum()) for g in recorded.values()) > 0  # the rule did evict something
    for b in range(2):  # never a key token
        assert not any(bool(g[b, list(keys[b])].any()) for g in recorded.values())


def test_output_aware_eviction_keeps_keys_and_respects_a_floor(model):
    """Everything below an unreachable threshold: after the first step only the key tokens remain in the evicting
    layers' caches; with keep=10 each view keeps 10 visual entries (its 3 keys among them)."""
    prompts = [prompt(PREFIX, SUFFIX)]
    text = len(PREFIX) + 1 + len(SUFFIX)
    for params, visual_left in [({}, 3), ({"keep": 10}, 10)]:
        out, stats = _generate(model, "mustdrop_decode", prompts, steps=12, layers=(2,), evict_threshold=1.1,
                               patience=1, **params)
        lengths = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
        assert lengths[:2] == [text + N_VISUAL + 11] * 2  # layers before the first filtering layer keep all
        assert lengths[2:] == [text + visual_left + 11] * 2  # compacted every 8 steps, evicted after step 0
        assert stats.visual_tokens[0].tolist() == [N_VISUAL] * 4  # the prefill is untouched


def test_decode_steps_make_no_host_sync(model, monkeypatch):
    from test_runtime import _vtprune_syncs

    ids, mask = batch([prompt(PREFIX, SUFFIX), prompt([2], [4, 4])])
    pixels = images(2)

    def generate(steps):
        return lambda: model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=steps,
                                      do_sample=False)

    # evictions are masked at once; the cache is compacted (one sync per layer) every 8 steps, after neither run
    with torch.no_grad(), vtprune.apply(model, "mustdrop_decode", evict_threshold=0.03, patience=1):
        short = _vtprune_syncs(monkeypatch, generate(3))
        long = _vtprune_syncs(monkeypatch, generate(8))
    assert short == long > 0


def test_the_decode_memory_follows_beam_reordering(model):
    """The cache's memory (eviction counters, indexed by LLM-input row) is reordered with the beams."""
    from vtprune.runtime.decode import CacheState, Track

    rows = torch.arange(4).expand(3, 4)
    state = CacheState(model, [Track(rows.clone(), None, True)], 4, 4, torch.ones(3, 4, dtype=torch.bool))
    state.memory.update(counters=torch.tensor([[1, 0, 0, 0], [2, 0, 0, 0], [3, 0, 0, 0]]), note="kept as is")
    state.select(torch.tensor([2, 2, 0]))
    assert state.memory["counters"][:, 0].tolist() == [3, 3, 1] and state.memory["note"] == "kept as is"
    state.repeat(2)
    assert state.memory["counters"][:, 0].tolist() == [3, 3, 3, 3, 1, 1]
    ids, mask = batch([prompt(PREFIX, SUFFIX), prompt([2], [4, 4])])
    with torch.no_grad(), vtprune.apply(model, "mustdrop_decode", evict_threshold=0.03, patience=1):
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=images(2), max_new_tokens=5,
                             num_beams=3, do_sample=False)
    assert out.shape == (2, ids.shape[1] + 5)


# --- 6. everything off, budgets, composition, errors ---------------------------------------------------------------
@pytest.mark.parametrize("family_name", ["llava", "llava_next"])
@pytest.mark.parametrize("policy", ["trim", "output_aware"])
def test_all_stages_disabled_reproduce_the_vanilla_model(family_name, policy):
    family = Family(family_name)
    model = family.model()
    inputs = family.inputs([["user:", picture(100, 190, 1), "what", "is", "in", "the", "image", "?", "assistant:"],
                            ["user:", picture(90, 90, 3), "describe", "assistant:"]])
    off = dict(tau=1.5, gamma_g=1.0, gamma_i=0.0, decode_policy=policy, evict_threshold=0.0)
    with torch.no_grad():
        reference = greedy(model, inputs, steps=6)
        with vtprune.apply(model, "mustdrop", **off) as pruner:
            pruned = greedy(model, inputs, steps=6)
    assert torch.equal(pruned[0], reference[0])
    torch.testing.assert_close(pruned[1], reference[1], atol=1e-5, rtol=1e-5)
    assert torch.equal(pruner.stats.visual_tokens[:, -1], pruner.stats.original_visual_tokens)


def test_paper_layers_and_the_official_token_count_on_32_layers():
    """On a 32-layer LLM the filters sit after layers 2, 6, 10, 14 and the official "equal token number" is
    (2*N1 + 4*V2 + 4*V6 + 4*V10 + 18*V14) / 32 with V_l the tokens left after layer l."""
    assert scaled_filter_layers(32) == (2, 6, 10, 14)
    assert scaled_filter_layers(4) == (0, 1, 2)  # collisions merged: three stages on four layers
    stats = _forward(tiny_llava(layers=32), "mustdrop", keep=12)
    profile = stats.visual_tokens[0]
    assert [layer for layer in range(1, 32) if profile[layer] < profile[layer - 1]] == [3, 7, 11, 15]
    n1, after = int(profile[0]), [int(profile[layer + 1]) for layer in (2, 6, 10, 14)]
    official = (2 * n1 + 4 * after[0] + 4 * after[1] + 4 * after[2] + 18 * after[3]) / 32
    assert float(equivalent_tokens(profile)) == pytest.approx(official)
    assert float(stats.mean_visual_tokens[0]) == pytest.approx(12, abs=0.5)  # keep's convention: what enters


def test_view_plans_reach_the_layer_average():
    drops = (3, 7, 11, 15)
    for target in (192, 128, 100):
        plan = solve_view_plan(576, 47, float(target), drops, 32)
        assert abs(plan.mean - target) <= 0.5
        assert plan.mean == layer_average(576, drops, plan.counts, 32)
        assert list(plan.counts) == sorted(plan.counts, reverse=True) and min(plan.counts) >= 47
    floor = solve_view_plan(576, 47, 64.0, drops, 32)  # below what the key set allows without merging
    assert floor.counts == (47,) * 4 and floor.mean == pytest.approx((3 * 576 + 29 * 47) / 32)
    assert solve_view_plan(200, 16, 64.0, drops, 32).mean == pytest.approx(64, abs=0.5)  # after merging: reachable


def test_budget_is_reached_per_view_and_the_merge_stops_at_it(model):
    pixels = images(1)
    with Injected(model, [pixels[0]], [{0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}]):
        stats = _forward(model, "mustdrop", pixels, keep=18)
        everything = _forward(model, "mustdrop", pixels)
    profile = stats.visual_tokens[0]
    assert int(profile[0]) == N_VISUAL - 8 * 2  # at most (36 - 18) // 8 = 2 windows under the budget
    assert float(profile.double().mean()) == pytest.approx(18, abs=0.5)
    assert everything.visual_tokens[0, 0] == 4  # the thresholds alone merge all four windows


def test_budget_ratio_and_the_key_floor(model):
    by_ratio = _forward(model, "mustdrop_prefill", ratio=0.5)
    assert float(by_ratio.mean_visual_tokens[0]) == pytest.approx(18, abs=0.5)
    keys = _kept(_forward(model, "mustdrop_prefill", gamma_g=1.0, gamma_i=2.0))
    floor = _forward(model, "mustdrop_prefill", keep=6)  # below what 3 never-dropped keys allow: (36 + 3 * 3) / 4
    assert floor.visual_tokens[0].tolist() == [N_VISUAL, 3, 3, 3]
    assert _kept(floor) == keys


def test_mustdrop_decode_composes_with_another_methods_prefill(model):
    """A Method returning both methods' operators (what vtprune.compose builds) runs both stages."""

    class FastVThenEvict(Method):
        name, paper, stages = "fastv+mustdrop_decode", "test", ("pre_llm", "layer", "decode")

        def operators(self, adapter):
            return (FastV(keep=9, layer=1).operators(adapter)
                    + MustDropDecode(layers=(2,), evict_threshold=1.1, patience=1).operators(adapter))

    out, stats = _generate(model, FastVThenEvict(), [prompt(PREFIX, SUFFIX)], steps=10)
    assert stats.visual_tokens[0].tolist() == [N_VISUAL, 9, 9, 9]
    text = len(PREFIX) + 1 + len(SUFFIX) + 9
    lengths = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    assert lengths[0] == text + N_VISUAL and lengths[1] == text + 9
    assert text <= lengths[2] == lengths[3] <= text + 3  # only key tokens FastV kept are left (compacted at step 7)


@pytest.mark.parametrize("method,params,error,message", [
    ("mustdrop", {"tau": "high"}, ValueError, "must be a number"),
    ("mustdrop", {"merge_count": "image"}, ValueError, "must be one of"),
    ("mustdrop", {"vision": False, "prefill": False, "decode": False}, ValueError, "every stage is switched off"),
    ("mustdrop", {"prefill": False}, ValueError, "decode_policy='trim'"),
    ("mustdrop_decode", {"decode_policy": "trim"}, ValueError, "decode_policy='trim'"),
    ("mustdrop", {"keep": 64, "gamma_i": 0.0}, ValueError, "both be > 0"),
    ("mustdrop", {"keep": 64, "ratio": 0.5}, ValueError, "not both"),
    ("mustdrop", {"patience": 0}, ValueError, "patience=0 must be >= 1"),
    ("mustdrop_vision", {"gamma_g": 0.1}, TypeError, "no parameter 'gamma_g'"),
    ("mustdrop", {"layers": (1, 3)}, ValueError, "need a later layer"),
    ("mustdrop", {"keep": 40}, ValueError, "larger than the 36"),
    ("mustdrop", {"window": 4}, ValueError, "do not tile the 6x6"),
])
def test_bad_settings_are_refused_before_anything_is_installed(model, method, params, error, message):
    with pytest.raises(error, match=message):
        vtprune.apply(model, method, **params)
    vtprune.apply(model, method).remove()  # nothing was left installed


def test_vision_stage_is_refused_on_qwen_and_the_others_run_there():
    family = Family("qwen2_vl")
    model = family.model()
    with pytest.raises(TypeError, match="needs a model where"):
        vtprune.apply(model, "mustdrop")
    inputs = family.inputs([["user:", picture(100, 190, 1), "what", "?", "assistant:"]])
    with torch.no_grad(), vtprune.apply(model, "mustdrop", vision=False, gamma_g=0.3, gamma_i=0.5) as pruner:
        model(**inputs)
    assert pruner.stats.visual_tokens[0, -1] < pruner.stats.visual_tokens[0, 0]
    assert adapter_for(model).family == "qwen2_vl"


def test_llava_next_views_merge_on_their_own_alone_and_in_a_batch():
    """LLaVA-NeXT: views of one tower call merge different numbers of windows (padding masked), an image gives the
    same tokens and logits alone and in a left-padded batch, and each view keeps ceil(0.08 * n) key tokens."""
    family = Family("llava_next")
    model = family.model()
    prompts = [["user:", picture(100, 190, 1), "what", "is", "in", "the", "image", "?", "assistant:"],
               ["user:", picture(160, 150, 2), "and", picture(90, 90, 3), "describe", "both", "assistant:"]]
    outputs = []
    block = encoder_layers(model.model.vision_tower)[0]
    handle = block.register_forward_hook(lambda module, args, out: outputs.append(out.detach()))
    with torch.no_grad():
        model(**family.inputs(prompts))
    handle.remove()
    similarity = window_similarity(outputs[0][:, 1:], WINDOWS)
    tau = float(similarity.flatten().median())  # about half the windows merge, unevenly over the views
    params = dict(tau=tau, gamma_g=1.0, gamma_i=2.0)
    with torch.no_grad(), vtprune.apply(model, "mustdrop", **params) as pruner:
        tokens, logits = greedy(model, family.inputs(prompts))
        together = [[views.clone() for views in sample] for sample in pruner.stats.tokens_per_partition]
        for row, single in enumerate(prompts):
            alone_tokens, alone_logits = greedy(model, family.inputs([single]))
            assert torch.equal(tokens[row], alone_tokens[0])
            torch.testing.assert_close(logits[row], alone_logits[0], atol=1e-4, rtol=1e-4)
            for image, views in enumerate(pruner.stats.tokens_per_partition[0]):
                assert torch.equal(views, together[row][image])
    entering = torch.cat([views[:, 0] for sample in together for views in sample])
    merged = (similarity >= tau).sum(1)
    assert len(set(merged.tolist())) > 1  # views merged different counts: the tower padded some
    for sample in together:
        for views in sample:
            for n, last in zip(views[:, 0].tolist(), views[:, -1].tolist()):
                assert last == math.ceil(0.08 * n)
    with torch.no_grad(), vtprune.apply(model, "mustdrop", **{**params, "tau": 1.5}) as unmerged:
        model(**family.inputs(prompts))
    whole = torch.cat([views[:, 0] for sample in unmerged.stats.tokens_per_partition for views in sample])
    assert bool((entering <= whole).all()) and int(entering.sum()) < int(whole.sum())
