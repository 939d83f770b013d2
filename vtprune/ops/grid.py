"""Geometry of the visual token grid (row-major / raster order)."""
from __future__ import annotations

import math

import torch


def grid_shape(n: int) -> tuple[int, int]:
    """(height, width) of a square raster of ``n`` tokens; raises if ``n`` is not a square."""
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} visual tokens do not form a square grid")
    return side, side


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
