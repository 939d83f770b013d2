"""HiRED: a budget split over LLaVA-NeXT's views by where the content lies, then [CLS]-attention top-k in each."""
from __future__ import annotations

from typing import Any

import torch

from vtprune.methods.base import ImageReducer, Method, Param, register
from vtprune.methods.scoring import cls_attention
from vtprune.models.base import Adapter
from vtprune.ops import group_topk, rate_budget, region_index, region_scores, view_budgets
from vtprune.ops.allocation import CONTENT_SCORES, REGION_MAPS
from vtprune.runtime.operators import ImageTokens, PreLLMContext, Reduction


class _HiREDSelect(ImageReducer):
    def reduce_image(self, ctx: PreLLMContext, index: int, image: ImageTokens) -> Reduction:
        method, layout = self.method, image.layout
        partition = image.partition  # -1: a separator (no candidate)
        grid = layout.crop_grid
        views = 1 + grid[0] * grid[1] if grid else layout.num_partitions
        counts = torch.zeros(views, dtype=torch.long, device=partition.device).scatter_add_(
            0, partition.clamp_min(0), (partition >= 0).long()).tolist()
        height, width = layout.grid_shapes[0]  # one view's grid (the base view on LLaVA-NeXT)
        budget = method.image_budget(views, height * width)
        if budget >= sum(counts):  # nothing to drop: the image goes in whole, separators and all
            return Reduction.select(image, torch.arange(len(image.sources), device=image.features.device))
        content = self._content(ctx, image, grid, height, width).tolist() if grid else None
        budgets = view_budgets(budget, method.alpha, counts, content, method.redistribute)
        scores = cls_attention(ctx, image, method.l_final)
        keep = group_topk(scores[None], partition[None], torch.tensor([budgets], device=partition.device))[0]
        return Reduction.select(image, keep.nonzero().flatten())

    def _content(self, ctx: PreLLMContext, image: ImageTokens, grid: tuple[int, int], height: int,
                 width: int) -> torch.Tensor:
        """Each sub-image's content score, read on the base view's tokens with block ``l_init``'s [CLS] row."""
        method = self.method
        base = (image.partition == 0).nonzero().flatten()
        where = image.sources.strongest()[base]
        region = region_index(image.layout.row[where], image.layout.col[where], height, width, grid,
                              method.allocation_map)
        scores = cls_attention(ctx, image, method.l_init)[base]
        top = int(len(base) * (1 - method.alpha))  # topk_count: the official code's top int(T * (1 - alpha))
        return region_scores(scores, region, grid[0] * grid[1], method.content_score, top)


@register
class HiRED(Method):
    """HiRED — Arif et al., "HiRED: Attention-Guided Token Dropping for Efficient Inference of High-Resolution
    Vision-Language Models", AAAI 2025, arXiv 2408.10945.

    Stage: ``pre_llm`` (training-free early dropping; the LLM runs unmodified on the shorter sequence). Needs a ViT
    [CLS] token: refused on Qwen2-VL. Two phases per image (LLaVA-NeXT):

    1. Budget allocation: the whole-image view (the base) gets ``floor(alpha * B)`` (at most its tokens; the rest
       goes on), the sub-images share what is left in proportion to their *content score*, read from the base's
       [CLS] attention in ViT block ``l_init``: each sub-image owns the base tokens showing its region of the image
       (``allocation_map``). Each share is floored and capped at the sub-image's tokens; leftovers are not
       redistributed (the paper), unless ``redistribute=True``.
    2. Selection: inside every view, the top-N tokens by [CLS] attention of block ``l_final`` (default the block
       feeding the projector: 22 of CLIP-L's 24 for ``vision_feature_layer=-2``; a per-call layer moves it), each
       view ranked by its own [CLS] row, kept in raster order. Scores are float32, recomputed from the blocks' own
       q/k (no eager attention). The head mean is the paper's head sum divided by the head count: the same ranking
       and proportions (exactly so for 16 heads; near-ties aside otherwise).

    LLaVA-1.5 (one view): the paper's single-partition variant, the top-N of the image by block ``l_final``.

    Budget: ``keep`` = B, visual tokens per image entering the LLM over all its views (the paper's N_budget;
    newlines not counted), at most: flooring can leave a few unused. ``ratio`` = the official code's rate:
    ``B = int(P * T * ratio)`` with P views counting the base and T = 576 tokens per view (LLaVA-NeXT 2x2 at 0.2:
    576, 1x2: 345; LLaVA-1.5: ``int(576 * ratio)``). A budget covering every token the image sends to the LLM
    keeps the image whole, exactly the unpruned model (the official code switches off at rate 1.0).

    Defaults (the paper's): alpha 0.5, l_init 0, l_final the feature block, the 2-D region map, the attention-sum
    content score, ratio 0.2 (the 20% headline; the official code is off unless a rate is given). Positions:
    renumbered, as the official code splices the shortened sequence in. Newlines: ``separators='keep'`` (the
    model's packing: every canvas row still ends in its newline, outside the budget); ``'drop'`` packs like the
    official code, without newlines (an image kept whole keeps them).

    Departures from the official code (github.com/hasanar1f/HiRED):
    - region map: the code maps contiguous raster chunks of the base grid to the sub-images, i.e. horizontal
      bands, wrong for 1x2, 1x3 and 2x2 grids; the default is the paper's 2-D map (sub-image (r, c) <- base rows
      [r*H/R, (r+1)*H/R) x cols [c*W/C, (c+1)*W/C)); ``allocation_map='reference_bands'`` reproduces the code.
    - content score: the code counts a region's tokens among the top ``int(T * (1 - alpha))`` of the block-0 row
      (``content_score='topk_count'``; ties to the lower index); the default sums the attention (the paper). When
      no region scores (the code divides by zero, e.g. alpha=1 with counts), the sub-images split evenly.
    - unpadding: the code ranks a sub-image's tokens before unpadding and then removes kept tokens lying in the
      padding; here ranking and caps are over the tokens that reach the LLM, so padding never takes budget.
    - per image: the code's LLaVA-1.5 path applies sample 0's selection to the whole batch; here every image is
      ranked on its own (batch-invariant).
    - a NeXT image with no crops is ranked like a single view (the code leaves it as it is); a budget covering
      every token bypasses HiRED (the code re-splits any budget at a rate below 1).
    """

    name = "hired"
    paper = "arXiv 2408.10945 (AAAI 2025)"
    stages = ("pre_llm",)
    budget_convention = ("visual tokens per image entering the LLM, over all its views (at most: shares are "
                         "floored); ratio: int(views * 576 * ratio), views counting the base image")
    default_ratio = 0.2
    default_positions = "renumber"
    default_separators = "keep"
    requires = frozenset({"cls"})
    params = (
        Param("alpha", 0.5, "share of the budget for the whole-image (base) view", float, low=0, high=1),
        Param("l_init", 0, "ViT block whose [CLS] attention on the base view scores the sub-images' content", int,
              low=0),
        Param("l_final", None, "ViT block whose [CLS] attention ranks tokens inside every view (None: the block "
              "feeding the projector)", int, low=0),
        Param("allocation_map", "paper_2d", "base tokens each sub-image's content score reads: 'paper_2d' (its "
              "region of the image) or 'reference_bands' (the official code's raster chunks)", str, REGION_MAPS),
        Param("content_score", "attention_sum", "'attention_sum' (the paper) or 'topk_count' (the official code: "
              "tokens among the top int(T*(1-alpha)))", str, CONTENT_SCORES),
        Param("redistribute", False, "hand what flooring and caps leave over to the views that still have room "
              "(False: the paper)", bool),
    )

    def image_budget(self, views: int, view_tokens: int) -> int:
        """B for an image of ``views`` views of ``view_tokens`` tokens each: ``keep``, or ``int(views * view_tokens *
        ratio)``."""
        if self.keep is not None:
            return self.keep
        return rate_budget(self.ratio if self.ratio is not None else self.default_ratio, views, view_tokens)

    def operators(self, adapter: Adapter) -> list:
        self.check_budget(adapter)
        depth = len(adapter.vision_layers)
        for name in ("l_init", "l_final"):
            block = getattr(self, name)
            if block is not None and block >= depth:
                raise ValueError(f"{self.name}: {name}={block} is out of range; this vision tower has {depth} blocks "
                                 f"(use 0..{depth - 1})")
        return [_HiREDSelect(self)]

    def resolved(self, adapter: Adapter) -> dict[str, Any]:
        if not self.requires <= adapter.capabilities:
            return {}
        out = {"l_init": self.l_init, "l_final": self.l_final if self.l_final is not None
               else getattr(adapter, "default_feature_block", None)}
        fixed = adapter.fixed_tokens_per_image
        if fixed is not None:  # one view: the budget is one number
            out["keep_per_image"] = min(fixed, self.image_budget(1, fixed))
        return out
