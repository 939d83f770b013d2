"""Geometry of the visual token grid (row-major / raster order)."""
from __future__ import annotations

import math

import torch


def uniform_grid_indices(height: int, width: int, k: int) -> torch.Tensor:
    """Exactly ``k`` raster indices spread as a regular 2-D lattice over a ``height x width`` grid.

    The lattice has ``rows x cols >= k`` points placed at the centres of equal cells (k=64 on 24x24 gives stride 3);
    when ``rows*cols > k`` the surplus is removed at evenly spaced lattice points, so coverage stays uniform.
    """
    if not 0 < k <= height * width:
        raise ValueError(f"k={k} must be between 1 and {height * width}")
    rows = min(height, max(1, round(math.sqrt(k * height / width))))
    cols = math.ceil(k / rows)
    if cols > width:
        cols = width
        rows = math.ceil(k / cols)
    row_idx = ((torch.arange(rows) + 0.5) * height / rows).floor().long()
    col_idx = ((torch.arange(cols) + 0.5) * width / cols).floor().long()
    lattice = (row_idx[:, None] * width + col_idx[None, :]).flatten()
    if lattice.numel() > k:
        pick = torch.linspace(0, lattice.numel() - 1, k).round().long()
        lattice = lattice[pick]
    return lattice.sort().values


def pool_grid_shape(height: int, width: int, k: int) -> tuple[int, int]:
    """Output grid ``(h, w)`` with ``h * w == k`` closest in aspect ratio to the input grid.

    k=144 on 24x24 is the classic 2x2 pooling (12x12); k=64 gives 8x8, k=128 gives 8x16.
    """
    if not 0 < k <= height * width:
        raise ValueError(f"k={k} must be between 1 and {height * width}")
    best: tuple[int, int] | None = None
    for h in range(1, k + 1):
        if k % h or h > height or k // h > width:
            continue
        w = k // h
        if best is None or abs(math.log(h / w * width / height)) < abs(math.log(best[0] / best[1] * width / height)):
            best = (h, w)
    if best is None:
        raise ValueError(f"k={k} cannot be written as h*w with h <= {height} and w <= {width}")
    return best


def split_budget(total: int, sizes: list[int]) -> list[int]:
    """``total`` tokens shared among parts of the given ``sizes`` in proportion to their size (largest remainder,
    ties to the earlier part); no part gets more than its size."""
    if not 0 <= total <= sum(sizes):
        raise ValueError(f"cannot keep {total} of {sum(sizes)} tokens")
    whole = sum(sizes)
    exact = [total * s / whole if whole else 0.0 for s in sizes]
    shares = [min(math.floor(e), s) for e, s in zip(exact, sizes)]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order:
        if sum(shares) == total:
            break
        if shares[i] < sizes[i]:
            shares[i] += 1
    while sum(shares) < total:  # rounding left room only in parts that are not yet full
        i = next(i for i in order if shares[i] < sizes[i])
        shares[i] += 1
    return shares


def _factors(k: int, height: int, width: int) -> bool:
    return k == 0 or any(k % h == 0 and k // h <= width for h in range(1, min(height, k) + 1))


def pool_budgets(total: int, grids: list[tuple[int, int]]) -> list[int]:
    """Per-grid token counts that sum to ``total``, each writable as h*w inside its grid, as close as possible to a
    split in proportion to grid size (searched outwards from the proportional split of the first grids)."""
    sizes = [h * w for h, w in grids]
    ideal = split_budget(total, sizes)
    if len(grids) == 1:
        if not _factors(total, *grids[0]):
            raise ValueError(f"k={total} cannot be written as h*w with h <= {grids[0][0]} and w <= {grids[0][1]}")
        return ideal
    for delta in range(total + 1):
        for sign in ((0,) if delta == 0 else (-1, 1)):
            shares = list(ideal)
            shares[0] += sign * delta
            rest = total - shares[0]
            if not 0 <= shares[0] <= sizes[0] or not _factors(shares[0], *grids[0]):
                continue
            tail = split_budget(rest, sizes[1:]) if 0 <= rest <= sum(sizes[1:]) else None
            if tail is not None and all(_factors(k, *g) for k, g in zip(tail, grids[1:])):
                return [shares[0], *tail]
    raise ValueError(f"k={total} cannot be split into h*w blocks over grids {grids}")


def sparsest_grid_stride(row: torch.Tensor, col: torch.Tensor, strides: tuple[int, ...]) -> torch.Tensor:
    """For tokens at grid places (``row``, ``col``) (any shape; -1: not on a grid), the largest stride ``s`` of
    ``strides`` whose uniform grid (rows and columns 0, s, 2s, ...) holds the token; 0 when none does."""
    out = torch.zeros_like(row)
    on_grid = (row >= 0) & (col >= 0)
    for stride in sorted(strides):
        out = torch.where(on_grid & (row % stride == 0) & (col % stride == 0), stride, out)
    return out
