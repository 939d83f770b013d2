"""Pure tensor algorithms shared by the methods: selection, diversity, merging, attention rows, grids, provenance.

Nothing here knows about a model; adapters compute queries/keys, methods decide which op to call.
"""
from vtprune.ops.attention import apply_rotary, attention_probs, reweight_keys, rotate_half
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

__all__ = [
    "MergePlan",
    "Sources",
    "apply_rotary",
    "attention_probs",
    "bipartite_soft_matching",
    "group_topk",
    "max_min_diversity",
    "merge_destination",
    "merge_sum",
    "merge_weighted_mean",
    "pool_budgets",
    "pool_grid",
    "pool_grid_shape",
    "random_indices",
    "reweight_keys",
    "rotate_half",
    "sparsest_grid_stride",
    "split_budget",
    "topk_indices",
    "uniform_grid_indices",
]
