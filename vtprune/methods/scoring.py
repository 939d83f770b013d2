"""Attention-based scores the methods share, computed from rows the adapter recomputes (no eager attention)."""
from __future__ import annotations

import torch

from vtprune.runtime.operators import ImageTokens, LayerContext, PreLLMContext


def cls_attention(ctx: PreLLMContext, image: ImageTokens, block: int | None = None) -> torch.Tensor:
    """Head-mean [CLS] -> patch attention of vision ``block`` (default: the block feeding the projector, for the
    call's ``vision_feature_layer``) for each of the image's candidate tokens [k], in float32. Every view (LLaVA-NeXT:
    base image and each crop) has its own [CLS] row; a separator token has none and scores -inf."""
    trace = image.record.trace
    block = trace.feature_block if block is None else block
    query = torch.zeros(1, dtype=torch.long, device=image.features.device)
    rows = ctx.adapter.vision_attention(trace, block, query)[:, :, 0].mean(dim=1)  # [views, 1 + T]
    per_vision_token = rows[:, 1:].reshape(-1)
    vision_index = image.layout.vision_index[image.sources.index[:, 0]]
    return torch.where(vision_index >= 0, per_vision_token[vision_index.clamp_min(0)], float("-inf"))


def attention_received(ctx: LayerContext, query: str = "last", *, layer: str = "previous", rope: bool = True,
                       keys: str = "causal", query_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Head-mean attention each token receives [B, n], recomputed from a decoder layer's own q/k with GQA.

    ``layer``: ``"previous"`` (layer ``ctx.layer - 1`` on its input: the attention that layer computed, FastV and
    FEATHER) or ``"current"`` (layer ``ctx.layer`` on the tokens about to enter it: the attention it is about to
    compute, PyramidDrop). ``query``: ``"last"`` (the last prompt token's row), ``"text"`` (mean over the text tokens
    after the first visual token), ``"all"`` (mean over all real rows) or ``"rows"`` (mean over the given
    ``query_rows`` [B, q], indices into the current tokens, -1: none; not cached). ``rope``: False scores q and k
    without their rotary embedding (FEATHER). ``keys``: ``"causal"`` (softmax over every key a row sees) or ``"visual"``
    (over the visual tokens only; other tokens score 0). Padding rows never count, so a left-padded row scores like
    the same prompt alone. Cached per option set in ``ctx.cache``.
    """
    if (query == "rows") != (query_rows is not None):
        raise ValueError("attention_received: query='rows' takes query_rows (and only it does)")
    cache_key = ("attention_received", query, layer, rope, keys)
    if query != "rows" and cache_key in ctx.cache:
        return ctx.cache[cache_key]
    if layer == "previous":
        if ctx.previous_input is None:
            raise RuntimeError("attention_received(layer='previous') needs the input of the previous layer "
                               "(layer >= 1)")
        hidden, positions_rope = ctx.previous_input
        index = ctx.layer - 1
    else:
        hidden, positions_rope, index = ctx.hidden_states, ctx.rope, ctx.layer
    batch, n = ctx.valid.shape
    order = torch.arange(n, device=ctx.valid.device)
    if query == "rows":
        rows = query_rows.clamp_min(0)
    elif query == "last":
        rows = torch.full((batch, 1), n - 1, device=ctx.valid.device)
    else:
        rows = order.expand(batch, n)
    key_mask = (order[None, :] <= rows[..., None]) & ctx.valid[:, None, :]
    if keys == "visual":
        key_mask &= ctx.visual[:, None, :]
    # The previous layer's keys with its own RoPE are in the KV cache: read, not projected again over every token.
    keys = ctx.adapter.cached_keys(ctx.kv_cache, index, hidden.shape[1]) if layer == "previous" and rope else None
    probs = ctx.adapter.llm_attention(index, hidden, positions_rope if rope else None, rows, key_mask,
                                      keys=keys).mean(1)
    if query == "last":
        score = probs[:, 0]
    elif query == "rows":
        use = (query_rows >= 0).to(probs.dtype)
        return (probs * use[..., None]).sum(1) / use.sum(1, keepdim=True).clamp_min(1)
    else:
        first_visual = torch.where(ctx.visual.any(1), ctx.visual.float().argmax(1), n)
        use = ctx.valid.clone()
        if query == "text":
            use &= ~ctx.visual & (order[None, :] > first_visual[:, None])
        score = (probs * use[..., None]).sum(1) / use.sum(1, keepdim=True).clamp_min(1)
    ctx.cache[cache_key] = score
    return score
