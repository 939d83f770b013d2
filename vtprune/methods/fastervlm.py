"""FasterVLM: keep the patches the ViT's [CLS] token attends to most."""
from __future__ import annotations

from vtprune.methods.base import ImageReducer, Method, register
from vtprune.methods.scoring import cls_attention
from vtprune.models.base import Adapter
from vtprune.ops import group_topk
from vtprune.runtime.operators import ImageTokens, PreLLMContext, Reduction


class _ClsTopK(ImageReducer):
    def reduce_image(self, ctx: PreLLMContext, index: int, image: ImageTokens) -> Reduction:
        scores = cls_attention(ctx, image)
        view = image.partition.masked_fill(scores == float("-inf"), -1)
        counts = image.partition.new_zeros(image.layout.num_partitions).scatter_add_(
            0, view.clamp_min(0), (view >= 0).long())
        keep = group_topk(scores[None], view[None], self.method.budgets(counts)[None])[0]
        return Reduction.select(image, keep.nonzero().flatten())


@register
class FasterVLM(Method):
    """FasterVLM — Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning",
    arXiv 2412.01818 **v1** (v2 of that id is a different method, VisPruner).

    Stage: ``pre_llm``. Score = head-mean [CLS] -> patch attention of the ViT block whose output feeds the projector
    (``vision_feature_layer=-2`` -> block 22 of CLIP-L; a per-call ``vision_feature_layer`` moves it), recomputed
    from that block's input through its own q/k (the [CLS] row only). Top ``keep`` per 336-px view (LLaVA-1.5: the
    image; LLaVA-NeXT: the base image and every crop, each with its own [CLS] row), kept in raster order; the LLM runs
    unmodified on the shorter sequence. Needs a [CLS] token: refused on Qwen2-VL.

    Defaults: ratio 0.25 (the README's R=75%, 144 of 576). Positions: renumbered, as the official LLaVA pipeline
    feeds the pruned sequence contiguously. LLaVA-NeXT newline tokens are all kept, as in the official code.
    Departure: on LLaVA-NeXT the official code ranks a crop's tokens before unpadding, so tokens in the padding are
    kept and then removed (fewer than ``keep``); here the ranking is among the tokens that reach the LLM, so every
    view keeps exactly ``keep`` (or all it has). Budget convention: visual tokens per view entering the LLM.
    """

    name = "fastervlm"
    paper = "arXiv 2412.01818 v1"
    stages = ("pre_llm",)
    budget_convention = "visual tokens per 336-px view entering the LLM (LLaVA-NeXT: base image and each crop)"
    default_ratio = 0.25
    default_positions = "renumber"
    default_separators = "keep"
    requires = frozenset({"cls"})

    def operators(self, adapter: Adapter) -> list:
        self.check_budget(adapter, per="view")
        return [_ClsTopK(self)]
