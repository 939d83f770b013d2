"""FEATHER: two in-LLM cuts ranked by last-token attention without RoPE, with a uniform grid kept at the first."""
from __future__ import annotations

import torch

from vtprune.methods.base import Method, Param, register, scaled_layer
from vtprune.methods.scoring import attention_received
from vtprune.models.base import Adapter
from vtprune.ops import group_topk
from vtprune.runtime.operators import LayerContext, LayerOperator, Transition

PAPER_LAYERS = (8, 16)  # of 32
PAPER_KEEP_FRACTION = 0.3  # f = 1 - r, r = 0.7


@register
class Feather(Method):
    """FEATHER — Endo, Wang, Yeung-Levy, "Feather the Throttle: Revisiting Visual Token Pruning for Vision-Language
    Model Acceleration", ICCV 2025, arXiv 2412.13180.

    Stage: ``layer`` (LLM prefill), two cuts. Before each cut layer k, image tokens are ranked by the attention the
    last prompt token pays them in layer k-1, recomputed from that layer's q/k **without RoPE**, softmax over the
    image keys only, mean over heads (the official criterion; the model's own forward keeps RoPE). The first cut
    keeps the top ``floor(N*f)`` plus a uniform grid (every ``stride``-th row and column of each image grid, or of
    each view on LLaVA-NeXT); the second keeps the top ``floor(N*f^2)`` of the survivors, uniform tokens not
    protected (as coded; the paper's comment says otherwise). N = the image's tokens entering the LLM.

    Defaults (the paper's): cuts before layers 8 and 16 of 32 (scaled to the depth), f = 0.3 (``--fastv_ratio
    0.7``), stride 3, original positions, LLaVA-NeXT newline tokens kept while a token of their row survives (the
    paper's model has none). Budget convention: ``keep`` = image tokens per image alive after the second cut
    (``floor(N*f^2)``), so f = sqrt(keep/N) and the first cut keeps ``floor(sqrt(keep*N))`` plus the grid; ``ratio``
    = f^2 (default 0.09). The layer-averaged count depends on how much the grid overlaps the top tokens and is in
    ``pruner.stats.mean_visual_tokens``. ``criterion_rope=True`` gives the FastV-style criterion (an ablation).
    """

    name = "feather"
    paper = "arXiv 2412.13180 (ICCV 2025)"
    stages = ("layer",)
    budget_convention = "image tokens per image alive after the second cut (floor(N*f^2)); the first keeps more"
    default_ratio = PAPER_KEEP_FRACTION ** 2
    default_positions = "original"
    default_separators = "rows"
    params = (
        Param("layers", None, "the two cut layers (None: 8 and 16 of 32, scaled to the depth)", tuple, low=1),
        Param("stride", 3, "uniform grid kept at the first cut: every stride-th row and column", int, low=1),
        Param("criterion_rope", False, "score with RoPE on q and k (True: the FastV criterion, an ablation)", bool),
    )

    def operators(self, adapter: Adapter) -> list:
        self.check_budget(adapter)
        return [_FeatherCut(self, tuple(self.resolved(adapter)["layers"]))]

    def resolved(self, adapter: Adapter) -> dict[str, object]:
        depth = len(adapter.decoder_layers)
        layers = self.layers or tuple(scaled_layer(k, 32, depth) for k in PAPER_LAYERS)
        if len(layers) != 2 or len(set(layers)) != 2 or layers[1] >= depth:
            raise ValueError(f"feather: needs two distinct cut layers in 1..{depth - 1} on this {depth}-layer model; "
                             f"got layers={layers}; pass layers=(k1, k2)")
        out: dict[str, object] = {"layers": list(layers), "stride": self.stride}
        fixed = adapter.fixed_tokens_per_image
        if fixed is not None:
            first, second = self.cut_budgets(torch.tensor([fixed]))
            out.update(top_at_first_cut=int(first), alive_after_second_cut=int(second))
        return out

    def cut_budgets(self, visual_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top tokens kept at the first cut, tokens alive after the second) per image, for counts ``visual_tokens``."""
        n = visual_tokens.double()
        if self.keep is not None:
            second = torch.minimum(torch.full_like(visual_tokens, self.keep), visual_tokens)
            first = (second.double() * n).sqrt().floor().long()
        else:
            share = self.ratio if self.ratio is not None else self.default_ratio
            fraction = share ** 0.5
            first = (n * fraction).floor().long()
            second = (n * share).floor().long()
        present = visual_tokens > 0
        return (torch.where(present, first.clamp_min(1), 0),
                torch.where(present, torch.minimum(second.clamp_min(1), visual_tokens), 0))


class _FeatherCut(LayerOperator):
    def __init__(self, method: Feather, layers: tuple[int, int]) -> None:
        self.method, self.layers = method, layers

    def scores(self, ctx: LayerContext) -> torch.Tensor:
        return attention_received(ctx, "last", rope=self.method.criterion_rope, keys="visual")

    def uniform(self, ctx: LayerContext) -> torch.Tensor:
        """Tokens on the grid kept at the first cut: rows and columns 0, s, 2s, ... of every image grid (view)."""
        stride = self.method.stride
        return ctx.candidate & (ctx.row >= 0) & (ctx.col >= 0) & (ctx.row % stride == 0) & (ctx.col % stride == 0)

    def transform(self, ctx: LayerContext) -> Transition:
        first, second = self.method.cut_budgets(ctx.image_candidates)
        group = ctx.image.masked_fill(~ctx.candidate, -1)
        if ctx.layer == self.layers[0]:
            return Transition(keep=group_topk(self.scores(ctx), group, first) | self.uniform(ctx))
        return Transition(keep=group_topk(self.scores(ctx), group, second))
