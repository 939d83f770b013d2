"""Tests of the pure tensor ops in ``vtprune.ops`` (and ToMe's ``merge_schedule``) against the method cards' oracles.

Expected values are computed independently of the code under test (integer keys, explicit loops, brute force).
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from vtprune.methods.tome import merge_schedule
from vtprune.ops import (
    attention_probs,
    bipartite_soft_matching,
    max_min_diversity,
    merge_sum,
    merge_weighted_mean,
    pool_grid,
    pool_grid_shape,
    random_indices,
    topk_indices,
    uniform_grid_indices,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------------------------
# topk_indices
# --------------------------------------------------------------------------------------------------------------------


def _expected_topk(scores: list, k: int) -> list[int]:
    """Python reference: the k largest, ties to the lower index, returned ascending."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return sorted(order[:k])


@pytest.mark.parametrize("k", [1, 7, 64, 100, 288, 575])
def test_topk_hand_made_map(k):
    # FasterVLM oracle: a_j = j mod 7 + j/1000; ranking key computed exactly with integers.
    n = 576
    scores = torch.tensor([j % 7 + j / 1000 for j in range(n)], dtype=torch.float32)
    expected = sorted(sorted(range(n), key=lambda j: -((j % 7) * 1000 + j))[:k])
    got = topk_indices(scores, k)
    assert got.dtype == torch.long
    assert got.tolist() == expected


def test_topk_output_ascending():
    scores = torch.rand(300, generator=_gen(0))
    got = topk_indices(scores, 50)
    assert bool((got[1:] > got[:-1]).all())
    # and it is really the top-50 set
    assert set(got.tolist()) == set(torch.topk(scores, 50).indices.tolist())


def test_topk_ties_go_to_lower_index():
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 0.0, 3.0])
    assert topk_indices(scores, 1).tolist() == [1]
    assert topk_indices(scores, 2).tolist() == [1, 2]
    assert topk_indices(scores, 3).tolist() == [1, 2, 4]
    assert topk_indices(scores, 5).tolist() == [1, 2, 3, 4, 6]
    assert topk_indices(scores, 0).tolist() == []


def test_topk_monotone_subsets_with_ties():
    # Integer scores in a tiny range: lots of ties.
    values = torch.randint(0, 4, (60,), generator=_gen(1))
    scores = values.float()
    previous: set[int] = set()
    for k in range(0, 61):
        kept = topk_indices(scores, k).tolist()
        assert kept == _expected_topk(values.tolist(), k)
        assert previous <= set(kept)
        assert len(set(kept)) == k
        previous = set(kept)


def test_topk_half_precision_input():
    values = torch.randint(0, 5, (40,), generator=_gen(2))
    for dtype in (torch.float16, torch.bfloat16):
        assert topk_indices(values.to(dtype), 13).tolist() == _expected_topk(values.tolist(), 13)


def test_topk_batch_dimension():
    values = torch.randint(0, 6, (2, 3, 50), generator=_gen(3))
    got = topk_indices(values.float(), 11)
    assert got.shape == (2, 3, 11)
    for b in range(2):
        for h in range(3):
            assert got[b, h].tolist() == _expected_topk(values[b, h].tolist(), 11)


def test_topk_errors():
    scores = torch.rand(10)
    with pytest.raises(ValueError):
        topk_indices(scores, 11)
    with pytest.raises(ValueError):
        topk_indices(scores, -1)
    assert topk_indices(scores, 10).tolist() == list(range(10))


# --------------------------------------------------------------------------------------------------------------------
# random_indices
# --------------------------------------------------------------------------------------------------------------------


def test_random_indices_distinct_sorted_in_range():
    got = random_indices(6, 50, 17, generator=_gen(0))
    assert got.shape == (6, 17)
    assert got.dtype == torch.long
    assert bool((got[:, 1:] > got[:, :-1]).all())  # strictly increasing: sorted and distinct
    assert int(got.min()) >= 0 and int(got.max()) < 50
    # rows are independent draws
    assert len({tuple(row) for row in got.tolist()}) > 1


def test_random_indices_full_and_empty():
    assert torch.equal(random_indices(3, 9, 9, generator=_gen(0)), torch.arange(9).expand(3, 9))
    assert random_indices(2, 9, 0, generator=_gen(0)).shape == (2, 0)


def test_random_indices_reproducible_and_seed_dependent():
    a = random_indices(4, 100, 20, generator=_gen(123))
    b = random_indices(4, 100, 20, generator=_gen(123))
    c = random_indices(4, 100, 20, generator=_gen(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_random_indices_roughly_uniform():
    draws = random_indices(3000, 10, 3, generator=_gen(7))
    counts = torch.bincount(draws.flatten(), minlength=10).float()
    # each index kept with probability 3/10 -> mean 900, std ~25
    assert bool(((counts - 900).abs() < 150).all()), counts


# --------------------------------------------------------------------------------------------------------------------
# uniform_grid_indices
# --------------------------------------------------------------------------------------------------------------------


def _lattice(start: int, stride: int, side: int = 24) -> list[int]:
    return sorted(r * side + c for r in range(start, side, stride) for c in range(start, side, stride))


@pytest.mark.parametrize("k", [1, 36, 64, 128, 144, 192, 576])
def test_uniform_grid_exact_count_unique(k):
    got = uniform_grid_indices(24, 24, k)
    assert got.numel() == k
    assert got.unique().numel() == k
    assert bool((got[1:] > got[:-1]).all())
    assert int(got.min()) >= 0 and int(got.max()) < 576


def test_uniform_grid_stride_lattices():
    assert uniform_grid_indices(24, 24, 64).tolist() == _lattice(1, 3)  # stride 3 from (1, 1)
    assert uniform_grid_indices(24, 24, 144).tolist() == _lattice(1, 2)  # stride 2
    assert uniform_grid_indices(24, 24, 36).tolist() == _lattice(2, 4)  # stride 4, centred cells
    assert uniform_grid_indices(24, 24, 576).tolist() == list(range(576))
    (single,) = uniform_grid_indices(24, 24, 1).tolist()
    assert divmod(single, 24)[0] in (11, 12) and divmod(single, 24)[1] in (11, 12)  # the centre


@pytest.mark.parametrize("k", [36, 64, 128, 144, 192])
def test_uniform_grid_covers_every_6x6_block(k):
    kept = set(uniform_grid_indices(24, 24, k).tolist())
    for br in range(0, 24, 6):
        for bc in range(0, 24, 6):
            block = {r * 24 + c for r in range(br, br + 6) for c in range(bc, bc + 6)}
            assert kept & block, (k, br, bc)


def test_uniform_grid_all_k_on_odd_grids():
    for height, width in [(3, 5), (7, 4), (1, 9), (5, 5)]:
        for k in range(1, height * width + 1):
            got = uniform_grid_indices(height, width, k)
            assert got.numel() == k and got.unique().numel() == k, (height, width, k)
            assert int(got.max()) < height * width


def test_uniform_grid_errors():
    with pytest.raises(ValueError):
        uniform_grid_indices(24, 24, 0)
    with pytest.raises(ValueError):
        uniform_grid_indices(24, 24, 577)


# --------------------------------------------------------------------------------------------------------------------
# pool_grid_shape / pool_grid
# --------------------------------------------------------------------------------------------------------------------


def test_pool_grid_shape():
    assert pool_grid_shape(24, 24, 144) == (12, 12)
    assert pool_grid_shape(24, 24, 64) == (8, 8)
    assert pool_grid_shape(24, 24, 576) == (24, 24)
    h, w = pool_grid_shape(24, 24, 128)
    assert h * w == 128 and {h, w} == {8, 16}
    assert pool_grid_shape(12, 24, 72) == (6, 12)  # keeps the 1:2 aspect ratio
    with pytest.raises(ValueError):
        pool_grid_shape(24, 24, 29)  # prime > 24: no h*w with both sides <= 24
    with pytest.raises(ValueError):
        pool_grid_shape(24, 24, 0)


def test_pool_grid_2x2_means():
    x = torch.randn(2, 576, 5, generator=_gen(0))
    pooled, weights = pool_grid(x, (24, 24), (12, 12))
    assert pooled.shape == (2, 144, 5)
    assert weights.shape == (144, 576)
    torch.testing.assert_close(pooled[:, 0], x[:, [0, 1, 24, 25]].mean(dim=1))
    # every output token: mean of its 2x2 block (independent reshape)
    blocks = x.view(2, 12, 2, 12, 2, 5).mean(dim=(2, 4)).reshape(2, 144, 5)
    torch.testing.assert_close(pooled, blocks)
    # weights: each patch in exactly one output token with weight 1/4
    assert torch.equal((weights > 0).sum(0), torch.ones(576, dtype=torch.long))
    torch.testing.assert_close(weights.sum(1), torch.ones(144))
    torch.testing.assert_close(weights.max(1).values, torch.full((144,), 0.25))


def test_pool_grid_3x3_means():
    x = torch.randn(1, 576, 3, generator=_gen(1))
    pooled, weights = pool_grid(x, (24, 24), (8, 8))
    blocks = x.view(1, 8, 3, 8, 3, 3).mean(dim=(2, 4)).reshape(1, 64, 3)
    torch.testing.assert_close(pooled, blocks)
    torch.testing.assert_close(weights.sum(1), torch.ones(64))


@pytest.mark.parametrize("out_grid", [(12, 12), (8, 8), (8, 16), (7, 5), (5, 11)])
def test_pool_grid_weights_rows_sum_to_one(out_grid):
    x = torch.randn(1, 576, 4, generator=_gen(2))
    pooled, weights = pool_grid(x, (24, 24), out_grid)
    assert weights.shape == (out_grid[0] * out_grid[1], 576)
    assert bool((weights >= 0).all())
    torch.testing.assert_close(weights.sum(1), torch.ones(weights.shape[0]))
    # every input patch contributes to some output token
    assert bool((weights.sum(0) > 0).all())
    torch.testing.assert_close(pooled[0], weights @ x[0])


def test_pool_grid_full_size_is_identity():
    x = torch.randn(2, 576, 7, generator=_gen(3))
    pooled, weights = pool_grid(x, (24, 24), (24, 24))
    assert torch.equal(pooled, x)
    assert torch.equal(weights, torch.eye(576))


# --------------------------------------------------------------------------------------------------------------------
# max_min_diversity (DivPrune)
# --------------------------------------------------------------------------------------------------------------------


def _min_pairwise_cos_distance(features: torch.Tensor, idx) -> float:
    unit = torch.nn.functional.normalize(features[list(idx)].double(), dim=-1)
    d = 1.0 - unit @ unit.T
    d.fill_diagonal_(float("inf"))
    return float(d.min())


def _naive_greedy(features: torch.Tensor, k: int) -> list[int]:
    """Reference: recompute every distance from scratch at each step (double precision, python loops)."""
    unit = torch.nn.functional.normalize(features.double(), dim=-1)
    n = unit.shape[0]
    dist = [[1.0 - float(unit[i] @ unit[j]) for j in range(n)] for i in range(n)]
    nearest = [min(dist[i][j] for j in range(n) if j != i) for i in range(n)]
    picks = [max(range(n), key=lambda j: (nearest[j], -j))]
    while len(picks) < k:
        rest = [j for j in range(n) if j not in picks]
        picks.append(max(rest, key=lambda j: (min(dist[i][j] for i in picks), -j)))
    return sorted(picks)


def test_diversity_square_from_octagon():
    angles = torch.arange(8) * (math.pi / 4) + 0.1
    vectors = torch.stack([angles.cos(), angles.sin()], dim=-1)
    got = max_min_diversity(vectors, 4).tolist()
    assert got in ([0, 2, 4, 6], [1, 3, 5, 7])
    # cosine, not Euclidean: rescaling the rows must not change the answer's shape
    scaled = vectors * torch.tensor([1.0, 5.0, 0.2, 3.0, 0.7, 9.0, 2.0, 0.1])[:, None]
    assert max_min_diversity(scaled, 4).tolist() in ([0, 2, 4, 6], [1, 3, 5, 7])


def test_diversity_duplicates_one_copy_each():
    distinct = torch.randn(5, 16, generator=_gen(0))
    group = torch.tensor([3, 0, 4, 1, 3, 2, 0, 1, 4, 2])  # each of the 5 vectors twice, shuffled
    features = distinct[group]
    got = max_min_diversity(features, 5).tolist()
    assert len(got) == 5
    assert sorted(group[got].tolist()) == [0, 1, 2, 3, 4]


def test_diversity_exact_duplicate_is_never_preferred():
    # 7 distinct directions + one exact copy of token 0: any k <= 7 must never take both copies
    features = torch.randn(7, 8, generator=_gen(1))
    features = torch.cat([features, features[:1]])
    for k in range(1, 8):
        got = set(max_min_diversity(features, k).tolist())
        assert not {0, 7} <= got, (k, got)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_diversity_beats_random_subsets(seed):
    gen = _gen(seed)
    features = torch.randn(64, 32, generator=gen)
    got = max_min_diversity(features, 8)
    ours = _min_pairwise_cos_distance(features, got.tolist())
    random_scores = torch.tensor(
        [_min_pairwise_cos_distance(features, torch.randperm(64, generator=gen)[:8].tolist()) for _ in range(100)]
    )
    assert ours > float(torch.quantile(random_scores, 0.9))


@pytest.mark.parametrize("seed", range(10))
def test_diversity_half_approximation_on_circle(seed):
    gen = _gen(100 + seed)
    angles = (torch.rand(12, generator=gen, dtype=torch.float64) * 2 * math.pi).tolist()
    features = torch.tensor([[math.cos(a), math.sin(a)] for a in angles])

    def angle_gap(i, j):
        d = abs(angles[i] - angles[j]) % (2 * math.pi)
        return min(d, 2 * math.pi - d)

    def objective(subset):
        return min(angle_gap(i, j) for i, j in itertools.combinations(subset, 2))

    opt = max(objective(s) for s in itertools.combinations(range(12), 4))
    got = max_min_diversity(features, 4).tolist()
    assert objective(got) >= opt / 2 - 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_diversity_matches_naive_greedy(seed):
    features = torch.randn(30, 6, generator=_gen(seed))
    for k in (1, 2, 5, 12, 30):
        assert max_min_diversity(features, k).tolist() == _naive_greedy(features, k)


def test_diversity_sorted_unique_deterministic():
    features = torch.randn(100, 16, generator=_gen(9))
    a = max_min_diversity(features, 20)
    b = max_min_diversity(features.clone(), 20)
    assert torch.equal(a, b)
    assert a.dtype == torch.long and a.numel() == 20
    assert bool((a[1:] > a[:-1]).all())
    assert torch.equal(max_min_diversity(features, 100), torch.arange(100))
    # half-precision input gives a valid selection as well (distances are computed in fp32)
    h = max_min_diversity(features.half(), 20)
    assert h.numel() == 20 and bool((h[1:] > h[:-1]).all())


def test_diversity_errors():
    features = torch.randn(5, 3)
    with pytest.raises(ValueError):
        max_min_diversity(features, 0)
    with pytest.raises(ValueError):
        max_min_diversity(features, 6)


def test_diversity_zero_rows_no_nan():
    # A zero row must behave like a vector orthogonal to everything (cosine distance exactly 1), not like NaN.
    features = torch.randn(20, 8, generator=_gen(5))
    features[[4, 11]] = 0.0
    padded = torch.cat([features, torch.zeros(20, 2)], dim=1)
    padded[4, 8] = 1.0
    padded[11, 9] = 1.0
    for k in (1, 3, 6, 10, 20):
        got = max_min_diversity(features, k)
        assert got.numel() == k and bool((got[1:] > got[:-1]).all())
        assert torch.equal(got, max_min_diversity(padded, k)), k
    # all-zero input: still a valid, deterministic selection
    zeros = max_min_diversity(torch.zeros(6, 4), 3)
    assert zeros.tolist() == [0, 1, 2]


# --------------------------------------------------------------------------------------------------------------------
# bipartite_soft_matching / merge_sum / merge_weighted_mean (ToMe)
# --------------------------------------------------------------------------------------------------------------------


def _designed_keys(n: int, r: int, dim: int = 40, noise: float = 1e-3, seed: int = 0) -> torch.Tensor:
    """Keys [1, n, dim]: A_i == B_i for i = 0..r (A_0 = CLS); every other token its own orthonormal direction."""
    gen = _gen(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))
    keys = torch.empty(n, dim)
    direction = 0
    for i in range(0, n, 2):  # A_i at position i, B_i at position i + 1
        a = i // 2
        keys[i] = basis[direction]
        if a <= r and i + 1 < n:
            keys[i + 1] = basis[direction]  # same direction: cosine 1
            direction += 1
        else:
            direction += 1
            if i + 1 < n:
                keys[i + 1] = basis[direction]
                direction += 1
    keys = keys + noise * torch.randn(n, dim, generator=gen)
    for a in range(0, r + 1):  # restore the exact matches (cos 1) after the noise
        if 2 * a + 1 < n:
            keys[2 * a + 1] = keys[2 * a]
    return keys[None]


@pytest.mark.parametrize("n,r", [(17, 3), (17, 7), (16, 5), (25, 1)])
def test_merge_designed_matches(n, r):
    keys = _designed_keys(n, r)
    x = torch.randn(1, n, 6, generator=_gen(1), dtype=torch.float64)
    size = torch.ones(1, n, 1, dtype=torch.float64)
    plan = bipartite_soft_matching(keys, r, protect_first=True)
    assert sorted(plan.src_idx[0].tolist()) == list(range(1, r + 1))  # A_0 (CLS) matches B_0 too but is protected
    assert dict(zip(plan.src_idx[0].tolist(), plan.dst_idx[0].tolist())) == {i: i for i in range(1, r + 1)}
    n_a, n_b = (n + 1) // 2, n // 2
    assert plan.unmerged_idx[0].tolist() == [0] + list(range(r + 1, n_a))

    merged, new_size = merge_weighted_mean(plan, x, size)
    assert merged.shape == (1, n - r, 6)
    expected = [x[0, 2 * a] for a in [0] + list(range(r + 1, n_a))]  # unmerged A tokens, ascending
    expected_size = [1.0] * len(expected)
    for b in range(n_b):
        if 1 <= b <= r:
            expected.append((x[0, 2 * b] + x[0, 2 * b + 1]) / 2)
            expected_size.append(2.0)
        else:
            expected.append(x[0, 2 * b + 1])
            expected_size.append(1.0)
    torch.testing.assert_close(merged[0], torch.stack(expected))
    assert new_size[0, :, 0].tolist() == expected_size
    assert torch.equal(merged[0, 0], x[0, 0])  # CLS untouched, first


def test_merge_without_protection_takes_cls():
    keys = _designed_keys(17, 3)
    plan = bipartite_soft_matching(keys, 4, protect_first=False)
    assert sorted(plan.src_idx[0].tolist()) == [0, 1, 2, 3]
    plan = bipartite_soft_matching(keys, 4, protect_first=True)
    assert 0 not in plan.src_idx[0].tolist()


def test_merge_sum_adds_into_destinations():
    # explicit plan on 7 tokens: A = 0,2,4,6 ; B = 1,3,5
    keys = _designed_keys(7, 2)
    plan = bipartite_soft_matching(keys, 2)
    x = torch.arange(7, dtype=torch.float32)[None, :, None] * torch.tensor([1.0, 10.0])
    out = merge_sum(plan, x)
    # unmerged A: positions 0 and 6; B: 1, 3 + 2, 5 + 4
    expected = torch.tensor([0.0, 6.0, 1.0, 5.0, 9.0])[:, None] * torch.tensor([1.0, 10.0])
    assert torch.equal(out[0], expected)


def _run_rounds(schedule, n=577, dim=24, batch=2, seed=0):
    gen = _gen(seed)
    x0 = torch.randn(batch, n, dim, generator=gen, dtype=torch.float64)
    # keys correlated with features so that merges are not arbitrary
    projection = torch.randn(dim, 16, generator=gen, dtype=torch.float64)
    x, size = x0.clone(), torch.ones(batch, n, 1, dtype=torch.float64)
    source = torch.eye(n, dtype=torch.float64).expand(batch, n, n).clone()
    history = []
    for r in schedule:
        plan = bipartite_soft_matching(x @ projection, r, protect_first=True)
        x, size = merge_weighted_mean(plan, x, size)
        source = merge_sum(plan, source)
        history.append((x, size, source))
    return x0, history


def test_merge_rounds_counts_sizes_and_weighted_mean():
    schedule = merge_schedule(577, 23, 576 - 64)
    x0, history = _run_rounds(schedule)
    n = 577
    mean0 = x0.mean(dim=1)
    for r, (x, size, source) in zip(schedule, history):
        n -= r
        assert x.shape[1] == n and size.shape[1] == n and source.shape[1] == n
        assert torch.equal(size.sum(dim=1), torch.full((2, 1), 577.0, dtype=torch.float64))
        assert torch.equal(x[:, 0], x0[:, 0])  # CLS first and never merged
        assert torch.equal(size[:, 0], torch.ones(2, 1, dtype=torch.float64))
        torch.testing.assert_close((size * x).sum(dim=1) / size.sum(dim=1), mean0, rtol=0, atol=1e-10)
    assert n == 65


def test_merge_sources_partition_and_average():
    x0, history = _run_rounds([40, 60, 80, 50])
    x, size, source = history[-1]
    # every original token belongs to exactly one output token
    assert torch.equal(source.sum(dim=1), torch.ones(2, 577, dtype=torch.float64))
    assert bool(((source == 0) | (source == 1)).all())
    # sizes are the group sizes, features are the plain means of the group's original tokens
    assert torch.equal(source.sum(dim=2, keepdim=True), size)
    torch.testing.assert_close(x, (source @ x0) / size, rtol=0, atol=1e-10)


def test_merge_identical_tokens_unchanged():
    v = torch.randn(12, generator=_gen(4))
    x = v.expand(1, 41, 12).clone()
    size = torch.ones(1, 41, 1)
    for r in (10, 8, 5):
        plan = bipartite_soft_matching(x, r)
        x, size = merge_weighted_mean(plan, x, size)
        torch.testing.assert_close(x, v.expand_as(x), rtol=0, atol=1e-6)
    assert x.shape[1] == 41 - 23
    assert float(size.sum()) == 41.0


def test_merge_r0_keeps_every_token():
    x = torch.randn(2, 9, 4, generator=_gen(5))
    size = torch.ones(2, 9, 1)
    plan = bipartite_soft_matching(torch.randn(2, 9, 8, generator=_gen(6)), 0)
    assert plan.src_idx.shape == (2, 0) and plan.dst_idx.shape == (2, 0)
    merged, new_size = merge_weighted_mean(plan, x, size)
    # nothing merged: same vectors, bit for bit, in the documented [A..., B...] order
    assert torch.equal(merged, x[:, [0, 2, 4, 6, 8, 1, 3, 5, 7]])
    assert torch.equal(new_size, size)
    assert torch.equal(merge_sum(plan, x), x[:, [0, 2, 4, 6, 8, 1, 3, 5, 7]])


def test_merge_r_too_large():
    for n, r_max in [(577, 288), (576, 287), (16, 7), (3, 1)]:
        metric = torch.randn(1, n, 8, generator=_gen(n))
        plan = bipartite_soft_matching(metric, r_max)
        assert plan.src_idx.shape == (1, r_max)
        assert merge_sum(plan, metric).shape[1] == n - r_max
        with pytest.raises(ValueError):
            bipartite_soft_matching(metric, r_max + 1)
    metric = torch.randn(1, 5, 8)
    assert bipartite_soft_matching(metric, 2, protect_first=False).src_idx.shape == (1, 2)
    with pytest.raises(ValueError):
        bipartite_soft_matching(metric, 3, protect_first=False)
    with pytest.raises(ValueError):
        bipartite_soft_matching(metric, -1)


def test_merge_batch_rows_independent():
    metric = torch.randn(3, 33, 8, generator=_gen(7))
    x = torch.randn(3, 33, 5, generator=_gen(8))
    size = torch.ones(3, 33, 1)
    plan = bipartite_soft_matching(metric, 9)
    merged, _ = merge_weighted_mean(plan, x, size)
    for b in range(3):
        single = bipartite_soft_matching(metric[b : b + 1], 9)
        merged_b, _ = merge_weighted_mean(single, x[b : b + 1], size[b : b + 1])
        assert torch.equal(merged[b], merged_b[0])


# --------------------------------------------------------------------------------------------------------------------
# attention_probs
# --------------------------------------------------------------------------------------------------------------------


def _reference_attention(query, key, scale, mask=None):
    """Per (batch, head) explicit exp/normalise in float64; query head h uses kv head h // (H // H_kv)."""
    batch, heads, q, _ = query.shape
    group = heads // key.shape[1]
    out = torch.zeros(batch, heads, q, key.shape[2], dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            logits = query[b, h].double() @ key[b, h // group].double().T * scale
            weights = (logits - logits.max(dim=-1, keepdim=True).values).exp()
            if mask is not None:
                weights = weights * mask[b].double()
                weights = weights / weights.sum(-1, keepdim=True)
            else:
                weights = weights / weights.sum(-1, keepdim=True)
            out[b, h] = weights
    return out


def test_attention_probs_matches_explicit_softmax():
    gen = _gen(0)
    query = torch.randn(2, 4, 3, 16, generator=gen)
    key = torch.randn(2, 4, 20, 16, generator=gen)
    probs = attention_probs(query, key, 16**-0.5)
    assert probs.shape == (2, 4, 3, 20) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.double(), _reference_attention(query, key, 16**-0.5), rtol=0, atol=1e-6)


def test_attention_probs_gqa():
    gen = _gen(1)
    query = torch.randn(1, 8, 2, 8, generator=gen)
    key = torch.randn(1, 2, 11, 8, generator=gen)
    probs = attention_probs(query, key, 0.3)
    reference = _reference_attention(query, key, 0.3)
    torch.testing.assert_close(probs.double(), reference, rtol=0, atol=1e-6)
    # consecutive heads share a kv head (HF repeat_kv), not round-robin
    wrong = torch.stack([_reference_attention(query[:, h : h + 1], key[:, h % 2 : h % 2 + 1], 0.3)[:, 0]
                         for h in range(8)], dim=1)
    assert not torch.allclose(probs.double(), wrong, atol=1e-3)
    with pytest.raises(ValueError):
        attention_probs(torch.randn(1, 6, 1, 8), torch.randn(1, 4, 5, 8), 1.0)


def test_attention_probs_key_mask_2d_and_3d():
    gen = _gen(2)
    query = torch.randn(2, 4, 3, 8, generator=gen)
    key = torch.randn(2, 2, 9, 8, generator=gen)
    mask = torch.rand(2, 9, generator=gen) > 0.4
    mask[:, 0] = True
    probs = attention_probs(query, key, 0.5, key_mask=mask)
    hidden = ~mask[:, None, None, :].expand_as(probs)
    assert bool((probs[hidden] == 0).all())
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 3))
    reference = _reference_attention(query, key, 0.5, mask[:, None, :].expand(2, 3, 9))
    torch.testing.assert_close(probs.double(), reference, rtol=0, atol=1e-6)

    causal = torch.ones(3, 9, dtype=torch.bool).tril(diagonal=6).expand(2, 3, 9)  # row i sees keys 0..6+i
    probs = attention_probs(query, key, 0.5, key_mask=causal)
    assert bool((probs[~causal[:, None].expand_as(probs)] == 0).all())
    assert bool((probs[causal[:, None].expand_as(probs)] > 0).all())
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 3))
    torch.testing.assert_close(probs.double(), _reference_attention(query, key, 0.5, causal), rtol=0, atol=1e-6)


def test_attention_probs_half_inputs_in_float32():
    gen = _gen(3)
    query = torch.randn(1, 2, 2, 8, generator=gen).half()
    key = torch.randn(1, 2, 6, 8, generator=gen).half()
    probs = attention_probs(query, key, 0.35)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.double(), _reference_attention(query, key, 0.35), rtol=0, atol=1e-6)


@pytest.mark.parametrize("sizes", [[3, 1, 1, 1, 1], [2, 5, 1, 3, 1, 4]])
def test_proportional_attention_equals_duplicated_keys(sizes):
    """ToMe oracle: log(s) added to a key's logit == that key (and its value) duplicated s times."""
    gen = _gen(len(sizes))
    heads, q, d, scale = 3, 4, 8, 8**-0.5
    query = torch.randn(1, heads, q, d, generator=gen)
    key = torch.randn(1, heads, len(sizes), d, generator=gen)
    value = torch.randn(1, heads, len(sizes), 5, generator=gen)
    log_size = torch.tensor(sizes, dtype=torch.float32).log()
    # bias through attention_probs itself: an extra query dim of 1 and an extra key dim of log(s) / scale
    q_aug = torch.cat([query, torch.ones(1, heads, q, 1)], dim=-1)
    k_aug = torch.cat([key, (log_size / scale).expand(1, heads, -1)[..., None]], dim=-1)
    proportional = attention_probs(q_aug, k_aug, scale)

    repeats = torch.tensor(sizes)
    duplicated = attention_probs(query, key.repeat_interleave(repeats, dim=2), scale)
    owner = torch.arange(len(sizes)).repeat_interleave(repeats)
    summed = torch.zeros_like(proportional).index_add_(-1, owner, duplicated)
    torch.testing.assert_close(proportional, summed, rtol=0, atol=1e-6)
    # and the attention outputs agree
    out_prop = proportional @ value
    out_dup = duplicated @ value.repeat_interleave(repeats, dim=2)
    torch.testing.assert_close(out_prop, out_dup, rtol=0, atol=1e-5)
    # sanity: without the bias the two differ (the oracle is not vacuous)
    plain = attention_probs(query, key, scale)
    assert not torch.allclose(plain, summed, atol=1e-3)


# --------------------------------------------------------------------------------------------------------------------
# merge_schedule (ToMe budget)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keep,expected",
    [
        (192, [17] * 16 + [16] * 7),
        (128, [20] * 11 + [19] * 12),
        (64, [23] * 6 + [22] * 17),
    ],
)
def test_merge_schedule_card_lists(keep, expected):
    schedule = merge_schedule(577, 23, 576 - keep)
    assert schedule == expected
    assert sum(schedule) == 576 - keep
    assert all(a >= b for a, b in zip(schedule, schedule[1:]))


@pytest.mark.parametrize("tokens,blocks,removed", [(577, 23, 0), (577, 23, 5), (577, 23, 500), (101, 4, 80), (9, 3, 6)])
def test_merge_schedule_exact_nonincreasing_within_capacity(tokens, blocks, removed):
    schedule = merge_schedule(tokens, blocks, removed)
    assert len(schedule) == blocks and sum(schedule) == removed
    assert all(a >= b for a, b in zip(schedule, schedule[1:]))
    n = tokens
    for r in schedule:  # every round must be executable by bipartite_soft_matching with [CLS] protected
        plan = bipartite_soft_matching(torch.randn(1, n, 4, generator=_gen(n)), r, protect_first=True)
        assert plan.src_idx.shape[1] == r
        n -= r
    assert n == tokens - removed


def test_merge_schedule_unreachable():
    with pytest.raises(ValueError):
        merge_schedule(37, 2, 35)
    with pytest.raises(ValueError):
        merge_schedule(577, 23, 576)  # cannot go below [CLS] + 1 token
    with pytest.raises(ValueError):
        merge_schedule(37, 2, 28)  # beyond even the capacity-greedy maximum 18 + 9
    assert merge_schedule(37, 2, 24) == [12, 12]
    assert merge_schedule(37, 2, 27) == [18, 9]  # reachable only by front-loading the first block
    assert sum(merge_schedule(577, 23, 575)) == 575  # keep=1 is reachable on CLIP-L
