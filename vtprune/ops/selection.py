"""Top-k and random keep sets. Kept indices are always returned in ascending order (raster order)."""
from __future__ import annotations

import torch


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores along the last dim, sorted ascending.

    Ties go to the lower index (stable sort), so the kept set for ``k1 < k2`` is a subset of the one for ``k2``.
    """
    if not 0 <= k <= scores.shape[-1]:
        raise ValueError(f"k={k} must be between 0 and {scores.shape[-1]}")
    # Half precision is upcast for a well-defined sort; wider dtypes keep their precision.
    values = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]
    return order.sort(dim=-1).values


def random_indices(batch: int, n: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``k`` distinct indices out of ``n`` per row, uniformly at random, sorted ascending. Shape [batch, k]."""
    noise = torch.rand(batch, n, generator=generator)
    return noise.argsort(dim=-1)[:, :k].sort(dim=-1).values
