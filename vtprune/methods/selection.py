"""Pre-LLM baselines: random tokens, a uniform sub-grid, grid pooling."""
from __future__ import annotations

import torch

from vtprune.methods.base import ImageReducer, Method, Param, register
from vtprune.models.base import Adapter
from vtprune.ops import (
    Sources,
    pool_budgets,
    pool_grid,
    pool_grid_shape,
    random_indices,
    split_budget,
    uniform_grid_indices,
)
from vtprune.runtime.operators import ImageTokens, PreLLMContext, Reduction


class _Random(ImageReducer):
    def reduce_image(self, ctx: PreLLMContext, index: int, image: ImageTokens) -> Reduction:
        n = len(image.features)
        return Reduction.select(image, random_indices(1, n, self.method.budget(n), ctx.generator(index))[0])


@register
class RandomKeep(Method):
    """Random visual tokens, a sanity baseline.

    Stage: pre-LLM. Keeps ``keep`` tokens per image uniformly at random, in raster order. The draw is seeded by
    ``seed`` and the image's pixels (rounded to bfloat16), so an image gets the same tokens alone or in any batch,
    in fp32 or bf16. Budget: tokens per image entering the LLM. Default ratio 0.25 (144 of 576).
    """

    name = "random"
    paper = "baseline (no paper)"
    stages = ("pre_llm",)
    params = (Param("seed", 0, "seed of the pruner's random generator", int),)

    def operators(self, adapter: Adapter) -> list:
        self.check_budget(adapter)
        return [_Random(self)]


def _grids(image: ImageTokens) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """(candidate positions in raster order, (height, width)) of each of the image's grids."""
    return [(image.raster(g), shape) for g, shape in enumerate(image.layout.grid_shapes)]


class _Uniform(ImageReducer):
    def reduce_image(self, ctx: PreLLMContext, index: int, image: ImageTokens) -> Reduction:
        grids = _grids(image)
        shares = split_budget(self.method.budget(len(image.features)), [h * w for _, (h, w) in grids])
        keep = [raster[uniform_grid_indices(h, w, k).to(raster.device)]
                for (raster, (h, w)), k in zip(grids, shares) if k]
        return Reduction.select(image, torch.cat(keep).sort().values)


@register
class UniformKeep(Method):
    """A regular 2-D sub-grid of the patch grid (position-only baseline).

    Stage: pre-LLM. ``keep`` lattice points at cell centres (64 on 24x24 = stride 3); when the lattice has more
    points than ``keep`` the surplus is removed at evenly spaced lattice points. An image with several grids
    (LLaVA-NeXT: base image and the crop canvas; Qwen video: frames) shares the budget among them in proportion to
    their size. Budget: tokens per image entering the LLM. Default ratio 0.25.
    """

    name = "uniform"
    paper = "baseline (no paper)"
    stages = ("pre_llm",)

    def operators(self, adapter: Adapter) -> list:
        self.check_budget(adapter)
        return [_Uniform(self)]


class _Pool(ImageReducer):
    def reduce_image(self, ctx: PreLLMContext, index: int, image: ImageTokens) -> Reduction:
        grids = _grids(image)
        shares = pool_budgets(self.method.budget(len(image.features)), [shape for _, shape in grids])
        features, sources = [], []
        for (raster, shape), k in zip(grids, shares):
            if k:
                pooled, weights = pool_grid(image.features[raster][None], shape, pool_grid_shape(*shape, k))
                features.append(pooled[0])
                sources.append(image.sources.select(raster).compose(Sources.from_dense(weights)))
        return Reduction(torch.cat(features), Sources.cat(sources))


@register
class GridPool(Method):
    """Average pooling of the projected patch grid — the downsampling baseline.

    Stage: pre-LLM. keep=144 on a 24x24 grid is 2x2 average pooling (12x12), the baseline that matches or beats many
    pruning methods (e.g. as reported by LLaVA-NeXT / LLaVA-Video style pooling studies). Other budgets pool to the
    ``h x w = keep`` grid closest in aspect ratio (64 -> 8x8, 128 -> 8x16) with adaptive average pooling. An image
    with several grids splits the budget among them near their size ratio, each share an exact h*w. Budget: tokens
    per image entering the LLM; a budget that no grid split can realise raises an error naming it. Default ratio 0.25
    (2x2 pooling). Positions: a pooled token takes the rounded mean position of its window; default 'renumber', as a
    pooled grid is a new image.
    """

    name = "pool"
    paper = "baseline: 2x2 average pooling of visual tokens"
    stages = ("pre_llm",)
    default_positions = "renumber"

    def operators(self, adapter: Adapter) -> list:
        self.check_budget(adapter)
        if adapter.fixed_tokens_per_image is not None:
            pool_grid_shape(*adapter.grid, self.budget(adapter.fixed_tokens_per_image))
        return [_Pool(self)]
