"""ToMe: bipartite soft matching inside the ViT, size-weighted, with proportional attention."""
from __future__ import annotations

import math
from typing import Any

import torch

from vtprune.methods.base import Method, Param, register
from vtprune.models.base import Adapter
from vtprune.ops import bipartite_soft_matching, merge_destination, merge_weighted_mean
from vtprune.runtime.operators import ImageTokens, PreLLMContext, PreLLMOperator, Reduction, VisionOperator, VisionState


def _capacity(tokens: int) -> int:
    """Most merges one bipartite round can make with [CLS] protected."""
    return min(math.ceil(tokens / 2) - 1, tokens // 2)


def max_mergeable(tokens: int, blocks: int) -> int:
    """Most tokens ``blocks`` rounds can remove (every round at full capacity)."""
    removed = 0
    for _ in range(blocks):
        r = _capacity(tokens)
        removed, tokens = removed + r, tokens - r
    return removed


def merge_schedule(tokens: int, blocks: int, removed: int) -> list[int]:
    """Per-block merge counts that remove exactly ``removed`` of ``tokens`` ([CLS] included) over ``blocks``.

    Spreads merges evenly with the larger counts first (ToMe's decreasing schedule); a block takes more than its even
    share only when later blocks could not finish otherwise. 192 of 576 on CLIP-L (23 blocks before the feature
    layer) gives 16 x 17 + 7 x 16.
    """
    if removed > max_mergeable(tokens, blocks):
        raise ValueError(f"cannot merge {removed} tokens in {blocks} ViT blocks")
    schedule, remaining = [], removed
    for block in range(blocks):
        even = math.ceil(remaining / (blocks - block))
        # Smallest r after which the remaining blocks, at full capacity, can still finish.
        needed = next(r for r in range(_capacity(tokens) + 1)
                      if max_mergeable(tokens - r, blocks - block - 1) >= remaining - r)
        r = min(_capacity(tokens), max(even, needed))
        schedule.append(r)
        tokens, remaining = tokens - r, remaining - r
    return schedule


class _MergeBlocks(VisionOperator):
    def __init__(self, schedule: list[int], proportional_attention: bool) -> None:
        self.schedule = schedule
        # From the first merge on, every block needs proportional attention, merging or not.
        first = next(i for i, r in enumerate(schedule) if r > 0)
        self.blocks = tuple(range(first, len(schedule)))
        self.proportional_attention = proportional_attention

    def block_forward(self, adapter: Adapter, block: int, state: VisionState, hidden: torch.Tensor) -> torch.Tensor:
        bias = None
        # Sizes differ from 1 exactly once an earlier block merged (each records owner_after): a Python check, where
        # testing the sizes would cost a host sync per block.
        if self.proportional_attention and state.owner_after:
            # log(size) on every key: a token that stands for s patches gets the attention of s copies.
            bias = state.size.log().to(hidden.dtype)[:, None, None, :, 0]

        def merge(x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
            if self.schedule[block] == 0:
                return x
            plan = bipartite_soft_matching(keys, self.schedule[block], protect_first=True)
            x, state.size = merge_weighted_mean(plan, x, state.size)
            state.owner = merge_destination(plan, x.shape[1] + self.schedule[block]).gather(1, state.owner)
            state.owner_after[block] = state.owner
            return x

        return adapter.vision_block_step(block, hidden, bias, merge)


class _Order(PreLLMOperator):
    """Hands merged tokens to the LLM in raster order of their size-weighted mean source (or ToMe's own order)."""

    def __init__(self, order: str) -> None:
        self.order = order

    def reduce_image(self, ctx: PreLLMContext, index: int, image: ImageTokens) -> Reduction:
        order = torch.arange(len(image.features), device=image.features.device)
        if self.order == "raster":
            centre = image.sources.mean(torch.arange(len(image.layout), device=order.device))
            order = torch.sort(centre, stable=True).indices
        return Reduction.select(image, order)


@register
class ToMe(Method):
    """ToMe — Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023, arXiv 2210.09461.

    Stage: ``vision`` (inside every ViT block up to the feature block, between the attention residual and the MLP)
    plus a pre-LLM ordering step. Per block: bipartite soft matching on the block's head-mean keys (cosine); the
    ``r`` most similar A->B edges are merged by size-weighted average, [CLS] protected; sizes and provenance are
    carried across blocks; proportional attention adds log(size) to the keys' logits.

    Budget: ``keep``/``ratio`` give the visual tokens per ViT view exactly (LLaVA-1.5: per image; LLaVA-NeXT: the
    base image and every crop, minus what unpadding removes), with merges spread over the blocks before the feature
    layer, larger first (``merge_schedule``: 64/128/192 on CLIP-L/336). ``r`` instead gives ToMe's constant per-block
    count (default r=16 when no budget is given, as in LightCompress' LLaVA config). Order into the LLM:
    ``order='raster'`` (default) sorts tokens by the size-weighted mean index of their source patches so RoPE
    follows the image layout; ``'tome'`` keeps ToMe's [unmerged A, B] order (layouts with newline tokens are always
    raster). Positions: renumbered (pre-LLM reduction); ``'original'`` uses the rounded mean source position.
    Needs merging inside the vision tower: refused on Qwen2-VL, whose patch merger needs every 2x2 group intact.
    """

    name = "tome"
    paper = "arXiv 2210.09461 (ICLR 2023)"
    stages = ("vision", "pre_llm")
    budget_convention = "visual tokens per ViT view (336-px image or crop) entering the LLM"
    default_positions = "renumber"
    requires = frozenset({"vision_merge"})
    params = (
        Param("r", None, "constant merges per block (ToMe's own budget); used when keep and ratio are None", int,
              low=0),
        Param("proportional_attention", True, "add log(token size) to attention logits", bool, (True, False)),
        Param("order", "raster", "token order into the LLM", str, ("raster", "tome")),
    )

    def __init__(self, **values) -> None:
        super().__init__(**values)
        if self.r is not None and (self.keep is not None or self.ratio is not None):
            raise ValueError("tome: give either r= (merges per block) or a budget (keep= / ratio=), not both")

    def operators(self, adapter: Adapter) -> list:
        schedule = self.resolved(adapter)["schedule"]
        operators: list = [_Order(self.order)]
        if any(schedule):
            operators.insert(0, _MergeBlocks(schedule, self.proportional_attention))
        return operators

    def resolved(self, adapter: Adapter) -> dict[str, Any]:
        """``r`` (None when a budget sets the schedule) and ``schedule``, the merges in each ViT block up to the
        feature block on ``adapter``'s tower."""
        n = adapter.view_tokens
        blocks = adapter.default_feature_block + 1
        if self.keep is None and self.ratio is None:
            r = 16 if self.r is None else self.r
            tokens, schedule = n + 1, []
            for _ in range(blocks):
                schedule.append(min(r, _capacity(tokens)))
                tokens -= schedule[-1]
            return {"r": r, "schedule": schedule}
        self.check_budget(adapter, per="view")
        removed = n - self.budget(n)
        most = max_mergeable(n + 1, blocks)
        if removed > most:
            raise ValueError(
                f"tome: keep={n - removed} cannot be reached by merging in the {blocks} ViT blocks before the "
                f"feature layer; use keep >= {n - most}"
            )
        return {"r": None, "schedule": merge_schedule(n + 1, blocks, removed)}
