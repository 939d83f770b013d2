"""FastV: drop visual tokens inside the LLM by the attention they receive at layer K-1."""
from __future__ import annotations

import torch

from vtprune.methods.base import POSITION_PARAM_DOC, Method, Param, register, scaled_layer
from vtprune.models.base import Adapter
from vtprune.ops import topk_indices
from vtprune.runtime.operators import LayerContext, LayerOperator


class _FastVDrop(LayerOperator):
    def __init__(self, method: "FastV", layer: int, tokens_per_image: int) -> None:
        self.method, self.layers, self.tokens_per_image = method, (layer,), tokens_per_image

    def scores(self, ctx: LayerContext) -> torch.Tensor:
        """Score per token [B, n]: head-mean attention from the chosen query rows of layer K-1."""
        return ctx.attention_from(self.method.query)

    def select(self, ctx: LayerContext) -> torch.Tensor:
        scores = self.scores(ctx).masked_fill(~ctx.visual, -float("inf"))
        keep = torch.zeros_like(ctx.visual)
        per_image = self.method.budget(self.tokens_per_image)
        for b in range(scores.shape[0]):
            images = int(ctx.original_visual[b]) // self.tokens_per_image
            k = min(per_image * images, int(ctx.visual[b].sum()))
            keep[b, topk_indices(scores[b], k)] = True
        return keep


@register
class FastV(Method):
    """FastV — Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024, arXiv 2403.06764.

    Stage: ``layer`` (LLM prefill). Before decoder layer K, visual tokens are ranked by the head-mean attention they
    receive from the last prompt token at layer K-1 (the official code's row; ``query='all'`` / ``'text'`` give the
    paper text's variants), recomputed from layer K-1's own q/k with RoPE and GQA — no eager attention. The top
    ``keep`` per image survive for all later layers and for decoding (in-place drop + KV cache variant); others
    are gone from layers >= K. Text tokens are never dropped.

    Defaults (paper headline): K=2 for a 32-layer LLM, scaled proportionally to other depths
    (``max(1, round(2 * L / 32))``); ratio 0.5 (R=50%). Positions: original RoPE positions (as in the official code).
    Budget convention (a): ``keep`` = visual tokens per image kept *after* layer K; layers < K see all of them.
    The layer-averaged equivalent is ``pruner.stats.mean_visual_tokens``.
    """

    name = "fastv"
    paper = "arXiv 2403.06764 (ECCV 2024)"
    stages = ("layer",)
    budget_convention = "visual tokens per image kept after layer K (layers < K see all)"
    default_ratio = 0.5
    params = (
        Param("layer", None, "K: tokens are dropped before decoder layer K (None: 2 of 32, scaled to the depth)"),
        Param("query", "last", "attention rows that score tokens", ("last", "all", "text")),
        Param("positions", "original", POSITION_PARAM_DOC, ("original", "renumber")),
    )

    def operators(self, adapter: Adapter) -> list:
        self.budget(adapter.tokens_per_image)
        depth = len(adapter.decoder_layers)
        layer = self.layer if self.layer is not None else scaled_layer(2, 32, depth)
        return [_FastVDrop(self, layer, adapter.tokens_per_image)]
