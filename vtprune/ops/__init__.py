"""Pure tensor algorithms shared by the methods: selection, diversity, merging, attention rows, grids.

Nothing here knows about a model; adapters compute queries/keys, methods decide which op to call.
"""
from vtprune.ops.attention import attention_probs, rotate_half
from vtprune.ops.diversity import max_min_diversity
from vtprune.ops.grid import grid_shape, pool_grid_shape, uniform_grid_indices
from vtprune.ops.merge import MergePlan, bipartite_soft_matching, merge_sum, merge_weighted_mean, pool_grid
from vtprune.ops.selection import random_indices, topk_indices

__all__ = [
    "MergePlan",
    "attention_probs",
    "bipartite_soft_matching",
    "grid_shape",
    "max_min_diversity",
    "merge_sum",
    "merge_weighted_mean",
    "pool_grid",
    "pool_grid_shape",
    "random_indices",
    "rotate_half",
    "topk_indices",
    "uniform_grid_indices",
]
