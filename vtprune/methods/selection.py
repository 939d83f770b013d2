"""Pre-LLM selection baselines: random, uniform sub-grid, grid pooling."""
from __future__ import annotations

import torch

from vtprune.methods.base import POSITION_PARAM_DOC, Method, Param, register
from vtprune.models.base import Adapter
from vtprune.ops import pool_grid, pool_grid_shape, random_indices, uniform_grid_indices
from vtprune.runtime.operators import PreLLMContext, PreLLMOperator, Reduction


class _Select(PreLLMOperator):
    """Keeps, per image, the indices returned by ``choose`` (in raster order)."""

    def __init__(self, method: Method, choose) -> None:
        self.method, self.choose = method, choose

    def reduce(self, ctx: PreLLMContext) -> list[Reduction]:
        keep = self.method.budget(ctx.features.shape[1])
        return [
            Reduction.select(ctx.features[i], ctx.sources[i], self.choose(ctx, i, keep).to(ctx.features.device))
            for i in range(ctx.features.shape[0])
        ]


@register
class RandomKeep(Method):
    """Random visual tokens, a sanity baseline.

    Stage: pre-LLM. Keeps ``keep`` tokens per image uniformly at random, in raster order. The draw is seeded by
    ``seed`` and the image's pixels, so an image gets the same tokens alone or in any batch. Budget: tokens per image entering the LLM. Default ratio 0.25 (144 of 576).
    """

    name = "random"
    paper = "baseline (no paper)"
    stages = ("pre_llm",)
    params = (
        Param("seed", 0, "seed of the pruner's random generator"),
        Param("positions", "original", POSITION_PARAM_DOC, ("original", "renumber")),
    )

    def operators(self, adapter: Adapter) -> list:
        self.budget(adapter.tokens_per_image)
        return [_Select(self, lambda ctx, i, k: random_indices(1, ctx.features.shape[1], k, ctx.generator(i))[0])]


@register
class UniformKeep(Method):
    """A regular 2-D sub-grid of the patch grid (position-only baseline).

    Stage: pre-LLM. ``keep`` lattice points at cell centres (64 on 24x24 = stride 3); when the lattice has more
    points than ``keep`` the surplus is removed at evenly spaced lattice points. Budget: tokens per image entering the
    LLM. Default ratio 0.25.
    """

    name = "uniform"
    paper = "baseline (no paper)"
    stages = ("pre_llm",)
    params = (Param("positions", "original", POSITION_PARAM_DOC, ("original", "renumber")),)

    def operators(self, adapter: Adapter) -> list:
        self.budget(adapter.tokens_per_image)
        height, width = adapter.grid
        return [_Select(self, lambda ctx, i, k: uniform_grid_indices(height, width, k))]


class _Pool(PreLLMOperator):
    def __init__(self, method: Method, grid: tuple[int, int]) -> None:
        self.method, self.grid = method, grid

    def reduce(self, ctx: PreLLMContext) -> list[Reduction]:
        out_grid = pool_grid_shape(*self.grid, self.method.budget(ctx.features.shape[1]))
        pooled, weights = pool_grid(ctx.features, self.grid, out_grid)
        sources = torch.einsum("kn,bnm->bkm", weights.to(ctx.sources.dtype), ctx.sources)
        return [Reduction(pooled[i], sources[i]) for i in range(pooled.shape[0])]


@register
class GridPool(Method):
    """Average pooling of the projected patch grid — the downsampling baseline.

    Stage: pre-LLM. keep=144 on a 24x24 grid is 2x2 average pooling (12x12), the baseline that matches or beats many
    pruning methods (e.g. as reported by LLaVA-NeXT / LLaVA-Video style pooling studies). Other budgets pool to the
    ``h x w = keep`` grid closest in aspect ratio (64 -> 8x8, 128 -> 8x16) with adaptive average pooling.
    Budget: tokens per image entering the LLM, must factor as h*w. Default ratio 0.25 (2x2 pooling). Positions: a
    pooled token takes the rounded mean position of its window; default 'renumber', as a pooled grid is a new image.
    """

    name = "pool"
    paper = "baseline: 2x2 average pooling of visual tokens"
    stages = ("pre_llm",)
    params = (Param("positions", "renumber", POSITION_PARAM_DOC, ("original", "renumber")),)

    def operators(self, adapter: Adapter) -> list:
        pool_grid_shape(*adapter.grid, self.budget(adapter.tokens_per_image))
        return [_Pool(self, adapter.grid)]
