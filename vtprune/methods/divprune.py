"""DivPrune: keep a maximally diverse subset of the projected visual tokens."""
from __future__ import annotations

from vtprune.methods.base import ImageReducer, Method, register
from vtprune.models.base import Adapter
from vtprune.ops import max_min_diversity
from vtprune.runtime.operators import ImageTokens, PreLLMContext, Reduction


class _Diverse(ImageReducer):
    def reduce_image(self, ctx: PreLLMContext, index: int, image: ImageTokens) -> Reduction:
        keep = self.method.budget(len(image.features))
        return Reduction.select(image, max_min_diversity(image.features.detach(), keep))


@register
class DivPrune(Method):
    """DivPrune — Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models",
    CVPR 2025, arXiv 2503.02175.

    Stage: ``pre_llm``, on the *projected* visual tokens (LLM embedding space). Solves the max-min diversity problem
    greedily under cosine distance: first the token whose nearest neighbour is farthest, then repeatedly the token
    farthest from the selected set (float32, running min-distance vector; ties to the lowest index). Text-agnostic,
    needs no attention. Kept tokens in raster order. The selection is over all of an image's tokens jointly
    (LLaVA-NeXT: base image, crops and newline tokens, as the reference code does).

    Defaults: ratio 0.098 (the repository's SUBSET_RATIO; 56 of 576). Positions: renumbered, as in the official
    LLaVA pipeline (on Qwen2-VL the original 3-D positions, as LightCompress' Qwen2.5-VL port does). Budget
    convention: visual tokens per image entering the LLM (selection is per image).
    """

    name = "divprune"
    paper = "arXiv 2503.02175 (CVPR 2025)"
    stages = ("pre_llm",)
    default_ratio = 0.098
    default_positions = "renumber"
    default_separators = "candidates"

    def operators(self, adapter: Adapter) -> list:
        self.check_budget(adapter)
        return [_Diverse(self)]
