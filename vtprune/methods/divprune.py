"""DivPrune: keep a maximally diverse subset of the projected visual tokens."""
from __future__ import annotations

from vtprune.methods.base import POSITION_PARAM_DOC, Method, Param, register
from vtprune.models.base import Adapter
from vtprune.ops import max_min_diversity
from vtprune.runtime.operators import PreLLMContext, PreLLMOperator, Reduction


class _Diverse(PreLLMOperator):
    def __init__(self, method: Method) -> None:
        self.method = method

    def reduce(self, ctx: PreLLMContext) -> list[Reduction]:
        keep = self.method.budget(ctx.features.shape[1])
        return [
            Reduction.select(ctx.features[i], ctx.sources[i], max_min_diversity(ctx.features[i].detach(), keep))
            for i in range(ctx.features.shape[0])
        ]


@register
class DivPrune(Method):
    """DivPrune — Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models",
    CVPR 2025, arXiv 2503.02175.

    Stage: ``pre_llm``, on the *projected* visual tokens (LLM embedding space). Solves the max-min diversity problem
    greedily under cosine distance: first the token whose nearest neighbour is farthest, then repeatedly the token
    farthest from the selected set (float32, running min-distance vector; ties to the lowest index). Text-agnostic,
    needs no attention. Kept tokens in raster order.

    Defaults: ratio 0.098 (the repository's SUBSET_RATIO; 56 of 576). Positions: renumbered, as in the official
    LLaVA pipeline. Budget convention: visual tokens per image entering the LLM (selection is per image).
    """

    name = "divprune"
    paper = "arXiv 2503.02175 (CVPR 2025)"
    stages = ("pre_llm",)
    default_ratio = 0.098
    params = (Param("positions", "renumber", POSITION_PARAM_DOC, ("original", "renumber")),)

    def operators(self, adapter: Adapter) -> list:
        self.budget(adapter.tokens_per_image)
        return [_Diverse(self)]
