"""Token merging: ToMe's bipartite soft matching and grid average pooling.

Merges are expressed so that sizes and source maps can be carried with the same code path as the features:
``merge_sum`` adds tokens into their destinations, ``merge_weighted_mean`` divides by the summed sizes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MergePlan:
    """One round of bipartite merging on a sequence split into A (even positions) and B (odd positions).

    ``src_idx`` [B, r]: A tokens merged away; ``dst_idx`` [B, r]: the B token each merges into;
    ``unmerged_idx`` [B, Na - r]: A tokens that stay, ascending. Output order: [unmerged A..., all B...].
    """

    src_idx: torch.Tensor
    dst_idx: torch.Tensor
    unmerged_idx: torch.Tensor


def bipartite_soft_matching(metric: torch.Tensor, r: int, protect_first: bool = True) -> MergePlan:
    """Plan ToMe's merge of ``r`` tokens given a metric [B, N, C] (e.g. head-mean keys), cosine similarity.

    Each A token proposes its most similar B token; the ``r`` A tokens with the highest similarity are merged.
    With ``protect_first`` the token at position 0 (the [CLS] token) is never merged and stays first.
    """
    n_a = (metric.shape[1] + 1) // 2
    limit = n_a - int(protect_first)
    if not 0 <= r <= min(limit, metric.shape[1] // 2):
        raise ValueError(f"cannot merge r={r} of {metric.shape[1]} tokens in one bipartite round")
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores = unit[:, ::2] @ unit[:, 1::2].transpose(-1, -2)
    if protect_first:
        scores[:, 0, :] = -float("inf")
    best_score, best_partner = scores.max(dim=-1)
    edge_order = torch.sort(best_score, dim=-1, descending=True, stable=True).indices
    src_idx = edge_order[:, :r]
    return MergePlan(
        src_idx=src_idx,
        dst_idx=best_partner.gather(1, src_idx),
        unmerged_idx=edge_order[:, r:].sort(dim=-1).values,
    )


def merge_sum(plan: MergePlan, x: torch.Tensor) -> torch.Tensor:
    """Apply ``plan`` to ``x`` [B, N, D], summing merged tokens into their destinations."""
    src, dst = x[:, ::2], x[:, 1::2]
    dim = x.shape[-1]
    unmerged = src.gather(1, plan.unmerged_idx[..., None].expand(-1, -1, dim))
    moved = src.gather(1, plan.src_idx[..., None].expand(-1, -1, dim))
    dst = dst.scatter_add(1, plan.dst_idx[..., None].expand(-1, -1, dim), moved)
    return torch.cat([unmerged, dst], dim=1)


def merge_destination(plan: MergePlan, n: int) -> torch.Tensor:
    """Where each of the ``n`` tokens [B, n] ends up after ``merge_sum(plan, ...)``: its own new index, or for a
    merged-away A token its destination's."""
    batch, kept = plan.src_idx.shape[0], plan.unmerged_idx.shape[1]
    device = plan.src_idx.device
    side_a = torch.empty(batch, (n + 1) // 2, dtype=torch.long, device=device)
    side_a.scatter_(1, plan.unmerged_idx, torch.arange(kept, device=device).expand(batch, -1).contiguous())
    side_a.scatter_(1, plan.src_idx, kept + plan.dst_idx)
    out = torch.empty(batch, n, dtype=torch.long, device=device)
    out[:, ::2] = side_a
    out[:, 1::2] = kept + torch.arange(n // 2, device=device)
    return out


def merge_weighted_mean(plan: MergePlan, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge of ``x`` [B, N, D] with token sizes ``size`` [B, N, 1]; returns (x, size)."""
    new_size = merge_sum(plan, size)
    return merge_sum(plan, x * size) / new_size, new_size


def pool_grid(
    x: torch.Tensor, grid: tuple[int, int], out_grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive average pooling of raster tokens ``x`` [B, H*W, D] to ``out_grid``.

    Returns the pooled tokens [B, h*w, D] and the pooling weights [h*w, H*W] (row i: how much of each input patch
    output token i averages), which double as the tokens' source map.
    """
    height, width = grid
    eye = torch.eye(height * width, device=x.device, dtype=torch.float32).view(-1, 1, height, width)
    weights = F.adaptive_avg_pool2d(eye, out_grid).flatten(1).T.contiguous()
    return torch.einsum("kn,bnd->bkd", weights.to(x.dtype), x), weights
