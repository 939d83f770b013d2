"""Top-k and random keep sets. Kept indices are always returned in ascending order (raster order)."""
from __future__ import annotations

import torch


def _sortable(scores: torch.Tensor) -> torch.Tensor:
    # Half precision is upcast for a well-defined sort; wider dtypes keep their precision.
    return scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores along the last dim, sorted ascending.

    Ties go to the lower index (stable sort), so the kept set for ``k1 < k2`` is a subset of the one for ``k2``.
    """
    if not 0 <= k <= scores.shape[-1]:
        raise ValueError(f"k={k} must be between 0 and {scores.shape[-1]}")
    order = torch.sort(_sortable(scores), dim=-1, descending=True, stable=True).indices[..., :k]
    return order.sort(dim=-1).values


def group_topk(scores: torch.Tensor, group: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep mask of the ``k[b, g]`` highest-scoring entries of every group ``g`` in every row ``b``.

    ``scores`` [B, n]; ``group`` [B, n] long, -1 for entries that are no candidate; ``k`` [B, G] long. Ties go to
    the lower index, as in ``topk_indices``. One sort pass for the whole batch: no loop over rows or groups.
    """
    candidate = group >= 0
    values = _sortable(scores).masked_fill(~candidate, float("-inf"))
    by_score = torch.sort(values, dim=-1, descending=True, stable=True).indices
    groups_by_score = group.gather(1, by_score).masked_fill(~candidate.gather(1, by_score), group.shape[1] + k.shape[1])
    by_group = torch.sort(groups_by_score, dim=-1, stable=True)
    order = by_score.gather(1, by_group.indices)  # grouped, best first inside each group
    sorted_groups = by_group.values.contiguous()
    first = torch.searchsorted(sorted_groups, sorted_groups)  # start of each entry's group in the sorted row
    rank = torch.arange(group.shape[1], device=group.device) - first
    limit = k.gather(1, sorted_groups.clamp(0, k.shape[1] - 1))
    keep_sorted = (rank < limit) & (sorted_groups < k.shape[1])
    return torch.zeros_like(candidate).scatter(1, order, keep_sorted)


def random_indices(batch: int, n: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``k`` distinct indices out of ``n`` per row, uniformly at random, sorted ascending. Shape [batch, k]."""
    noise = torch.rand(batch, n, generator=generator)
    return noise.argsort(dim=-1)[:, :k].sort(dim=-1).values
