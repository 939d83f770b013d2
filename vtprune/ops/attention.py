"""Attention probabilities for a few query rows, recomputed from projected queries and keys.

Methods need attention rows (a ViT [CLS] row, an LLM last-token row) while the model keeps SDPA/Flash attention,
which return no weights. Recomputing only the rows needed costs O(q*n*d) instead of an eager n x n map.
"""
from __future__ import annotations

import torch


def attention_probs(
    query: torch.Tensor, key: torch.Tensor, scale: float, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention of ``query`` [B, H, q, d] over ``key`` [B, H_kv, n, d] -> [B, H, q, n] in float32.

    Grouped-query attention: each key head serves ``H // H_kv`` consecutive query heads (HF's ``repeat_kv``).
    ``key_mask`` [B, n] or [B, q, n] (True = visible) excludes padding / future keys. A row with no visible key
    (a padding query) gets all-zero probabilities instead of NaN, so averages over rows stay finite.
    """
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key heads")
    key = key.repeat_interleave(heads // kv_heads, dim=1)
    logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    if key_mask is not None:
        mask = key_mask[:, None, None, :] if key_mask.dim() == 2 else key_mask[:, None]
        logits = logits.masked_fill(~mask, float("-inf"))
        return logits.softmax(dim=-1).nan_to_num(0.0)
    return logits.softmax(dim=-1)


def reweight_keys(probs: torch.Tensor, key_weight: torch.Tensor) -> torch.Tensor:
    """Attention ``probs`` [B, ..., q, n] of queries at the last ``q`` positions, recomputed as if ``log(weight)`` had
    been added to every key's logit, the diagonal exempt: ``p_ij * w_j / sum_k p_ik * w_k``. ``key_weight`` [B, n];
    query i is taken to be token ``n - q + i`` (square maps: q = n). This is the runtime's training-mode soft mask,
    so rows recomputed without it match what the masked layer computed; a weight of 0 equals a dropped key."""
    n, q = probs.shape[-1], probs.shape[-2]
    weight = key_weight.float().reshape(key_weight.shape[0], *([1] * (probs.dim() - 2)), n).expand_as(probs).clone()
    own = torch.arange(n - q, n, device=probs.device)
    weight[..., torch.arange(q, device=probs.device), own] = 1.0
    weighted = probs * weight
    return weighted / weighted.sum(-1, keepdim=True).clamp_min(1e-30)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The Llama RoPE helper: (x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x`` [B, H, n, d] with ``cos``/``sin`` [B, n, r] (r <= d: partial rotary, as Phi-3 uses, rotates
    the first r dims and passes the rest), in ``x``'s dtype like the models' own ``apply_rotary_pos_emb``."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    head, tail = x[..., :rotary], x[..., rotary:]
    return torch.cat([head * cos + rotate_half(head) * sin, tail], dim=-1)
