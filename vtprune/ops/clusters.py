"""Representatives and cluster membership over one set of tokens (a grid view, or any feature set).

A clustering picks ``k`` representative tokens and assigns every token to one of them; a representative always
belongs to its own cluster. Used by LVLM_CSP's clustering stage; nothing here knows about a model.
"""
from __future__ import annotations

import torch


def stride_representatives(n: int, k: int) -> torch.Tensor:
    """``i * floor(n / k)`` for i = 0..k-1: a 1-D stride over ``n`` tokens in order [k]."""
    if not 0 < k <= n:
        raise ValueError(f"k={k} must be between 1 and {n}")
    return torch.arange(k) * (n // k)


def stride_membership(n: int, k: int) -> torch.Tensor:
    """Cluster of each of ``n`` tokens under ``stride_representatives(n, k)``: ``floor(j / stride)``, the last
    cluster taking the tail (``min(j // stride, k - 1)``) [n]."""
    if not 0 < k <= n:
        raise ValueError(f"k={k} must be between 1 and {n}")
    return (torch.arange(n) // (n // k)).clamp(max=k - 1)


def nearest_point(points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """For each of ``points`` [n, d] the index of the nearest of ``centres`` [k, d] (Euclidean; ties: the lower
    index) [n]."""
    distance = torch.cdist(points.double(), centres.double())
    return distance.argmin(dim=1)  # argmin returns the first of equal minima


def nearest_by_cosine(features: torch.Tensor, representatives: torch.Tensor) -> torch.Tensor:
    """Cluster of each of ``features`` [n, D]: the index (into ``representatives`` [k], token indices) of the most
    cosine-similar representative (ties: the lower index); every representative belongs to itself [n]."""
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    similarity = unit @ unit[representatives].T  # [n, k]
    best = similarity.argmax(dim=1)
    best[representatives] = torch.arange(len(representatives), device=best.device)
    return best
