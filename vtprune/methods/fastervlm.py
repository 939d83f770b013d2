"""FasterVLM: keep the patches the ViT's [CLS] token attends to most."""
from __future__ import annotations

from vtprune.methods.base import POSITION_PARAM_DOC, Method, Param, register
from vtprune.models.base import Adapter
from vtprune.ops import topk_indices
from vtprune.runtime.operators import PreLLMContext, PreLLMOperator, Reduction


class _ClsTopK(PreLLMOperator):
    def __init__(self, method: Method) -> None:
        self.method = method

    def reduce(self, ctx: PreLLMContext) -> list[Reduction]:
        keep = topk_indices(ctx.cls_attention, self.method.budget(ctx.features.shape[1]))
        return [Reduction.select(ctx.features[i], ctx.sources[i], keep[i]) for i in range(keep.shape[0])]


@register
class FasterVLM(Method):
    """FasterVLM — Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning",
    arXiv 2412.01818 **v1** (v2 of that id is a different method, VisPruner).

    Stage: ``pre_llm``. Score = head-mean [CLS] -> patch attention of the ViT block whose output feeds the projector
    (``vision_feature_layer=-2`` -> block 22 of CLIP-L), recomputed from that block's input through its own q/k
    (the [CLS] row only). Top ``keep`` per image, kept in raster order; the LLM runs unmodified on the shorter
    sequence.

    Defaults: ratio 0.25 (the README's R=75%, 144 of 576). Positions: renumbered, as the official LLaVA pipeline
    feeds the pruned sequence contiguously. Budget convention: visual tokens per image entering the LLM.
    """

    name = "fastervlm"
    paper = "arXiv 2412.01818 v1"
    stages = ("pre_llm",)
    default_ratio = 0.25
    params = (Param("positions", "renumber", POSITION_PARAM_DOC, ("original", "renumber")),)

    def operators(self, adapter: Adapter) -> list:
        self.budget(adapter.tokens_per_image)
        return [_ClsTopK(self)]
