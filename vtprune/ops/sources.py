"""Sparse provenance of visual tokens: which original tokens each current token stands for, and with what weight.

A selected token has one source with weight 1; a pooled or merged token has several. Rows are padded to the longest
one with weight-0 entries, so a reduction of 2,880 tokens to 64 costs O(64 * m) instead of a dense 64 x 2,880 map.
The same index may appear twice in a row (weights then add up): every function below is written for that.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sources:
    """``index`` [k, m] (long) and ``weight`` [k, m] (float32, 0 on padding) over ``n`` original tokens."""

    index: torch.Tensor
    weight: torch.Tensor

    def __len__(self) -> int:
        return self.index.shape[0]

    @staticmethod
    def one_hot(indices: torch.Tensor) -> Sources:
        """Token i stands for original token ``indices[i]`` alone."""
        indices = indices.long().reshape(-1, 1)
        return Sources(indices, torch.ones(indices.shape, dtype=torch.float32, device=indices.device))

    @staticmethod
    def from_dense(dense: torch.Tensor) -> Sources:
        """From a dense weight matrix [k, n] (e.g. pooling weights)."""
        dense = dense.float()
        width = max(1, int((dense != 0).sum(-1).max())) if dense.numel() else 1
        weight, index = dense.abs().topk(width, dim=-1)  # nonzeros first; order inside a row does not matter
        weight = dense.gather(-1, index) * (weight > 0)
        return Sources(index, weight)

    @staticmethod
    def from_assignment(owner: torch.Tensor, k: int) -> Sources:
        """Token i stands for every original token j with ``owner[j] == i`` (weight 1 each); ``owner`` [n] in [0, k)
        or -1 for an original token that no current token stands for."""
        owner = owner.long()
        keep = owner >= 0
        members = keep.nonzero().flatten()
        groups = owner[members]
        counts = torch.bincount(groups, minlength=k)
        width = max(1, int(counts.max())) if k else 1
        order = torch.sort(groups, stable=True).indices
        members, groups = members[order], groups[order]
        starts = counts.cumsum(0) - counts
        slot = torch.arange(len(groups), device=owner.device) - starts[groups]
        index = torch.zeros(k, width, dtype=torch.long, device=owner.device)
        weight = torch.zeros(k, width, dtype=torch.float32, device=owner.device)
        index[groups, slot] = members
        weight[groups, slot] = 1.0
        return Sources(index, weight)

    @staticmethod
    def cat(parts: list[Sources]) -> Sources:
        """Rows of several ``Sources`` stacked (padded to the widest)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        width = max(p.index.shape[1] for p in parts)
        pad = [(0, width - p.index.shape[1]) for p in parts]
        index = torch.cat([torch.nn.functional.pad(p.index, w) for p, w in zip(parts, pad)])
        weight = torch.cat([torch.nn.functional.pad(p.weight, w) for p, w in zip(parts, pad)])
        return Sources(index, weight)

    def select(self, rows: torch.Tensor) -> Sources:
        return Sources(self.index[rows], self.weight[rows])

    def shift(self, offset: int) -> Sources:
        """Indices moved by ``offset`` (an image's tokens placed after earlier images of the same sample)."""
        return Sources(self.index + offset, self.weight)

    def remap(self, mapping: torch.Tensor) -> Sources:
        """Indices sent through ``mapping`` [n] into another index space; entries mapped to -1 lose their weight."""
        new = mapping[self.index]
        return Sources(new.clamp_min(0), self.weight * (new >= 0))

    def compose(self, combination: Sources) -> Sources:
        """New tokens that combine these tokens: new token i = sum_j combination.weight[i, j] * token
        combination.index[i, j]. Returns their sources over the original tokens."""
        index = self.index[combination.index]  # [k2, m2, m]
        weight = combination.weight[..., None] * self.weight[combination.index]
        return Sources(index.flatten(1), weight.flatten(1))

    def strongest(self) -> torch.Tensor:
        """Each token's source with the largest weight [k] (the first of equals)."""
        return self.index.gather(1, self.weight.argmax(1, keepdim=True))[:, 0]

    def total(self) -> torch.Tensor:
        """Summed weight of each token [k]."""
        return self.weight.sum(-1)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Weighted mean of per-original-token ``values`` ([n] or [n, c]) for each token: [k] or [k, c]."""
        gathered = values.float()[self.index]
        weight = self.weight.view(*self.weight.shape, *([1] * (gathered.dim() - 2)))
        return (gathered * weight).sum(1) / weight.sum(1).clamp_min(1e-12)

    def coverage(self, n: int) -> torch.Tensor:
        """Total weight each of the ``n`` original tokens contributes to these tokens [n] (0: not represented)."""
        out = torch.zeros(n, dtype=torch.float32, device=self.index.device)
        return out.index_add_(0, self.index.flatten(), self.weight.flatten())

    def to_dense(self, n: int) -> torch.Tensor:
        """Dense weights [k, n] (for inspection and plots)."""
        out = torch.zeros(len(self), n, dtype=torch.float32, device=self.index.device)
        return out.scatter_add_(1, self.index, self.weight)

    def to(self, device: torch.device) -> Sources:
        return Sources(self.index.to(device), self.weight.to(device))
