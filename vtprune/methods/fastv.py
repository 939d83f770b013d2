"""FastV: drop visual tokens inside the LLM by the attention they receive at layer K-1."""
from __future__ import annotations

from vtprune.methods.base import Method, Param, register, scaled_layer
from vtprune.methods.scoring import attention_received
from vtprune.models.base import Adapter
from vtprune.ops import group_topk
from vtprune.runtime.operators import LayerContext, LayerOperator, Transition


class _FastVDrop(LayerOperator):
    def __init__(self, method: FastV, layer: int) -> None:
        self.method, self.layers = method, (layer,)

    def scores(self, ctx: LayerContext):
        """Score per token [B, n]: head-mean attention from the chosen query rows of layer K-1."""
        return attention_received(ctx, self.method.query, rope=self.method.criterion_rope)

    def transform(self, ctx: LayerContext) -> Transition:
        group = ctx.image.masked_fill(~ctx.candidate, -1)
        keep = group_topk(self.scores(ctx), group, self.method.budgets(ctx.image_candidates))
        return Transition(keep=keep)


@register
class FastV(Method):
    """FastV — Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024, arXiv 2403.06764.

    Stage: ``layer`` (LLM prefill). Before decoder layer K, visual tokens are ranked by the head-mean attention they
    receive from the last prompt token at layer K-1 (the official code's row; ``query='all'`` / ``'text'`` give the
    paper text's variants), recomputed from layer K-1's own q/k with RoPE and GQA — no eager attention. The top
    ``keep`` of every image survive for all later layers and for decoding (in-place drop + KV cache variant);
    others are gone from layers >= K. Text tokens are never dropped.

    Defaults (paper headline): K=2 for a 32-layer LLM, scaled proportionally to other depths
    (``max(1, round(2 * L / 32))``); ratio 0.5 (R=50%). Positions: original RoPE positions (as in the official code);
    ``positions='renumber'`` renumbers the survivors for layers >= K (layers < K keep the original positions, each
    layer then decodes with its own). LLaVA-NeXT newline tokens are ranked like any image token (the official code
    prunes the whole image span). Budget convention (a): ``keep`` = visual tokens *per image* kept after layer K (the
    official code ranks one prompt's images jointly; per image keeps every image represented); layers < K see all.
    The layer-averaged equivalent is ``pruner.stats.mean_visual_tokens``.

    ``criterion_rope=False`` is the "FastV w/o RoPE" ablation of FEATHER (Endo et al., arXiv 2412.13180): the
    ranking uses q and k without their rotary embedding, which removes RoPE's preference for the image tokens nearest
    the text (the bottom rows); the model's own forward keeps RoPE.
    """

    name = "fastv"
    paper = "arXiv 2403.06764 (ECCV 2024)"
    stages = ("layer",)
    budget_convention = "visual tokens per image kept after layer K (layers < K see all)"
    default_ratio = 0.5
    default_separators = "candidates"
    params = (
        Param("layer", None, "K: tokens are dropped before decoder layer K (None: 2 of 32, scaled to the depth)", int,
              low=0),
        Param("query", "last", "attention rows that score tokens", str, ("last", "all", "text")),
        Param("criterion_rope", True, "score with RoPE on q and k (False: FEATHER's no-RoPE ablation)", bool),
    )

    def operators(self, adapter: Adapter) -> list:
        self.check_budget(adapter)
        return [_FastVDrop(self, self.resolved(adapter)["layer"])]

    def resolved(self, adapter: Adapter) -> dict[str, int]:
        depth = len(adapter.decoder_layers)
        return {"layer": self.layer if self.layer is not None else scaled_layer(2, 32, depth)}
