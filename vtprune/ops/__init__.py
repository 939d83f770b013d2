"""Pure tensor algorithms shared by the methods: selection, diversity, merging, attention rows, grids, provenance.

Nothing here knows about a model; adapters compute queries/keys, methods decide which op to call.
"""
from vtprune.ops.allocation import (
    base_and_subs,
    rate_budget,
    region_index,
    region_scores,
    split_by_content,
    view_budgets,
)
from vtprune.ops.attention import apply_rotary, attention_probs, reweight_keys, rotate_half
from vtprune.ops.clusters import nearest_by_cosine, nearest_point, stride_membership, stride_representatives
from vtprune.ops.diversity import max_min_diversity
from vtprune.ops.grid import (
    pool_budgets,
    pool_grid_shape,
    sparsest_grid_stride,
    split_budget,
    uniform_grid_indices,
)
from vtprune.ops.merge import (
    MergePlan,
    bipartite_soft_matching,
    merge_destination,
    merge_sum,
    merge_weighted_mean,
    pool_grid,
)
from vtprune.ops.selection import group_topk, random_indices, topk_indices
from vtprune.ops.sources import Sources
from vtprune.ops.windows import mean_by_assignment, window_assignment, window_indices, window_similarity

__all__ = [
    "MergePlan",
    "Sources",
    "apply_rotary",
    "attention_probs",
    "base_and_subs",
    "bipartite_soft_matching",
    "group_topk",
    "max_min_diversity",
    "mean_by_assignment",
    "merge_destination",
    "merge_sum",
    "merge_weighted_mean",
    "nearest_by_cosine",
    "nearest_point",
    "pool_budgets",
    "pool_grid",
    "pool_grid_shape",
    "random_indices",
    "rate_budget",
    "region_index",
    "region_scores",
    "reweight_keys",
    "rotate_half",
    "sparsest_grid_stride",
    "split_budget",
    "split_by_content",
    "stride_membership",
    "stride_representatives",
    "topk_indices",
    "uniform_grid_indices",
    "view_budgets",
    "window_assignment",
    "window_indices",
    "window_similarity",
]
