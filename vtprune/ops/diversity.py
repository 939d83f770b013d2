"""Greedy max-min diversity selection (DivPrune's solver)."""
from __future__ import annotations

import torch


def max_min_diversity(features: torch.Tensor, k: int, eps: float = 1e-8) -> torch.Tensor:
    """Greedy farthest-point selection of ``k`` rows of ``features`` [N, D] under cosine distance.

    First pick: the token whose nearest other token is farthest (diagonal excluded explicitly, so duplicates are
    handled). Then repeatedly add the token farthest from the selected set, keeping a running min-distance vector
    (O(kN) instead of re-gathering the selected rows each step). Ties go to the lowest index. Returns sorted indices.
    Distances are computed in float32: in fp16 many distances collapse to ties.
    """
    n = features.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"k={k} must be between 1 and {n}")
    unit = features.float() / features.float().norm(dim=-1, keepdim=True).clamp_min(eps)
    distance = 1.0 - unit @ unit.T
    distance.fill_diagonal_(float("inf"))
    first = int(distance.min(dim=0).values.argmax())
    distance.fill_diagonal_(0.0)
    selected = torch.zeros(n, dtype=torch.bool, device=features.device)
    selected[first] = True
    min_distance = distance[first].clone()
    picks = [first]
    for _ in range(k - 1):
        candidate = min_distance.masked_fill(selected, -float("inf"))
        nxt = int(candidate.argmax())
        picks.append(nxt)
        selected[nxt] = True
        min_distance = torch.minimum(min_distance, distance[nxt])
    return torch.tensor(sorted(picks), dtype=torch.long, device=features.device)
