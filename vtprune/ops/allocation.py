"""Budget allocation across the views of one image: a share for the whole-image view, the rest split over a grid of
sub-images in proportion to a content score read on the whole-image view (HiRED's phase 1).

Plain integer arithmetic on one image's counts, plus the map from whole-image grid cells to sub-images; nothing here
knows about a model.
"""
from __future__ import annotations

import math

import torch

REGION_MAPS = ("paper_2d", "reference_bands")
CONTENT_SCORES = ("attention_sum", "topk_count")


def rate_budget(rate: float, views: int, view_tokens: int) -> int:
    """``int(views * view_tokens * rate)``: a budget given as a share of every view's full token grid (truncated, as
    HiRED's official code computes it, so a 3-view image at 0.2 of 576 each gets 345)."""
    return int(views * view_tokens * rate)


def base_and_subs(budget: int, alpha: float, base_cap: int, subs_cap: int) -> tuple[int, int]:
    """(whole-image budget, budget left for all sub-images): ``min(int(alpha * budget), base_cap)`` and
    ``min(budget - that, subs_cap)``. What the whole image cannot take (its cap) goes to the sub-images."""
    if budget < 0 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"budget={budget} must be >= 0 and alpha={alpha} in [0, 1]")
    base = min(int(alpha * budget), base_cap)
    return base, max(0, min(budget - base, subs_cap))


def _bounds(size: int, parts: int) -> torch.Tensor:
    # cell edges floor(i * size / parts), i = 1 .. parts - 1: part i covers [edge_i, edge_{i+1})
    return torch.tensor([i * size // parts for i in range(1, parts)], dtype=torch.long)


def region_index(row: torch.Tensor, col: torch.Tensor, height: int, width: int, grid: tuple[int, int],
                 mapping: str = "paper_2d") -> torch.Tensor:
    """For tokens at (``row``, ``col``) of a ``height x width`` whole-image grid, the sub-image (row-major in a
    ``grid = (R, C)`` arrangement) whose region of the image they show.

    ``paper_2d``: sub-image (r, c) <- rows [floor(r*H/R), floor((r+1)*H/R)) x cols [floor(c*W/C), floor((c+1)*W/C)).
    ``reference_bands``: the raster order cut into R*C equal consecutive chunks, chunk i -> sub-image i (horizontal
    bands: right only when C == 1, e.g. for 2x2 the top-left sub-image gets the top quarter of the rows).
    """
    rows, cols = grid
    if mapping == "paper_2d":
        r = torch.bucketize(row, _bounds(height, rows).to(row.device), right=True)
        c = torch.bucketize(col, _bounds(width, cols).to(col.device), right=True)
        return r * cols + c
    if mapping == "reference_bands":
        raster = row * width + col
        return torch.bucketize(raster, _bounds(height * width, rows * cols).to(row.device), right=True)
    raise ValueError(f"mapping={mapping!r} must be one of {REGION_MAPS}")


def region_scores(scores: torch.Tensor, region: torch.Tensor, regions: int, kind: str = "attention_sum",
                  top: int = 0) -> torch.Tensor:
    """Content score of each of ``regions`` sub-images (float64 [regions]) from per-token ``scores`` [n] of the
    whole-image view and each token's ``region`` [n].

    ``attention_sum``: the summed scores of the region's tokens (the paper). ``topk_count``: how many of the ``top``
    highest-scoring tokens lie in the region (the official code; ties go to the lower index)."""
    weights = scores.double()
    if kind == "topk_count":
        if not 0 <= top <= len(scores):
            raise ValueError(f"top={top} must be between 0 and {len(scores)}")
        order = torch.sort(scores.float(), descending=True, stable=True).indices[:top]
        weights = torch.zeros_like(weights).index_fill_(0, order, 1.0)
    elif kind != "attention_sum":
        raise ValueError(f"kind={kind!r} must be one of {CONTENT_SCORES}")
    return torch.zeros(regions, dtype=torch.float64, device=scores.device).index_add_(0, region, weights)


def split_by_content(total: int, weights: list[float], caps: list[int], redistribute: bool = False) -> list[int]:
    """``total`` tokens shared over parts in proportion to ``weights``: part i gets ``floor(total * w_i / sum w)``,
    at most ``caps[i]``. All weights zero (e.g. no top token in any region): an even split, ``floor(total / k)``.

    ``redistribute=False`` (HiRED): what flooring and caps leave over is not used, so the sum may be below
    ``total``. ``True``: it is handed out one token at a time to the part furthest below its proportional share
    that still has room (ties: the earlier part), so the sum is ``min(total, sum(caps))``.
    """
    if total < 0 or len(weights) != len(caps) or any(w < 0 or not math.isfinite(w) for w in weights):
        raise ValueError(f"cannot split {total} tokens by weights {weights} with caps {caps}")
    if not weights:
        return []
    whole = sum(weights)
    # float noise must not turn an exact quotient (equal weights) into the integer below it
    exact = [total * w / whole if whole > 0 else total / len(weights) for w in weights]
    shares = [min(math.floor(e + 1e-9), cap) for e, cap in zip(exact, caps)]
    if redistribute:
        for _ in range(min(total, sum(caps)) - sum(shares)):
            room = [i for i in range(len(shares)) if shares[i] < caps[i]]
            shares[max(room, key=lambda i: (exact[i] - shares[i], -i))] += 1
    return shares


def view_budgets(budget: int, alpha: float, counts: list[int], content: list[float] | None,
                 redistribute: bool = False) -> list[int]:
    """Tokens kept per view of one image with ``counts`` tokens per view (view 0: the whole image; 1..k: its
    sub-images, whose ``content`` scores share what the whole image leaves; None or one view: all to view 0).

    ``budget`` covering every token: every view keeps all. Otherwise view 0 gets ``base_and_subs`` and the sub-images
    ``split_by_content`` (capped at their counts); ``redistribute`` also hands what the sub-images cannot use back to
    view 0, so the views then sum to exactly ``budget``."""
    if budget >= sum(counts):
        return list(counts)
    if content is None or len(counts) == 1:
        return [min(budget, counts[0]), *([0] * (len(counts) - 1))]
    if len(content) != len(counts) - 1:
        raise ValueError(f"{len(content)} content scores for {len(counts) - 1} sub-images")
    base, subs = base_and_subs(budget, alpha, counts[0], sum(counts[1:]))
    shares = split_by_content(subs, list(content), counts[1:], redistribute)
    if redistribute:
        base = min(counts[0], budget - sum(shares))
    return [base, *shares]
