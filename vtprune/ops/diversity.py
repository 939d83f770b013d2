"""Greedy max-min diversity selection (DivPrune's solver)."""
from __future__ import annotations

import torch


def max_min_diversity(features: torch.Tensor, k: int, eps: float = 1e-8) -> torch.Tensor:
    """Greedy farthest-point selection of ``k`` rows of ``features`` [N, D] under cosine distance.

    First pick: the token whose nearest other token is farthest (diagonal excluded explicitly, so duplicates are
    handled). Then repeatedly add the token farthest from the selected set, keeping a running min-distance vector
    (O(kN) instead of re-gathering the selected rows each step), on the device: no host sync at all (the
    original synced once per kept token). Ties go to the lowest index. Returns sorted indices.
    Distances are computed in float32: in fp16 many distances collapse to ties.
    """
    n = features.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"k={k} must be between 1 and {n}")
    unit = features.float() / features.float().norm(dim=-1, keepdim=True).clamp_min(eps)
    distance = 1.0 - unit @ unit.T
    distance.fill_diagonal_(float("inf"))
    first = distance.min(dim=0).values.argmax(0, keepdim=True)  # [1], as every pick below
    distance.fill_diagonal_(0.0)
    # The loop stays on the device, with no host sync per kept token, in four ops per pick (indices are 1-element
    # tensors used through index_select / index_fill_; the running minimum is updated in place): chosen tokens carry
    # -inf in the running min-distance row, which equals masking them out before each argmax (minimum keeps -inf).
    min_distance = distance.index_select(0, first).index_fill_(1, first, -float("inf"))  # [1, N]
    picks = [first]
    for _ in range(k - 1):
        nxt = min_distance.argmax(1)
        picks.append(nxt)
        torch.minimum(min_distance, distance.index_select(0, nxt), out=min_distance).index_fill_(1, nxt, -float("inf"))
    return torch.cat(picks).sort().values
