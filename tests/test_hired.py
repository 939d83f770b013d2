"""HiRED against the method card's oracles (shared/methods/hired.md, section 12), and the ``separators='drop'`` policy
it brought to the runtime.

Budget arithmetic and region maps are checked on the pure functions with expected values worked out by hand or with
exact fractions; the method on tiny LLaVA-NeXT / LLaVA-1.5 models against an oracle computed independently from the
CLIP tower's eager ``output_attentions`` (a second copy of the model with the same weights). Hand-made attention rows
(the adapter's ``vision_attention`` replaced) are used only where a test is about selection arithmetic.
"""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

import vtprune
from vtprune.models import adapter_for
from vtprune.models.clip import encoder_layers
from vtprune.models.layout import TokenKind
from vtprune.models.llava import LlavaAdapter
from vtprune.ops import base_and_subs, rate_budget, region_index, region_scores, split_by_content, view_budgets
from vtprune.runtime import encode_images
from families import IMAGE, Family, greedy, picture

NEXT, LLAVA, QWEN = Family("llava_next"), Family("llava"), Family("qwen2_vl")
SIDE, T = 6, 36  # the tiny CLIP view: 6 x 6 patches
FEATURE_BLOCK = 2  # vision_feature_layer=-2 of the 4-block tower
SQUARE, WIDE, STRIP, TALL = (160, 150), (100, 190), (60, 200), (200, 60)  # 2x2, 2x2 unpadded, 1x2, 2x1 grids
_models: dict = {}


def _sharpened(family: Family, attn: str = "sdpa"):
    """The family's tiny model with sharper [CLS] attention in blocks 0 and 2 (random weights attend almost evenly,
    which would leave the content split nearly uniform); cached."""
    if (family.name, attn) not in _models:
        model = family.model(attn=attn)
        with torch.no_grad():
            for block in (0, FEATURE_BLOCK):
                encoder_layers(model.model.vision_tower)[block].self_attn.q_proj.weight.mul_(6.0)
        _models[family.name, attn] = model
    return _models[family.name, attn]


def _inputs(family: Family, size, seed: int = 5) -> dict:
    return family.inputs([["a", picture(*size, seed), "?"]])


def _layout(model, inputs, image: int = 0):
    extra = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
    return encode_images(model, pixel_values=inputs["pixel_values"], **extra).images()[image].layout


def _run(model, inputs, **params):
    with torch.no_grad(), vtprune.apply(model, "hired", **params) as pruner:
        logits = model(**inputs).logits
    return pruner.stats, logits


def _kept_by_view(stats, layout, sample: int = 0, offset: int = 0) -> dict[int, list[int]]:
    """The patch indices (raster order inside the view) each view of an image kept."""
    kept = stats.kept_patches(sample)[offset:offset + len(layout)]
    views = 1 + (layout.crop_grid[0] * layout.crop_grid[1] if layout.crop_grid else 0)
    return {p: sorted((layout.vision_index[kept & (layout.partition == p)] % T).tolist()) for p in range(views)}


def _view_counts(stats, sample: int = 0, image: int = 0) -> list[int]:
    return stats.tokens_per_partition[sample][image][:, 0].tolist()


# ------------------------------------------------------------------------------------------------------------------
# budget arithmetic (pure functions)
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid,rate,budget,base,subs", [
    ((2, 2), 0.2, 576, 288, 288),
    ((1, 2), 0.2, 345, 172, 173),
    ((2, 1), 0.2, 345, 172, 173),
    ((2, 2), 0.4, 1152, 576, 576),
    ((1, 3), 0.2, 460, 230, 230),
    ((3, 1), 0.4, 921, 460, 461),
])
def test_rate_budgets_are_the_cards_numbers(grid, rate, budget, base, subs):
    views = 1 + grid[0] * grid[1]
    assert rate_budget(rate, views, 576) == budget
    assert base_and_subs(budget, 0.5, 576, (views - 1) * 576) == (base, subs)


def test_single_view_rate_budget_truncates_like_the_official_code():
    assert rate_budget(0.4, 1, 576) == 230 and rate_budget(0.2, 1, 576) == 115
    assert rate_budget(0.3, 1, 36) == 10  # int(10.8): not rounded to 11


def _paper_shares(subs: int, content: list[float], caps: list[int]) -> list[int]:
    exact = [Fraction(subs) * Fraction(s) / sum(map(Fraction, content)) for s in content]
    return [min(math.floor(e), cap) for e, cap in zip(exact, caps)]


@pytest.mark.parametrize("grid", [(1, 2), (2, 1), (2, 2), (1, 3), (3, 1)])
@pytest.mark.parametrize("keep", [64, 288, 576, 700, 1500])
def test_paper_budget_arithmetic_per_grid(grid, keep):
    k = grid[0] * grid[1]
    counts = [576] * (1 + k)
    content = torch.rand(k, generator=torch.Generator().manual_seed(keep + k)).tolist()
    budgets = view_budgets(keep, 0.5, counts, content)
    base = min(keep // 2, 576)
    subs = keep - base
    assert budgets[0] == base
    assert budgets[1:] == _paper_shares(subs, content, counts[1:])
    assert subs - (k - 1) <= sum(budgets[1:]) <= subs  # floored, not redistributed


def test_alpha_edges():
    counts = [576] * 5
    content = [1.0, 2.0, 3.0, 4.0]
    assert view_budgets(400, 0.0, counts, content) == [0, 40, 80, 120, 160]  # alpha=0: the base gets nothing
    assert view_budgets(400, 1.0, counts, content) == [400, 0, 0, 0, 0]  # alpha=1, N <= 576: subs get nothing
    assert view_budgets(1000, 1.0, counts, content) == [576, 42, 84, 127, 169]  # the base is capped, the rest moves
    assert view_budgets(2880, 0.5, counts, content) == counts  # the budget covers everything: all kept


def test_caps_and_redistribution():
    counts = [36, 10, 30, 30]
    content = [6.0, 1.0, 1.0]  # sub 1 would take 60% but holds only 10 tokens
    assert view_budgets(80, 0.25, counts, content) == [20, 10, 7, 7]  # 60 to the subs: 45 -> 10, the rest unused
    exact = view_budgets(80, 0.25, counts, content, redistribute=True)
    assert exact == [20, 10, 25, 25] and sum(exact) == 80
    assert split_by_content(10, [1.0, 1.0, 1.0], [9, 9, 9]) == [3, 3, 3]
    assert split_by_content(10, [1.0, 1.0, 1.0], [9, 9, 9], redistribute=True) == [4, 3, 3]
    assert split_by_content(10, [0.0, 0.0], [9, 9]) == [5, 5]  # no content anywhere: an even split, no NaN
    with pytest.raises(ValueError):
        split_by_content(10, [float("nan"), 1.0], [9, 9])


# ------------------------------------------------------------------------------------------------------------------
# region maps and content scores (pure functions)
# ------------------------------------------------------------------------------------------------------------------
def _cells(height: int, width: int):
    row, col = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return row.flatten(), col.flatten()


def test_region_maps_by_hand():
    row, col = _cells(6, 6)
    paper = region_index(row, col, 6, 6, (2, 2)).view(6, 6)
    assert paper.tolist() == [[0, 0, 0, 1, 1, 1]] * 3 + [[2, 2, 2, 3, 3, 3]] * 3
    bands = region_index(row, col, 6, 6, (2, 2), "reference_bands").flatten()
    assert bands.tolist() == [0] * 9 + [1] * 9 + [2] * 9 + [3] * 9  # raster chunks: horizontal bands
    assert region_index(row, col, 6, 6, (1, 2)).view(6, 6).tolist() == [[0, 0, 0, 1, 1, 1]] * 6
    assert region_index(row, col, 6, 6, (1, 2), "reference_bands").view(6, 6).tolist() == [[0] * 6] * 3 + [[1] * 6] * 3
    for mapping in ("paper_2d", "reference_bands"):  # a vertical stack: both maps agree
        assert region_index(row, col, 6, 6, (3, 1), mapping).view(6, 6).tolist() == [[0] * 6] * 2 + [[1] * 6] * 2 + [
            [2] * 6] * 2
    # a side the grid does not divide: cells [floor(r*H/R), floor((r+1)*H/R))
    row, col = _cells(5, 5)
    odd = region_index(row, col, 5, 5, (3, 2)).view(5, 5)
    assert odd[:, 0].tolist() == [0, 2, 2, 4, 4] and odd[0].tolist() == [0, 0, 1, 1, 1]


def test_all_mass_in_the_top_left_quarter_2d_map_vs_bands():
    row, col = _cells(24, 24)
    scores = torch.where((row < 12) & (col < 12), 1.0 / 144, 0.0)
    counts = [576] * 5
    budget, alpha = 576, 0.5
    paper = region_scores(scores, region_index(row, col, 24, 24, (2, 2)), 4)
    bands = region_scores(scores, region_index(row, col, 24, 24, (2, 2), "reference_bands"), 4)
    assert view_budgets(budget, alpha, counts, paper.tolist()) == [288, 288, 0, 0, 0]  # top-left gets all of N_sub
    assert view_budgets(budget, alpha, counts, bands.tolist()) == [288, 144, 144, 0, 0]  # rows 0-5 vs 6-11: the bug


@pytest.mark.parametrize("mapping", ["paper_2d", "reference_bands"])
@pytest.mark.parametrize("grid", [(1, 2), (2, 1), (2, 2), (1, 3), (3, 1)])
def test_uniform_scores_split_evenly(grid, mapping):
    row, col = _cells(24, 24)
    k = grid[0] * grid[1]
    scores = torch.full((576,), 1.0 / 577)
    content = region_scores(scores, region_index(row, col, 24, 24, grid, mapping), k)
    for subs in (173, 288, 345, 576):
        assert split_by_content(subs, content.tolist(), [576] * k) == [subs // k] * k


def test_topk_count_counts_members_of_the_top_set():
    row, col = _cells(6, 6)
    scores = torch.arange(36.0) / 100
    scores[(row < 3) & (col < 3)] += 10  # the top-left block first, then the highest indices
    region = region_index(row, col, 6, 6, (2, 2))
    counts = region_scores(scores, region, 4, "topk_count", top=18)  # alpha=0.5: the top 18 of 36
    assert counts.tolist() == [9.0, 0.0, 3.0, 6.0]  # 9 top-left, then indices 27..35: BL 30-32, BR 27-29, 33-35
    assert region_scores(scores, region, 4, "topk_count", top=0).tolist() == [0.0] * 4  # alpha=1
    tied = region_scores(torch.zeros(36), region, 4, "topk_count", top=3)
    assert tied.tolist() == [3.0, 0.0, 0.0, 0.0]  # ties go to the lower index


# ------------------------------------------------------------------------------------------------------------------
# the method on LLaVA-NeXT: selection arithmetic with hand-made attention rows
# ------------------------------------------------------------------------------------------------------------------
def _hand_made(monkeypatch, content: torch.Tensor, feature: torch.Tensor) -> list[int]:
    """Replace the [CLS] rows: block 0 reads ``content`` [36], every other block ``feature`` [36], on every view;
    the [CLS] -> [CLS] entry is huge, so a method that forgot to drop it would shift every index."""
    calls: list[int] = []

    def fake(self, trace, block, query_rows):
        calls.append(block)
        row = torch.cat([torch.tensor([1e6]), (content if block == 0 else feature).float()])
        return row.expand(trace.hidden_states[block].shape[0], 4, len(query_rows), -1)

    monkeypatch.setattr(LlavaAdapter, "vision_attention", fake)
    return calls


def _top_left_block() -> torch.Tensor:
    row, col = _cells(6, 6)
    return ((row < 3) & (col < 3)).float()


@pytest.mark.parametrize("mapping,budgets", [
    ("paper_2d", [10, 10, 0, 0, 0]),  # all content in the top-left quarter -> the top-left crop gets all of N_sub
    ("reference_bands", [10, 6, 3, 0, 0]),  # raster chunks of 9: 6 of the 9 cells in chunk 0, 3 in chunk 1
])
def test_hand_made_scores_give_the_last_n_of_every_view(monkeypatch, mapping, budgets):
    model = NEXT.model()
    inputs = _inputs(NEXT, SQUARE)
    layout = _layout(model, inputs)
    calls = _hand_made(monkeypatch, _top_left_block(), torch.arange(36.0))
    stats, _ = _run(model, inputs, keep=20, allocation_map=mapping)
    assert sorted(set(calls)) == [0, FEATURE_BLOCK]
    assert _view_counts(stats) == budgets
    kept = _kept_by_view(stats, layout)
    assert kept == {p: list(range(36 - n, 36)) for p, n in enumerate(budgets)}
    _hand_made(monkeypatch, _top_left_block(), -torch.arange(36.0))
    stats, _ = _run(model, inputs, keep=20, allocation_map=mapping)
    assert _kept_by_view(stats, layout) == {p: list(range(n)) for p, n in enumerate(budgets)}


def test_hand_made_topk_count_content(monkeypatch):
    model = NEXT.model()
    inputs = _inputs(NEXT, SQUARE)
    row, col = _cells(6, 6)
    content = torch.arange(36.0) / 100 + 10 * ((row < 3) & (col < 3))
    _hand_made(monkeypatch, content, torch.arange(36.0))
    stats, _ = _run(model, inputs, keep=20, content_score="topk_count")
    assert _view_counts(stats) == [10, 5, 0, 1, 3]  # counts 9/0/3/6 of the top 18 (see the pure test above)
    stats, _ = _run(model, inputs, keep=40, alpha=0.25, content_score="topk_count")  # the top 27: rows 3-5 join
    assert _view_counts(stats) == [10, 10, 0, 10, 10]
    stats, _ = _run(model, inputs, keep=40, alpha=1.0, content_score="topk_count")  # no top set, N_sub = 4
    assert _view_counts(stats) == [36, 1, 1, 1, 1]  # the official code divides by zero here; an even split


@pytest.mark.parametrize("size,grid,paper,bands", [
    (STRIP, (1, 2), [10, 10, 0], [10, 5, 5]),  # left half of the image -> the left crop; bands cut rows instead
    (TALL, (2, 1), [10, 10, 0], [10, 10, 0]),  # top half -> the top crop, by both maps (bands are right here)
])
def test_non_square_grids(monkeypatch, size, grid, paper, bands):
    model = NEXT.model()
    inputs = _inputs(NEXT, size)
    layout = _layout(model, inputs)
    assert layout.crop_grid == grid
    row, col = _cells(6, 6)
    content = (col < 3).float() if grid == (1, 2) else (row < 3).float()
    _hand_made(monkeypatch, content, torch.arange(36.0))
    assert _view_counts(_run(model, inputs, keep=20)[0]) == paper
    assert _view_counts(_run(model, inputs, keep=20, allocation_map="reference_bands")[0]) == bands


def test_tokens_removed_by_unpadding_are_never_ranked(monkeypatch):
    """The official code ranks a crop before unpadding, so with f[j] = j the bottom crops of a wide image would keep
    patches 34, 35 (rows that unpadding removes) and end with nothing. Here they keep their best surviving ones."""
    model = NEXT.model()
    inputs = _inputs(NEXT, WIDE)
    layout = _layout(model, inputs)
    assert (layout.vision_index[layout.partition == 3] % T).max() == 17  # bottom crops: only rows 0-2 reach the LLM
    _hand_made(monkeypatch, torch.ones(36), torch.arange(36.0))
    stats, _ = _run(model, inputs, keep=20)
    assert _view_counts(stats) == [10, 2, 2, 2, 2]
    assert _kept_by_view(stats, layout) == {0: list(range(26, 36)), 1: [34, 35], 2: [34, 35], 3: [16, 17],
                                            4: [16, 17]}


# ------------------------------------------------------------------------------------------------------------------
# the method on LLaVA-NeXT against an independent eager oracle
# ------------------------------------------------------------------------------------------------------------------
def _eager_rows(inputs, views: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Head-summed fp32 [CLS] -> patch rows of blocks 0 and the feature block, [views, 36] each, from the eager
    tower's own attention maps."""
    eager = _sharpened(NEXT if "image_sizes" in inputs else LLAVA, "eager")
    pixels = inputs["pixel_values"][0, :views] if inputs["pixel_values"].dim() == 5 else inputs["pixel_values"]
    with torch.no_grad():
        maps = eager.model.vision_tower(pixels, output_attentions=True).attentions
    return maps[0][:, :, 0, 1:].float().sum(1), maps[FEATURE_BLOCK][:, :, 0, 1:].float().sum(1)


def _oracle(inputs, layout, budget: int, alpha: float = 0.5) -> tuple[list[int], dict[int, list[int]]]:
    """Per-view budgets (the paper's arithmetic in exact fractions, 2-D map by explicit loops) and kept patches."""
    rows, cols = layout.crop_grid
    k = rows * cols
    content_rows, feature_rows = _eager_rows(inputs, 1 + k)
    candidates = {p: (layout.vision_index[layout.partition == p] % T).tolist() for p in range(1 + k)}
    counts = [len(candidates[p]) for p in range(1 + k)]
    content = [Fraction(0)] * k
    for j in range(T):
        r = max(i for i in range(rows) if i * SIDE // rows <= j // SIDE)
        c = max(i for i in range(cols) if i * SIDE // cols <= j % SIDE)
        content[r * cols + c] += Fraction(float(content_rows[0, j]))
    if budget >= sum(counts):  # every token the image sends fits: kept whole
        return counts, {p: sorted(candidates[p]) for p in candidates}
    base = min(math.floor(Fraction(alpha) * budget), counts[0])
    subs = min(budget - base, sum(counts[1:]))
    exact = [subs * s / sum(content) for s in content]
    assert all(abs(e - round(e)) > 1e-4 for e in exact if e), "an exact share lies on an integer: pick other inputs"
    budgets = [base] + [min(math.floor(e), n) for e, n in zip(exact, counts[1:])]
    kept = {}
    for p in range(1 + k):
        ranked = sorted(candidates[p], key=lambda j: -float(feature_rows[p, j]))
        kept[p] = sorted(ranked[:budgets[p]])
    return budgets, kept


@pytest.mark.parametrize("size", [SQUARE, WIDE, STRIP, TALL])
@pytest.mark.parametrize("params", [{"keep": 40}, {"keep": 100}, {"ratio": 0.4}])
def test_kept_set_is_the_independent_top_k(size, params):
    model = _sharpened(NEXT)
    inputs = _inputs(NEXT, size)
    layout = _layout(model, inputs)
    views = 1 + layout.crop_grid[0] * layout.crop_grid[1]
    budget = params.get("keep") or int(views * T * params["ratio"])
    budgets, kept = _oracle(inputs, layout, budget)
    stats, _ = _run(model, inputs, **params)
    assert _view_counts(stats) == budgets  # the per-view counts the stats report
    assert _kept_by_view(stats, layout) == kept
    assert int(stats.separator_tokens[0, 0]) == len(layout.separators)  # default: the model's packing


def test_one_crop_changed_changes_only_that_crop():
    model = _sharpened(NEXT)
    inputs = _inputs(NEXT, SQUARE)
    layout = _layout(model, inputs)
    before, _ = _run(model, inputs, keep=100)
    changed = dict(inputs)
    changed["pixel_values"] = inputs["pixel_values"].clone()
    changed["pixel_values"][0, 2] = torch.randn(3, 84, 84, generator=torch.Generator().manual_seed(9))
    after, _ = _run(model, changed, keep=100)
    assert _view_counts(after) == _view_counts(before)  # content is read on the base view only
    old, new = _kept_by_view(before, layout), _kept_by_view(after, layout)
    assert new[2] != old[2]
    assert {p: new[p] for p in (0, 1, 3, 4)} == {p: old[p] for p in (0, 1, 3, 4)}


def test_base_view_changed_moves_budgets_not_crop_rankings():
    model = _sharpened(NEXT)
    inputs = _inputs(NEXT, SQUARE)
    layout = _layout(model, inputs)
    before, _ = _run(model, inputs, keep=60)
    changed = dict(inputs)
    changed["pixel_values"] = inputs["pixel_values"].clone()
    changed["pixel_values"][0, 0] = torch.randn(3, 84, 84, generator=torch.Generator().manual_seed(11))
    after, _ = _run(model, changed, keep=60)
    assert _view_counts(after) == _oracle(changed, layout, 60)[0]
    assert _view_counts(after)[1:] != _view_counts(before)[1:]
    old, new = _kept_by_view(before, layout), _kept_by_view(after, layout)
    assert new[0] != old[0]
    for p in range(1, 5):  # same ranking inside each crop: only how many it keeps moved
        small, large = sorted((set(old[p]), set(new[p])), key=len)
        assert small <= large


@pytest.mark.parametrize("family", [NEXT, LLAVA], ids=lambda f: f.name)
def test_batch_invariance_and_permutation(family):
    """Each image is ranked on its own: alone == inside a batch (left-padded, with images of the same size whose
    content differs, which would expose the official LLaVA-1.5 path's use of sample 0's attention for all)."""
    model = _sharpened(family)
    prompts = [["a", picture(*SQUARE, 1), "?"], ["user:", picture(*WIDE, 2), "and", picture(*TALL, 3), "?"],
               ["describe", picture(*STRIP, 4), "the", "image"], ["a", picture(*SQUARE, 6), "?"]]
    keep = 30 if family is NEXT else 9
    alone = []
    for prompt in prompts:
        stats, logits = _run(model, family.inputs([prompt]), keep=keep)
        alone.append((stats.kept_patches(0), logits[0, -1], stats.tokens_per_partition[0]))
    assert not torch.equal(alone[0][0], alone[3][0])
    for order in ([0, 1, 2, 3], [3, 0, 2, 1], [3, 0, 2, 1]):  # the repeat: two runs give the same selection
        stats, logits = _run(model, family.inputs([prompts[i] for i in order]), keep=keep)
        for row, i in enumerate(order):
            assert torch.equal(stats.kept_patches(row), alone[i][0])
            torch.testing.assert_close(logits[row, -1], alone[i][1], atol=1e-4, rtol=1e-4)
            assert all(torch.equal(a[:, 0], b[:, 0]) for a, b in zip(stats.tokens_per_partition[row], alone[i][2]))


# ------------------------------------------------------------------------------------------------------------------
# a budget covering every token bypasses HiRED
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("separators", ["keep", "drop"])
def test_full_budget_is_the_unpruned_model(separators):
    model = NEXT.model()
    inputs = NEXT.inputs([["a", picture(*WIDE, 1), "?"], ["b", picture(*SQUARE, 2), "and", picture(*TALL, 3), "?"]])
    with torch.no_grad():
        reference = model(**inputs).logits
        reference_tokens = greedy(model, inputs)[0]
    content = len(_layout(model, inputs, 0).content)
    for params in ({"ratio": 1.0}, {"keep": 10**6}):
        with torch.no_grad(), vtprune.apply(model, "hired", separators=separators, **params) as pruner:
            logits = model(**inputs).logits
            tokens = greedy(model, inputs)[0]
        valid = inputs["attention_mask"].bool()
        torch.testing.assert_close(logits[valid], reference[valid], atol=1e-5, rtol=1e-5)
        assert torch.equal(tokens, reference_tokens)
        assert torch.equal(pruner.stats.visual_tokens[:, 0], pruner.stats.original_visual_tokens)
    single = NEXT.inputs([["a", picture(*WIDE, 1), "?"]])
    layout = _layout(model, single)
    exact, _ = _run(model, single, keep=content, separators=separators)  # exactly every token: still whole
    assert int(exact.visual_tokens[0, 0]) == len(layout)
    short, _ = _run(model, single, keep=content - 1, separators=separators)
    assert int(short.visual_tokens[0, 0]) - int(short.separator_tokens[0, 0]) <= content - 1
    assert int(short.separator_tokens[0, 0]) == (len(layout.separators) if separators == "keep" else 0)


def test_reference_packing_drops_newlines_only():
    model = _sharpened(NEXT)
    inputs = _inputs(NEXT, SQUARE)
    layout = _layout(model, inputs)
    kept, _ = _run(model, inputs, keep=40)
    dropped, _ = _run(model, inputs, keep=40, separators="drop")
    separator = layout.kind == TokenKind.SEPARATOR
    assert bool(kept.kept_patches(0)[separator].all()) and not bool(dropped.kept_patches(0)[separator].any())
    assert torch.equal(kept.kept_patches(0) & ~separator, dropped.kept_patches(0))


# ------------------------------------------------------------------------------------------------------------------
# LLaVA-1.5: the single-partition variant
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params,count", [({"keep": 9}, 9), ({"keep": 18}, 18), ({"keep": 27}, 27),
                                          ({"ratio": 0.3}, 10), ({"keep": 36}, 36)])
def test_llava15_keeps_exactly_n_of_the_independent_top_k(params, count):
    model = _sharpened(LLAVA)
    inputs = _inputs(LLAVA, SQUARE)
    _, feature_rows = _eager_rows(inputs, 1)
    stats, _ = _run(model, inputs, **params)
    order = stats.sources[0].strongest()  # LLM order of the visual tokens
    assert order.tolist() == sorted(feature_rows[0].argsort(descending=True)[:count].tolist())
    assert bool((order[1:] > order[:-1]).all()) and int(order.max()) < T
    text = int((inputs["input_ids"] != IMAGE).sum())
    assert int(stats.visual_tokens[0, 0]) == count and stats.output_positions.shape[1] == text + count


def test_llava15_never_keeps_cls(monkeypatch):
    model = LLAVA.model()
    inputs = _inputs(LLAVA, SQUARE)
    _hand_made(monkeypatch, torch.zeros(36), torch.arange(36.0))
    stats, _ = _run(model, inputs, keep=9)
    assert stats.kept_patches(0).nonzero().flatten().tolist() == list(range(27, 36))


# ------------------------------------------------------------------------------------------------------------------
# parameters, support, registry
# ------------------------------------------------------------------------------------------------------------------
def _hooks(model) -> list:
    return [(name, list(m._forward_pre_hooks.values()), list(m._forward_hooks.values()))
            for name, m in model.named_modules()]


@pytest.mark.parametrize("family,params,error,message", [
    (NEXT, {"alpha": 1.5}, ValueError, "hired: alpha=1.5 must be <= 1"),
    (NEXT, {"alpha": -0.1}, ValueError, "alpha=-0.1 must be >= 0"),
    (NEXT, {"l_init": -1}, ValueError, "l_init=-1 must be >= 0"),
    (NEXT, {"l_init": 4}, ValueError, "l_init=4 is out of range; this vision tower has 4 blocks (use 0..3)"),
    (NEXT, {"l_final": 7}, ValueError, "l_final=7 is out of range"),
    (NEXT, {"l_final": 2.0}, ValueError, "l_final=2.0 must be an integer"),
    (NEXT, {"allocation_map": "bands"}, ValueError, "allocation_map='bands' must be one of ('paper_2d', "
                                                    "'reference_bands')"),
    (NEXT, {"content_score": "count"}, ValueError, "content_score='count' must be one of"),
    (NEXT, {"redistribute": "yes"}, ValueError, "redistribute='yes' must be True or False"),
    (NEXT, {"keep": 10, "ratio": 0.2}, ValueError, "either keep= or ratio="),
    (NEXT, {"separators": "newlines"}, ValueError, "separators='newlines' must be one of"),
    (LLAVA, {"keep": 37}, ValueError, "keep=37 is larger than the 36 visual tokens per image"),
    (QWEN, {}, TypeError, "hired runs on: llava, llava_next"),
])
def test_bad_parameters_are_refused_and_leave_the_model_untouched(family, params, error, message):
    model = family.model(seed=4)
    inputs = _inputs(family, SQUARE)
    with torch.no_grad():
        reference = model(**inputs).logits
    hooks = _hooks(model)
    with pytest.raises(error) as info:
        vtprune.apply(model, "hired", **params)
    assert message in str(info.value)
    assert _hooks(model) == hooks and "get_image_features" not in model.model.__dict__
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)


def test_registry_and_resolved_settings():
    listing = {m["name"]: m for m in vtprune.methods()}["hired"]
    assert listing["stages"] == ("pre_llm",) and listing["families"] == ["llava", "llava_next"]
    assert listing["params"]["alpha"]["default"] == 0.5 and listing["params"]["l_init"]["default"] == 0
    assert listing["params"]["allocation_map"]["default"] == "paper_2d"
    assert listing["params"]["content_score"]["default"] == "attention_sum"
    assert listing["default_ratio"] == 0.2 and listing["default_separators"] == "keep"
    method = vtprune.get_method("hired")
    adapter = adapter_for(LLAVA.model())
    assert method(ratio=0.3).resolved(adapter) == {"l_init": 0, "l_final": FEATURE_BLOCK, "keep_per_image": 10}
    assert method(l_final=1).resolved(adapter_for(NEXT.model())) == {"l_init": 0, "l_final": 1}
    assert method().resolved(adapter_for(QWEN.model())) == {}


# ------------------------------------------------------------------------------------------------------------------
# separators='drop' for any method
# ------------------------------------------------------------------------------------------------------------------
def test_separators_drop_at_the_pre_llm_stage():
    model = NEXT.model()
    inputs = _inputs(NEXT, SQUARE)
    layout = _layout(model, inputs)
    separator = layout.kind == TokenKind.SEPARATOR
    with torch.no_grad(), vtprune.apply(model, "uniform", keep=10, separators="drop") as pruner:
        model(**inputs)
    kept = pruner.stats.kept_patches(0)
    assert int(kept.sum()) == 10 and not bool(kept[separator].any())
    with torch.no_grad(), vtprune.apply(model, "uniform", ratio=1.0, separators="drop") as pruner:
        model(**inputs)  # nothing dropped: the image keeps its newlines
    assert int(pruner.stats.separator_tokens[0, 0]) == len(layout.separators)


def test_separators_drop_inside_the_llm():
    model = NEXT.model()
    inputs = NEXT.inputs([["a", picture(*SQUARE, 1), "?"], ["b", picture(*WIDE, 2), "and", picture(*TALL, 3), "?"]])
    with torch.no_grad():
        reference = model(**inputs).logits
        with vtprune.apply(model, "fastv", keep=10, layer=2, separators="drop") as pruner:
            model(**inputs)
        counts = pruner.stats.separator_tokens
        assert bool((counts[:, :2] > 0).all()) and bool((counts[:, 2:] == 0).all())  # layers < K see everything
        assert int(pruner.stats.tokens_per_image[1][1, -1]) == 10  # the second image of row 1: its 10, no newline
        with vtprune.apply(model, "fastv", ratio=1.0, layer=2, separators="drop") as pruner:
            logits = model(**inputs).logits
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[valid], reference[valid], atol=1e-5, rtol=1e-5)
    assert torch.equal(pruner.stats.visual_tokens[:, -1], pruner.stats.original_visual_tokens)
