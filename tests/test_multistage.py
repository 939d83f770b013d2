"""Multi-stage in-LLM methods (PyramidDrop, FEATHER) and the no-RoPE criterion, checked against the cards' oracles:
per-stage counts and the layer-averaged formula, criteria against an independent computation from the layer's
weights (eager attention for the RoPE criterion), hand-made rankings, positions, and RoPE's positional bias."""
from __future__ import annotations

import pytest
import torch

import vtprune
from vtprune.methods.fastv import _FastVDrop
from vtprune.methods.feather import _FeatherCut
from vtprune.methods.pyramiddrop import PyramidDrop, _PyramidStage, layer_average, stage_counts
from conftest import N_VISUAL, batch, images, prompt, tiny_llava

PREFIX, SUFFIX = [1, 5, 6], [7, 8, 9]


def _run(model, method: str, prompts=None, spy_layers=(), **params):
    """One pruned forward; returns (pruner, {layer: (hidden_states, position_ids) entering it})."""
    ids, mask = batch(prompts or [prompt(PREFIX, SUFFIX)])
    seen = {}

    def spy(index):
        def hook(module, args, kwargs):
            seen[index] = (kwargs.get("hidden_states", args[0] if args else None).clone(),
                           kwargs["position_ids"].clone())
        return hook

    layers = model.model.language_model.layers
    with torch.no_grad(), vtprune.apply(model, method, **params) as pruner:
        handles = [layers[i].register_forward_pre_hook(spy(i), with_kwargs=True) for i in spy_layers]
        model(input_ids=ids, attention_mask=mask, pixel_values=images(len(ids)))
        for handle in handles:
            handle.remove()
    return pruner, seen


# --- PyramidDrop ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("boundaries,lam,expected", [
    ((8, 16, 24), 0.5, 270.0), ((8, 16, 24), 0.25, 191.25), ((2, 8, 16, 24), 0.4, 114.625),
    ((2, 8, 16, 24), 0.5, 153.0), ((2, 6, 12, 18, 24), 0.5, 123.75), ((2, 6, 12, 18, 24), 0.3, 70.875)])
def test_pyramiddrop_layer_average_matches_the_cards_examples(boundaries, lam, expected):
    counts = stage_counts(576, lam, len(boundaries))
    assert layer_average(576, boundaries, counts, 32) == pytest.approx(expected)


def test_pyramiddrop_profile_per_stage_and_renumbered_positions(model):
    """Boundaries 1, 2, 3 and lambda 0.5 on 36 image tokens: 36, 18, 9, 4 enter layers 0..3; text untouched;
    positions renumbered to 0..n'-1 after every cut; the stats' layer average is the formula's."""
    pruner, seen = _run(model, "pyramiddrop", spy_layers=range(4), layers=(1, 2, 3), lam=0.5)
    assert pruner.stats.visual_tokens[0].tolist() == [36, 18, 9, 4]
    text = len(PREFIX) + 1 + len(SUFFIX)
    for layer, count in enumerate([36, 18, 9, 4]):
        hidden, positions = seen[layer]
        assert hidden.shape[1] == text + count
        assert torch.equal(positions[0], torch.arange(text + count))
    assert float(pruner.stats.mean_visual_tokens[0]) == layer_average(36, (1, 2, 3), (18, 9, 4), 4)


def test_pyramiddrop_keeps_the_top_of_each_stage_among_survivors(model, monkeypatch):
    """Hand-made scores (a fixed permutation of the image tokens): each stage keeps the best of the survivors, so
    the final set is the permutation's top-4 and every stage's set is nested in the previous one."""
    permutation = torch.randperm(N_VISUAL, generator=torch.Generator().manual_seed(3)).float()
    kept_per_stage = []

    def scores(self, ctx):
        universe_rows = ctx.rows - len(PREFIX)
        image = (universe_rows >= 0) & (universe_rows < N_VISUAL)
        out = torch.where(image, permutation[universe_rows.clamp(0, N_VISUAL - 1)], 0.0)
        kept_per_stage.append(set(universe_rows[ctx.visual].tolist()))
        return out

    monkeypatch.setattr(_PyramidStage, "scores", scores)
    pruner, _ = _run(model, "pyramiddrop", layers=(1, 2, 3), lam=0.5)
    order = permutation.argsort(descending=True)
    assert torch.equal(pruner.stats.kept_patches(0).nonzero().flatten(), order[:4].sort().values)
    assert kept_per_stage == [set(range(N_VISUAL)), set(order[:18].tolist()), set(order[:9].tolist())]


def test_pyramiddrop_criterion_is_the_boundary_layers_own_attention():
    """The score at boundary b == the eager attention layer b computes (last row, head mean) on the same tokens:
    with lambda 1 nothing is dropped, so layer b runs on exactly the scored sequence."""
    model = tiny_llava(attn="eager")
    captured, attention = {}, {}
    original = _PyramidStage.scores

    def recording(self, ctx):
        captured[ctx.layer] = original(self, ctx)
        return captured[ctx.layer]

    def grab(module, args, output):
        attention[2] = output[1]

    hook = model.model.language_model.layers[2].self_attn.register_forward_hook(grab)
    try:
        _PyramidStage.scores = recording
        _run(model, "pyramiddrop", prompts=[prompt(PREFIX, SUFFIX), prompt([1], SUFFIX + [10, 11])], layers=(2,),
             lam=1.0)
    finally:
        _PyramidStage.scores = original
        hook.remove()
    expected = attention[2][:, :, -1, :].float().mean(1)
    torch.testing.assert_close(captured[2], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("params,message", [
    ({"lam": 0.5, "keep": 64}, "not both"),
    ({"layers": (1, 9)}, "reach past"),
    ({"layers": (2, 3), "ratio": 0.2}, "below what boundaries"),
    ({"layers": (2, 2)}, "twice"),
])
def test_pyramiddrop_refuses_bad_settings_at_apply(model, params, message):
    with pytest.raises(ValueError, match=message):
        vtprune.apply(model, "pyramiddrop", **params)
    vtprune.apply(model, "pyramiddrop").remove()  # nothing was left installed


def test_pyramiddrop_solves_lambda_for_a_layer_average():
    """keep = layer-averaged tokens: the solved plan lands within 2 tokens for budgets the paper's boundaries
    reach, and switches to earlier boundaries for smaller ones (recorded in the plan)."""
    for depth in (8, 32):
        for keep in (64, 128, 144, 192, 270):
            plan = PyramidDrop(keep=keep).schedule(576, depth)
            assert abs(plan.mean_tokens - keep) <= 2
            assert plan.lam >= 0.25  # no degenerate pyramid (all but nothing dropped at the first boundary)
            assert plan.mean_tokens == layer_average(576, plan.boundaries, plan.counts, depth)
            assert list(plan.counts) == sorted(plan.counts, reverse=True)
    assert PyramidDrop(keep=192).schedule(576, 32).boundaries == (8, 16, 24)
    assert PyramidDrop(keep=64).schedule(576, 32).boundaries[0] < 8
    assert PyramidDrop().schedule(576, 32).counts == (288, 144, 72)


# --- FEATHER ----------------------------------------------------------------------------------------------------
GRID_U = {0, 3, 18, 21}  # rows and columns 0, 3 of the 6 x 6 grid (stride 3)


def test_feather_counts_grid_and_original_positions(model, monkeypatch):
    """Scores that put the uniform grid last: it survives the first cut anyway (|A u U| = 10 + 4 tokens, f = 0.3),
    the second cut keeps floor(36 * 0.09) = 3 of the best and drops the grid; positions stay original."""
    permutation = torch.randperm(N_VISUAL, generator=torch.Generator().manual_seed(7)).float() + 10
    for u in GRID_U:
        permutation[u] = -float(u)  # the grid scores lowest

    def scores(self, ctx):
        universe_rows = ctx.rows - len(PREFIX)
        image = (universe_rows >= 0) & (universe_rows < N_VISUAL)
        return torch.where(image, permutation[universe_rows.clamp(0, N_VISUAL - 1)], 0.0)

    monkeypatch.setattr(_FeatherCut, "scores", scores)
    pruner, seen = _run(model, "feather", spy_layers=range(4), layers=(1, 2))
    assert pruner.stats.visual_tokens[0].tolist() == [36, 14, 3, 3]
    order = permutation.argsort(descending=True)
    first = set(order[:10].tolist()) | GRID_U
    n = len(PREFIX) + N_VISUAL + 1 + len(SUFFIX)
    full = torch.arange(n)
    kept_first = torch.tensor(sorted(len(PREFIX) + i for i in first))
    expected = torch.cat([full[:len(PREFIX)], kept_first, full[len(PREFIX) + N_VISUAL:]])
    assert torch.equal(seen[1][1][0], expected)
    assert torch.equal(pruner.stats.kept_patches(0).nonzero().flatten(), order[:3].sort().values)


def _manual_last_token_scores(layer, hidden, image_columns, rope=None):
    """Head-mean softmax of the last token's q over the image keys, from the layer's own weights (no vtprune code)."""
    attention = layer.self_attn
    normed = layer.input_layernorm(hidden)
    d = attention.head_dim
    q = attention.q_proj(normed[:, -1:]).view(hidden.shape[0], 1, -1, d).transpose(1, 2)  # [B, H, 1, d]
    k = attention.k_proj(normed).view(hidden.shape[0], hidden.shape[1], -1, d).transpose(1, 2)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q @ k.transpose(-1, -2)).squeeze(2) * d ** -0.5  # [B, H, n]
    logits = logits.masked_fill(~image_columns[:, None, :], float("-inf"))
    return logits.softmax(-1).mean(1)


def test_feather_criterion_is_no_rope_last_token_attention_over_image_keys(model):
    """FEATHER's score at cut k == softmax over the image keys of layer k-1's q/k without RoPE, head mean."""
    captured = {}
    original = _FeatherCut.scores

    def recording(self, ctx):
        captured[ctx.layer] = (original(self, ctx), ctx.visual.clone())
        return captured[ctx.layer][0]

    _FeatherCut.scores = recording
    try:
        _, seen = _run(model, "feather", spy_layers=(1,), layers=(2, 3))
    finally:
        _FeatherCut.scores = original
    score, visual = captured[2]
    layer = model.model.language_model.layers[1]
    with torch.no_grad():
        expected = _manual_last_token_scores(layer, seen[1][0], visual)
    torch.testing.assert_close(score, expected, atol=1e-6, rtol=1e-5)
    assert float(score[visual].sum()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("method,params", [("feather", {"layers": (1, 2)}), ("fastv", {"layer": 1})])
def test_rope_alone_makes_identical_image_tokens_score_differently(method, params):
    """Every image token given the same embedding (constant projector output): at layer 0 their keys are equal, so
    a criterion without RoPE scores them all alike, while with RoPE the score depends on the distance to the last
    token — the positional bias FEATHER removes."""
    model = tiny_llava()
    projector = model.model.multi_modal_projector.linear_2
    with torch.no_grad():
        projector.weight.zero_()
        projector.bias.copy_(torch.randn(projector.bias.shape, generator=torch.Generator().manual_seed(0)))
    cls = _FeatherCut if method == "feather" else _FastVDrop
    spread = {}
    original = cls.scores
    for rope in (False, True):
        def recording(self, ctx, rope=rope):
            score = original(self, ctx)
            if ctx.layer == 1:
                values = score[ctx.visual]
                spread[rope] = float(values.max() - values.min()) / float(values.abs().max())
            return score

        cls.scores = recording
        try:
            _run(model, method, criterion_rope=rope, **params)
        finally:
            cls.scores = original
    assert spread[False] < 1e-5
    assert spread[True] > 1e-3


@pytest.mark.parametrize("rope", [False, True])
def test_criterion_ignores_a_shift_of_every_position(rope):
    """A longer text prefix shifts every image position but not the image-to-last-token distances: the criterion
    without RoPE (no positions at all) and with RoPE (relative positions only) scores the image tokens the same.
    Scored at layer 0's input, which the prefix does not change for the image tokens and the last token."""
    model = tiny_llava()
    captured = []
    original = _FeatherCut.scores

    def recording(self, ctx):
        score = original(self, ctx)
        if ctx.layer == 1:
            captured.append(score[ctx.visual])
        return score

    _FeatherCut.scores = recording
    try:
        for prefix in ([1], [1, 5, 5, 5]):
            _run(model, "feather", prompts=[prompt(prefix, SUFFIX)], layers=(1, 2), criterion_rope=rope)
    finally:
        _FeatherCut.scores = original
    torch.testing.assert_close(captured[0], captured[1], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("params,message", [({"layers": (1,)}, "two distinct"), ({"layers": (2, 5)}, "two distinct"),
                                            ({"stride": 0}, ">= 1")])
def test_feather_refuses_bad_settings(model, params, message):
    with pytest.raises(ValueError, match=message):
        vtprune.apply(model, "feather", **params)
