"""LVLM_CSP's oracles (the card's section 10, T1-T9) on tiny random models: per-layer counts and representative sets
for every clustering design, original positions, the three scatter modes on hand-checkable states, the top-K against
an eager copy's attention row, identity, the budget formula and solver, image-token FLOPs, cache and batch parity,
refusals, LLaVA-NeXT per-view clustering and Qwen2-VL's 3-D positions."""
from __future__ import annotations

import pytest
import torch

import vtprune
from vtprune.methods.csp import CSP, Plan, _ClusterScatter, layer_average, view_shares
from vtprune.ops import nearest_point, stride_membership, stride_representatives
from conftest import N_VISUAL, batch, greedy, images, prompt, tiny_llava
from families import Family, picture

PREFIX, SUFFIX = [1, 5, 6], [7, 8, 9]
START = len(PREFIX)  # column of the first image token
SEG = 20  # a token id standing for LISA's [SEG]
DEPTH = 8
# cluster_until 2, prune_from 5, N_c 8, K 5: layers 0-1 see 8 image tokens, 2-4 all 36, 5-7 five
STAGES = {"cluster_until": 2, "prune_from": 5, "cluster_tokens": 8, "prune_tokens": 5}
PROFILE = [8, 8, 36, 36, 36, 5, 5, 5]


@pytest.fixture(scope="module")
def model():
    return tiny_llava(layers=DEPTH)


@pytest.fixture(scope="module")
def eager():
    return tiny_llava(attn="eager", layers=DEPTH)  # same seed: the same weights, eager attention


def _run(model, prompts=None, pixels=None, **params):
    """One pruned forward; returns (pruner, {layer: (hidden_states, position_ids) entering it}, logits)."""
    ids, mask = batch(prompts or [prompt(PREFIX, SUFFIX)])
    seen = {}

    def spy(index):
        def hook(module, args, kwargs):
            seen[index] = ((args[0] if args else kwargs["hidden_states"]).clone(), kwargs["position_ids"].clone())
        return hook

    layers = model.model.language_model.layers
    with torch.no_grad(), vtprune.apply(model, "csp", **params) as pruner:
        handles = [layer.register_forward_pre_hook(spy(i), with_kwargs=True) for i, layer in enumerate(layers)]
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=images(len(ids)) if pixels is None
                       else pixels).logits
        for handle in handles:
            handle.remove()
    return pruner, seen, logits


def _kept(stats, sample=0):
    return stats.kept_patches(sample).nonzero().flatten()


def _representatives(seen):
    """Patches (raster indices) entering layer 0, read from their original positions."""
    positions = seen[0][1][0]
    image = positions[(positions >= START) & (positions < START + N_VISUAL)]
    return image - START


def _embeddings(model, pixels=None):
    with torch.no_grad():
        return model.model.get_image_features(pixel_values=images(1) if pixels is None else pixels).pooler_output[0]


# --- T1/T2/T6: counts, representative sets, positions, the formula ----------------------------------------------
def test_profile_uniform_1d_representatives_and_original_positions(model):
    pruner, seen, _ = _run(model, **STAGES)
    text = len(PREFIX) + 1 + len(SUFFIX)
    assert [seen[layer][0].shape[1] - text for layer in range(DEPTH)] == PROFILE
    assert pruner.stats.visual_tokens[0].tolist() == PROFILE
    assert float(pruner.stats.mean_visual_tokens[0]) == layer_average(N_VISUAL, DEPTH, 2, 5, 8, 5) == 17.375
    # clustering layers: i * floor(36 / 8) = 0, 4, ..., 28, at their original positions
    stride = torch.arange(8) * 4
    full = torch.arange(text + N_VISUAL)
    clustered = torch.cat([full[:START], START + stride, full[START + N_VISUAL:]])
    for layer in (0, 1):
        assert torch.equal(seen[layer][1][0], clustered)
    for layer in (2, 3, 4):  # scattering: every token, original positions
        assert torch.equal(seen[layer][1][0], full)
    kept = _kept(pruner.stats)
    assert len(kept) == 5
    pruned = torch.cat([full[:START], START + kept, full[START + N_VISUAL:]])
    for layer in (5, 6, 7):
        assert torch.equal(seen[layer][1][0], pruned)
    assert pruner.method.resolved(pruner.adapter)["profile"] == PROFILE


def test_uniform_2d_representatives_are_the_lattice(model):
    _, seen, _ = _run(model, clustering="uniform_2d", cluster_until=2, prune_from=5, cluster_tokens=9,
                      prune_tokens=5)
    assert _representatives(seen).tolist() == [7, 9, 11, 19, 21, 23, 31, 33, 35]


def test_cls_representatives_are_the_top_of_an_eager_cls_row(model, eager):
    """CLS clustering == top N_c of the [CLS] row of the feature block (block 2 of the 4-block tower for
    vision_feature_layer=-2), head mean, from the eager tower's own attention weights."""
    _, seen, _ = _run(model, clustering="cls", **STAGES)
    with torch.no_grad():
        out = eager.model.vision_tower(images(1), output_attentions=True)
    row = out.attentions[2][0, :, 0, 1:].mean(0)
    expected = row.argsort(descending=True)[:8].sort().values
    assert torch.equal(_representatives(seen), expected)


def test_random_representatives_follow_seed_and_image_not_batch(model):
    sets = [_representatives(_run(model, clustering="random", seed=seed, **STAGES)[1]) for seed in (0, 0, 1)]
    assert len(sets[0]) == 8 and torch.equal(sets[0], sets[1]) and not torch.equal(sets[0], sets[2])
    # the same image second in a batch (after another image and a longer prompt): the same tokens
    pixels = torch.cat([images(1, seed=7), images(1)])
    seen = _layer_zero(model, [prompt([1, 5, 6, 6, 6], SUFFIX), prompt(PREFIX, SUFFIX)], pixels,
                       clustering="random", seed=0, **STAGES)
    assert torch.equal(seen[1], sets[0]) and len(seen[0]) == 8 and not torch.equal(seen[0], sets[0])


def _layer_zero(model, prompts, pixels, **params):
    """Per sample, the patches (offsets from the image's first row) kept before layer 0."""
    kept = {}
    original = _ClusterScatter.transform

    def recording(self, ctx):
        change = original(self, ctx)
        if ctx.layer == 0:
            for b in range(ctx.rows.shape[0]):
                image = ctx.image[b] == 0
                first = int(ctx.rows[b][image].min())
                kept[b] = ctx.rows[b][image & change.keep[b]] - first
        return change

    _ClusterScatter.transform = recording
    try:
        _run(model, prompts=prompts, pixels=pixels, **params)
    finally:
        _ClusterScatter.transform = original
    return kept


# --- T3/T7: the top-K against an eager copy's attention row -------------------------------------------------------
def _eager_query_row(eager, ids, query_column, **params):
    """Head-mean attention row of ``query_column`` at layer prune_from - 1 of the eager copy run under the same
    clustering (its own attention weights), over the image columns."""
    grabbed = {}
    layer = eager.model.language_model.layers[params["prune_from"] - 1]
    hook = layer.self_attn.register_forward_hook(lambda module, args, output: grabbed.update(weights=output[1]))
    try:
        with torch.no_grad(), vtprune.apply(eager, "csp", **params):
            eager(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=images(1))
    finally:
        hook.remove()
    weights = grabbed["weights"]
    assert weights.shape[-1] == ids.shape[1]  # all N image tokens are present there
    return weights[0, :, query_column, START:START + N_VISUAL].mean(0)


@pytest.mark.parametrize("query", ["last", "seg_token"])
def test_prune_keeps_the_top_k_of_the_query_row_recomputed_on_an_eager_copy(model, eager, query):
    suffix = [7, SEG, 8, 9]
    ids, _ = batch([prompt(PREFIX, suffix)])
    params = {**STAGES, "prune_tokens": 7, "prune_query": query, "seg_token_id": SEG}
    pruner, _, _ = _run(model, prompts=[prompt(PREFIX, suffix)], **params)
    column = ids.shape[1] - 1 if query == "last" else int((ids[0] == SEG).nonzero())
    row = _eager_query_row(eager, ids, column, **params)
    expected = row.argsort(descending=True)[:7].sort().values
    assert torch.equal(_kept(pruner.stats), expected)
    assert pruner.method.label(pruner.adapter) == ("csp" if query == "seg_token" else "csp (last-token adaptation)")


def test_seg_and_last_queries_choose_differently(model):
    suffix = [7, SEG, 8, 9]
    kept = [_kept(_run(model, prompts=[prompt(PREFIX, suffix)], **STAGES, prune_query=q, seg_token_id=SEG)[0].stats)
            for q in ("last", "seg_token")]
    assert not torch.equal(kept[0], kept[1])


def test_auto_query_takes_the_seg_id_from_the_model_config():
    model = tiny_llava(layers=DEPTH)
    method = CSP(**STAGES)
    with vtprune.apply(model, method) as pruner:
        assert pruner.method.resolved(pruner.adapter)["prune_query"] == "last"
    model.config.seg_token_id = SEG
    suffix = [7, SEG, 8, 9]
    with vtprune.apply(model, CSP(**STAGES)) as pruner:
        resolved = pruner.method.resolved(pruner.adapter)
    assert resolved["prune_query"] == "seg_token" and resolved["seg_token_id"] == SEG
    assert resolved["variant"] == "csp"
    by_config = _kept(_run(model, prompts=[prompt(PREFIX, suffix)], **STAGES)[0].stats)
    explicit = _kept(_run(model, prompts=[prompt(PREFIX, suffix)], **STAGES, prune_query="seg_token",
                          seg_token_id=SEG)[0].stats)
    assert torch.equal(by_config, explicit)


def test_prompts_without_seg_or_with_seg_before_the_image_are_refused(model):
    with pytest.raises(ValueError, match=r"row\(s\) \[0\] have no \[SEG\] token \(id 20\).*prune_query='last'"):
        _run(model, prompts=[prompt(PREFIX, SUFFIX)], **STAGES, prune_query="seg_token", seg_token_id=SEG)
    with pytest.raises(ValueError, match=r"a \[SEG\] token comes before image tokens"):
        _run(model, prompts=[prompt([1, SEG], SUFFIX)], **STAGES, prune_query="seg_token", seg_token_id=SEG)
    # a text-only row beside an image row needs no [SEG]
    ids, mask = batch([[1, 5, 6, 7, 8, 9], prompt(PREFIX, [7, SEG, 8])])
    with torch.no_grad(), vtprune.apply(model, "csp", **STAGES, prune_query="seg_token", seg_token_id=SEG) as pruner:
        model(input_ids=ids, attention_mask=mask, pixel_values=images(1))
    assert pruner.stats.visual_tokens.tolist() == [[0] * DEPTH, PROFILE]


# --- T4/T5: identity and the scatter modes --------------------------------------------------------------------
@pytest.mark.parametrize("scatter", ["raw", "copy_rep", "rep_delta"])
@pytest.mark.parametrize("params", [{"ratio": 1.0}, {"cluster_tokens": N_VISUAL, "prune_tokens": N_VISUAL},
                                    {"cluster_until": 0, "prune_from": 3, "prune_tokens": N_VISUAL}],
                         ids=["ratio1", "counts", "no-clustering"])
def test_full_counts_are_the_unpruned_model(model, scatter, params):
    ids, mask = batch([prompt(PREFIX, SUFFIX), prompt([2], [4, 4])])
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, pixel_values=images(2)).logits
        with vtprune.apply(model, "csp", scatter=scatter, **params) as pruner:
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=images(2)).logits
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], reference[valid], atol=1e-5, rtol=1e-5)
    assert pruner.stats.visual_tokens.tolist() == [[N_VISUAL] * DEPTH] * 2


def _scatter_layer(model, scatter, **params):
    """(image states entering layer cluster_until [36, D], layer-0 states [36, D])."""
    _, seen, _ = _run(model, scatter=scatter, **{**STAGES, **params})
    return seen[STAGES["cluster_until"]][0][0, START:START + N_VISUAL], _embeddings(model)


def test_scatter_modes_on_uniform_clusters(model):
    """N_c = 8 of 36 with uniform_1d: representatives 0, 4, ..., 28; token j belongs to min(j // 4, 7)."""
    rep_of = torch.arange(8)[stride_membership(N_VISUAL, 8)] * 4
    members = torch.tensor([j for j in range(N_VISUAL) if j % 4 or j > 28])
    raw, layer0 = _scatter_layer(model, "raw")
    torch.testing.assert_close(raw[members], layer0[members], atol=0, rtol=0)  # members at their layer-0 state
    reps = torch.arange(0, 29, 4)
    assert not torch.allclose(raw[reps], layer0[reps], atol=1e-3)  # representatives went through layers 0, 1
    copied, _ = _scatter_layer(model, "copy_rep")
    torch.testing.assert_close(copied, copied[rep_of], atol=0, rtol=0)  # one state per cluster
    torch.testing.assert_close(copied[reps], raw[reps], atol=0, rtol=0)
    delta, _ = _scatter_layer(model, "rep_delta")
    torch.testing.assert_close(delta - delta[rep_of], layer0 - layer0[rep_of], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(delta[reps], raw[reps], atol=0, rtol=0)
    assert not torch.allclose(delta[members], layer0[members], atol=1e-3)


@pytest.mark.parametrize("clustering", ["random", "cls"])
def test_members_join_the_most_cosine_similar_representative(model, clustering):
    copied, layer0 = _scatter_layer(model, "copy_rep", clustering=clustering)
    _, seen, _ = _run(model, clustering=clustering, **STAGES)
    reps = _representatives(seen)
    unit = torch.nn.functional.normalize(layer0, dim=-1)
    nearest = reps[(unit @ unit[reps].T).argmax(1)]
    nearest[reps] = reps
    torch.testing.assert_close(copied, copied[nearest], atol=0, rtol=0)
    assert len(set(nearest.tolist())) > 1


def test_uniform_2d_members_join_the_nearest_lattice_point(model):
    copied, _ = _scatter_layer(model, "copy_rep", clustering="uniform_2d", cluster_tokens=9)
    lattice = torch.tensor([7, 9, 11, 19, 21, 23, 31, 33, 35])
    grid = torch.stack([torch.arange(N_VISUAL) // 6, torch.arange(N_VISUAL) % 6], 1).float()
    distance = ((grid[:, None] - grid[lattice][None]) ** 2).sum(-1)
    nearest = lattice[distance.argmin(1)]
    assert nearest[0].item() == 7 and nearest[5].item() == 11 and nearest[30].item() == 31
    torch.testing.assert_close(copied, copied[nearest], atol=0, rtol=0)


# --- T6: the budget solver and the FLOPs of image tokens --------------------------------------------------------
def test_card_settings_and_the_solver():
    assert layer_average(256, 32, 12, 16, 64, 64) == 88  # the card's illustrative settings
    assert layer_average(256, 32, 8, 12, 64, 32) == 68
    plan = CSP(keep=88, cluster_until=12, prune_from=16).plan(256, 32)
    assert (plan.cluster_tokens, plan.prune_tokens, plan.mean_tokens) == (64, 64, 88)
    assert CSP(ratio=88 / 256, cluster_until=12, prune_from=16).plan(256, 32) == plan
    assert CSP(keep=68, cluster_until=8, prune_from=12, prune_tokens=32).plan(256, 32).cluster_tokens == 64
    assert CSP(keep=68, cluster_until=8, prune_from=12, cluster_tokens=64).plan(256, 32).prune_tokens == 32
    for n, depth in ((576, 32), (36, 8), (2880, 32)):
        for keep in range(1, n + 1, max(1, n // 60)):
            method = CSP(keep=keep)
            lc, lp = method.boundaries(depth)
            if keep < layer_average(n, depth, lc, lp, 1, 1) - 0.5:
                with pytest.raises(ValueError, match="lowest reachable average"):
                    method.plan(n, depth)
                continue
            plan = method.plan(n, depth)
            best = min(abs(layer_average(n, depth, lc, lp, x, x) - keep) for x in range(1, n + 1))
            assert abs(plan.mean_tokens - keep) == pytest.approx(best)  # as close as integers allow
    assert CSP().boundaries(32) == (12, 16) and CSP().boundaries(8) == (3, 4) and CSP().boundaries(4) == (2, 3)
    assert CSP(prune_from=2).boundaries(32) == (1, 2) and CSP(cluster_until=20).boundaries(32) == (20, 21)
    assert CSP().plan(36, 8) == Plan(36, 8, 3, 4, 9, 9)  # no budget: a layer average of 11/32 of N
    assert CSP().plan(576, 32) == Plan(576, 32, 12, 16, 144, 144)  # = N / 4 on 32 layers (the card's 64 of 256)
    assert CSP(cluster_tokens=10, prune_tokens=3).plan(36, 8).mean_tokens == (30 + 36 + 12) / 8


def test_stats_give_the_layer_average_and_image_token_flops(model):
    pruner, _, _ = _run(model, **STAGES)
    stats = pruner.stats
    text = len(PREFIX) + 1 + len(SUFFIX)
    assert stats.tokens[0].tolist() == [text + v for v in PROFILE]
    pruned, unpruned = stats.visual_flops(lambda n: n)  # linear: FLOPs count tokens
    assert float(pruned[0]) == sum(PROFILE) and float(unpruned[0]) == DEPTH * N_VISUAL
    pruned, unpruned = stats.visual_flops(lambda n: 4 * n * 64 ** 2 + 2 * n * n * 64)  # the card's (b) form
    expected = sum(4 * v * 64 ** 2 + 2 * ((text + v) ** 2 - text ** 2) * 64 for v in PROFILE)
    assert float(pruned[0]) == expected
    assert float(unpruned[0]) == DEPTH * (4 * 36 * 64 ** 2 + 2 * ((text + 36) ** 2 - text ** 2) * 64)


# --- T8/T9: cache and batch parity -------------------------------------------------------------------------------
def test_cache_parity_with_three_kv_lengths(model):
    """[SEG] query (its row only sees the prompt, so recomputing the prompt with the generated tokens appended
    prunes the same): greedy decoding with the KV cache == without it; the cache has three lengths."""
    prompts = [prompt(PREFIX, [7, SEG, 8, 9]), prompt([2], [SEG, 4, 4])]
    ids, mask = batch(prompts)
    pixels = images(2)
    params = {**STAGES, "clustering": "random", "scatter": "rep_delta", "prune_query": "seg_token",
              "seg_token_id": SEG}
    with torch.no_grad(), vtprune.apply(model, "csp", **params):
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True)
        cached = greedy(model, ids, mask, pixels, steps=5)
        recomputed = greedy(model, ids, mask, pixels, steps=5, use_cache=False)
    assert not (cached[0] == SEG).any()  # no generated [SEG] joins the recomputed prompts' query rows
    assert torch.equal(cached[0], recomputed[0])
    torch.testing.assert_close(cached[1], recomputed[1], atol=1e-4, rtol=1e-4)
    n = ids.shape[1]
    lengths = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    assert lengths == [n - N_VISUAL + count for count in PROFILE]
    assert len(set(lengths)) == 3


@pytest.mark.parametrize("params", [{"clustering": "random", "scatter": "rep_delta"},
                                    {"clustering": "uniform_1d", "scatter": "copy_rep"}])
def test_batch_of_two_equals_each_alone(model, params):
    prompts = [prompt(PREFIX, SUFFIX), prompt([2], [4, 4, 10, 11])]
    pixels = images(2)
    with torch.no_grad(), vtprune.apply(model, "csp", **STAGES, **params) as pruner:
        tokens, logits = greedy(model, *batch(prompts), pixels, steps=4)
        counts = pruner.stats.visual_tokens.clone()
        kept = [_kept(pruner.stats, b) for b in range(2)]
        for b in range(2):
            alone = greedy(model, *batch([prompts[b]]), pixels[b:b + 1], steps=4)
            assert torch.equal(tokens[b], alone[0][0])
            torch.testing.assert_close(logits[b], alone[1][0], atol=1e-4, rtol=1e-4)
            assert torch.equal(counts[b], pruner.stats.visual_tokens[0])
            assert torch.equal(kept[b], _kept(pruner.stats))
    assert counts.tolist() == [PROFILE, PROFILE]


# --- refusals -------------------------------------------------------------------------------------------------
def _hooks(model) -> list:
    return [(name, list(m._forward_pre_hooks), list(m._forward_hooks)) for name, m in model.named_modules()]


@pytest.mark.parametrize("params,message", [
    ({"clustering": "seg_first"}, "needs an instance segmenter"),
    ({"clustering": "kmeans"}, "clustering='kmeans' must be one of"),
    ({"scatter": "mean"}, "scatter='mean' must be one of"),
    ({"cluster_until": 5, "prune_from": 3}, "cluster_until=5 must be below prune_from=3"),
    ({"cluster_until": 4, "prune_from": 4}, "cluster_until=4 must be below prune_from=4"),
    ({"prune_from": 8}, "in it); use cluster_until < prune_from <= 7"),
    ({"cluster_until": 7}, "prune_from=8 is past the last of the 8 decoder layers"),
    ({"keep": 4}, "the lowest reachable average is 5.38; use keep >= 5"),
    ({"ratio": 0.1}, "the scattering layers hold every token: at least 0.1250"),
    ({"keep": 20, "cluster_tokens": 8, "prune_tokens": 8}, "not all three"),
    ({"keep": 30, "cluster_tokens": 2}, "above what the fixed counts reach"),
    ({"keep": N_VISUAL + 1}, f"use keep <= {N_VISUAL}"),
    ({"prune_query": "seg_token"}, "pass seg_token_id=<id of '[SEG]' in the tokenizer>"),
    ({"positions": "renumber"}, "positions='renumber' is not supported"),
    ({"separators": "candidates"}, "separators='candidates' would cluster"),
    ({"cluster_tokens": 0}, "cluster_tokens=0 must be >= 1"),
])
def test_bad_settings_are_refused_at_apply_and_leave_the_model_untouched(model, params, message):
    before = _hooks(model)
    with pytest.raises(ValueError) as info:
        vtprune.apply(model, "csp", **params)
    assert message in str(info.value)
    assert _hooks(model) == before and "get_image_features" not in model.model.__dict__
    vtprune.apply(model, "csp").remove()  # nothing was left installed


def test_too_shallow_models_and_cls_without_a_cls_token_are_refused():
    with pytest.raises(ValueError, match="the default needs at least 3 layers"):
        vtprune.apply(tiny_llava(layers=2), "csp")
    qwen = Family("qwen2_vl").model(layers=DEPTH)
    with pytest.raises(ValueError, match=r"clustering='cls' needs a vision tower with a \[CLS\] token; "
                                         r"Qwen2VLForConditionalGeneration \(qwen2_vl\) has none"):
        vtprune.apply(qwen, "csp", clustering="cls")
    assert vtprune.support_matrix()["csp"]["qwen2_vl"] is True


# --- families -------------------------------------------------------------------------------------------------
def test_helpers():
    assert stride_representatives(36, 8).tolist() == [0, 4, 8, 12, 16, 20, 24, 28]
    assert stride_membership(10, 3).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert view_shares(10, [36, 36, 18]) == [4, 4, 2]
    assert view_shares(2, [36, 5, 30]) == [1, 0, 1]
    points = torch.tensor([[0, 0], [0, 1], [2, 2]])
    assert nearest_point(points, torch.tensor([[0, 0], [0, 2]])).tolist() == [0, 0, 1]  # a tie goes to the lower


def test_llava_next_clusters_each_view_and_keeps_every_newline():
    family = Family("llava_next")
    model = family.model(layers=DEPTH)
    inputs = family.inputs([["user:", picture(100, 190, 1), "what", "is", "in", "the", "image", "?", "assistant:"]])
    seen = {}
    original = _ClusterScatter.transform

    def recording(self, ctx):
        change = original(self, ctx)
        if ctx.layer == 0:
            seen.update(partition=ctx.partition[0], row=ctx.row[0], col=ctx.col[0], candidate=ctx.candidate[0],
                        keep=change.keep[0])
        return change

    _ClusterScatter.transform = recording
    try:
        with torch.no_grad(), vtprune.apply(model, "csp", cluster_until=2, prune_from=5, cluster_tokens=10,
                                            prune_tokens=12) as pruner:
            model(**inputs)
    finally:
        _ClusterScatter.transform = original
    stats = pruner.stats
    views = stats.tokens_per_partition[0][0]  # [views, L]
    sizes = views[:, 2].tolist()
    assert len(sizes) >= 3 and sum(sizes) + int(stats.separator_tokens[0, 0]) == int(stats.original_visual_tokens[0])
    shares = view_shares(10, sizes)
    assert views[:, 0].tolist() == shares and views[:, 1].tolist() == shares
    for view, share in enumerate(shares):
        where = (seen["partition"] == view) & seen["candidate"]
        order = (seen["row"][where] * 1000 + seen["col"][where]).argsort()
        raster = where.nonzero().flatten()[order]
        expected = raster[stride_representatives(len(raster), share)]
        assert torch.equal(seen["keep"][raster].nonzero().flatten(), (raster[:, None] == expected).any(1)
                           .nonzero().flatten())
    assert stats.separator_tokens[0].tolist() == [int(stats.separator_tokens[0, 0])] * DEPTH  # never dropped
    assert (stats.visual_tokens[0] - stats.separator_tokens[0]).tolist() == [10, 10] + [sum(sizes)] * 3 + [12] * 3


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_clusters_the_merged_grid_with_original_3d_positions(name):
    """Default settings on an 8-layer Qwen model (28 merged tokens: 4 x 7): N_c = K = 7, stride 4 over the merged
    grid; the RoPE each layer gets is the unpruned model's at the tokens it keeps."""
    family = Family(name)
    model = family.model(layers=DEPTH)
    inputs = family.inputs([["user:", picture(100, 190, 1), "what", "is", "in", "the", "image", "?", "assistant:"]])
    rope = {}

    def spy(index):
        def hook(module, args, kwargs):
            rope[index] = kwargs["position_embeddings"][0].clone()
        return hook

    layers = model.model.language_model.layers
    with torch.no_grad():
        handle = layers[0].register_forward_pre_hook(spy("unpruned"), with_kwargs=True)
        model(**inputs)
        handle.remove()
        with vtprune.apply(model, "csp") as pruner:
            handles = [layer.register_forward_pre_hook(spy(i), with_kwargs=True) for i, layer in enumerate(layers)]
            model(**inputs)
            for handle in handles:
                handle.remove()
    assert pruner.stats.visual_tokens[0].tolist() == [7, 7, 7, 28, 7, 7, 7, 7]
    ids = inputs["input_ids"][0]
    image = (ids == 99).nonzero().flatten()
    text = (ids != 99).nonzero().flatten()

    def columns(patches):
        return torch.cat([text, image[patches]]).sort().values

    full = rope["unpruned"]
    torch.testing.assert_close(rope[0], full[..., columns(torch.arange(0, 28, 4)), :], atol=0, rtol=0)
    torch.testing.assert_close(rope[3], full, atol=0, rtol=0)
    torch.testing.assert_close(rope[4], full[..., columns(_kept(pruner.stats)), :], atol=0, rtol=0)
    assert not torch.equal(rope[0], full[..., columns(torch.arange(7)), :])  # not renumbered onto the first slots
