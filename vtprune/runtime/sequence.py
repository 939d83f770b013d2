"""Pure sequence surgery on left-padded batches: padding ragged rows, gathering kept tokens, per-layer masks."""
from __future__ import annotations

import torch


def left_pad(rows: list[torch.Tensor], fill: float | int | bool) -> torch.Tensor:
    """Stack rows of different lengths (dim 0) into one tensor, padding on the left so the last token aligns."""
    width = max(row.shape[0] for row in rows)
    out = rows[0].new_full((len(rows), width, *rows[0].shape[1:]), fill)
    for b, row in enumerate(rows):
        if row.shape[0]:
            out[b, width - row.shape[0]:] = row
    return out


def gather_rows(x: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``x`` gathered along ``dim`` (the token dim, with the batch dim just before it) with ``index`` [B, m]."""
    shape = [1] * x.dim()
    shape[dim - 1], shape[dim] = index.shape
    expanded = index.view(shape).expand(*x.shape[:dim - 1], index.shape[0], index.shape[1], *x.shape[dim + 1:])
    return x.gather(dim, expanded)


def keep_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded gather index for a keep mask [B, n]: returns (index [B, m], valid [B, m]), kept entries in order.

    One host sync (the widest row decides m)."""
    counts = keep.sum(1)
    width = int(counts.max()) if keep.shape[0] else 0
    order = torch.arange(keep.shape[1], device=keep.device)
    rank = torch.where(keep, order, order + keep.shape[1])  # kept entries sort first, in order
    sorted_idx = rank.argsort(dim=1)[:, :width]
    slot = torch.arange(width, device=keep.device)
    shift = (width - counts)[:, None]
    valid = slot[None, :] >= shift
    index = sorted_idx.gather(1, (slot[None, :] - shift).clamp_min(0))
    return index, valid


def renumber(valid: torch.Tensor) -> torch.Tensor:
    """Contiguous positions 0..n'-1 over the valid tokens of each row (what LLaVA's own pipeline feeds)."""
    return (valid.long().cumsum(-1) - 1).clamp_min(0)


def attention_mask(
    past_valid: torch.Tensor | None,
    valid: torch.Tensor,
    dtype: torch.dtype,
    implementation: str,
    key_weight: torch.Tensor | None = None,
    simple: bool | None = None,
) -> torch.Tensor | None:
    """4-D mask [B, 1, q, past + q] for one decoder layer: every valid cached key, causal among the q new tokens.

    Padding queries see themselves so that no softmax row is empty (their outputs are never used). ``key_weight``
    [B, past + q] (training mode): log(weight) is added to each key's logits except on the diagonal, so a weight-0
    token is invisible to others but still attends to itself. Returns ``None`` for SDPA when the plain causal kernel
    is exact: nothing padded and no cached keys, or a single new token over fully valid cached keys (SDPA's causal
    flag aligns the query block to the *first* key, which is wrong for several new tokens after a cache).
    ``simple``: the caller already knows whether that case holds (saves a host sync); None: check here.
    """
    batch, q = valid.shape
    past = 0 if past_valid is None else past_valid.shape[1]
    if implementation == "sdpa" and key_weight is None and (past == 0 or q == 1):
        if simple is None:
            simple = bool(valid.all()) and (past == 0 or bool(past_valid.all()))
        if simple:
            return None
    if q == 1 and past and key_weight is None:
        # A decode step's mask is one row: the cached keys' validity, then the new token itself (a padding query
        # sees itself too). Built directly: the general path below costs ~10 more ops per distinct track and step.
        mask = torch.cat([past_valid, torch.ones_like(valid)], dim=1)[:, None, None, :]
    else:
        causal = torch.ones(q, q, dtype=torch.bool, device=valid.device).tril()
        diagonal = torch.eye(q, dtype=torch.bool, device=valid.device)
        current = causal[None] & valid[:, None, :]
        current |= diagonal[None] & ~valid[:, :, None]
        if past:
            current = torch.cat([past_valid[:, None, :].expand(batch, q, -1), current], dim=-1)
        mask = current[:, None]
    if implementation == "sdpa" and key_weight is None:
        return mask
    floor = torch.finfo(dtype).min
    additive = torch.zeros(mask.shape, dtype=dtype, device=valid.device).masked_fill(~mask, floor)
    if key_weight is not None:
        bias = key_weight.clamp_min(0).log().clamp_min(floor).to(dtype)[:, None, None, :].expand_as(additive)
        self_key = torch.cat([torch.zeros(q, past, dtype=torch.bool, device=valid.device), diagonal], dim=1)
        additive = additive + torch.where(self_key[None, None], torch.zeros_like(bias), bias)
        additive = additive.clamp_min(floor)
    return additive
