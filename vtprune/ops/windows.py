"""Non-overlapping square windows on a patch grid: their internal similarity, which windows collapse, and the
mean of the tokens assigned to each output slot (MustDrop's local spatial merge)."""
from __future__ import annotations

import torch


def window_indices(grid: tuple[int, int], window: int) -> torch.Tensor:
    """Raster patch indices of every ``window x window`` cell of a ``grid`` = (height, width) patch grid: [W, window²],
    windows in raster order, patches in raster order inside each. The windows must tile the grid exactly."""
    height, width = grid
    if window < 1 or height % window or width % window:
        raise ValueError(f"{window}x{window} windows do not tile a {height}x{width} patch grid")
    rows = torch.arange(height).view(height // window, window, 1, 1)
    cols = torch.arange(width).view(1, 1, width // window, window)
    index = rows * width + cols  # [wr, window, wc, window]
    return index.permute(0, 2, 1, 3).reshape(-1, window * window)


def window_similarity(x: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity of the tokens inside each window: [V, W] for ``x`` [V, T, D] (raster patch
    tokens) and ``windows`` [W, n]. The mean runs over the n(n-1) ordered pairs of distinct tokens (self-pairs left
    out), so n identical tokens give 1 and mutually orthogonal ones give 0. Computed in float32."""
    n = windows.shape[1]
    if n < 2:
        raise ValueError("a window needs at least two tokens to have a similarity")
    unit = torch.nn.functional.normalize(x.float(), dim=-1, eps=1e-12)[:, windows]  # [V, W, n, D]
    gram = unit @ unit.transpose(-1, -2)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=x.device)
    return (gram * off_diagonal).sum((-1, -2)) / (n * (n - 1))


def window_assignment(similarity: torch.Tensor, windows: torch.Tensor, counts: torch.Tensor,
                      tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each patch goes when every view v collapses its ``counts[v]`` most similar windows into one token each.

    ``similarity`` [V, W]; ``windows`` [W, n] over ``tokens`` patches. Output order per view: the collapsed windows
    first, by descending similarity (ties: the earlier window), then every other patch in raster order. Returns the
    slot of each patch [V, tokens] and the tokens each view ends with [V] (``tokens - (n - 1) * counts``).
    """
    views, count = similarity.shape
    device = similarity.device
    counts = counts.to(device=device, dtype=torch.long)
    if bool(((counts < 0) | (counts > count)).any()):
        raise ValueError(f"merge counts must lie in 0..{count}")
    by_score = torch.sort(similarity, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(by_score).scatter_(1, by_score, torch.arange(count, device=device).expand(views, -1))
    window_of = torch.empty(tokens, dtype=torch.long, device=device)
    window_of[windows.flatten().to(device)] = torch.arange(count, device=device).repeat_interleave(windows.shape[1])
    patch_rank = rank[:, window_of]  # [V, tokens]
    merged = patch_rank < counts[:, None]
    single = (~merged).long().cumsum(1) - 1  # raster rank among the patches left alone
    slot = torch.where(merged, patch_rank, counts[:, None] + single)
    return slot, tokens - (windows.shape[1] - 1) * counts


def mean_by_assignment(x: torch.Tensor, slot: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean of the tokens of ``x`` [V, T, D] assigned to each of ``slots`` outputs by ``slot`` [V, T]: returns
    ([V, slots, D] in ``x``'s dtype, accumulated in float32; an empty slot is zero) and the members per slot
    [V, slots]."""
    views, _, dim = x.shape
    total = x.new_zeros(views, slots, dim, dtype=torch.float32)
    total.scatter_add_(1, slot[..., None].expand(-1, -1, dim), x.float())
    size = torch.zeros(views, slots, dtype=torch.float32, device=x.device)
    size.scatter_add_(1, slot, torch.ones_like(slot, dtype=torch.float32))
    return (total / size.clamp_min(1)[..., None]).to(x.dtype), size
