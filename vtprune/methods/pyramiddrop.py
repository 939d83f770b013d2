"""PyramidDrop: drop visual tokens in stages inside the LLM, a geometric share fewer after every stage boundary."""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import torch

from vtprune.methods.base import Method, Param, register
from vtprune.methods.scoring import attention_received
from vtprune.models.base import Adapter
from vtprune.ops import group_topk
from vtprune.runtime.operators import LayerContext, LayerOperator, Transition

PAPER_DEPTH = 32
PAPER_LAYERS = (8, 16, 24)
PAPER_LAMBDA = 0.5
# Boundaries tried, in order, when a layer-averaged budget is below what the paper's reach (see the docstring).
FALLBACK_LAYERS = ((2, 6, 12, 18, 24), (0, 6, 12, 18, 24))
LAMBDA_STEPS = 10_000  # lambda is searched on a grid of 1e-4
MIN_LAMBDA = 0.25  # the smallest lambda the paper's schedules use (its 192-token row); below it a pyramid degenerates


@dataclass(frozen=True)
class Schedule:
    """One image's plan: stage ``boundaries`` (tokens are dropped before these decoder layers), ``lam``, the image
    tokens alive after each boundary (``counts``) and the resulting layer-averaged count (``mean_tokens``)."""

    visual_tokens: int
    depth: int
    boundaries: tuple[int, ...]
    lam: float
    counts: tuple[int, ...]
    mean_tokens: float


def stage_counts(visual_tokens: int, lam: float, stages: int) -> tuple[int, ...]:
    """Tokens alive after each boundary: ``int(N0 * lam ** s)`` as the official code floors ``N0 * ratio``, at
    least 1 so that every image stays represented."""
    return tuple(max(1, int(visual_tokens * lam ** s)) for s in range(1, stages + 1))


def layer_average(visual_tokens: int, boundaries: tuple[int, ...], counts: tuple[int, ...], depth: int) -> float:
    """(1/L) * sum over layers of the image tokens entering each layer (the paper's T-bar)."""
    edges = (*boundaries, depth)
    total = boundaries[0] * visual_tokens + sum((edges[s + 1] - edges[s]) * counts[s] for s in range(len(counts)))
    return total / depth


@lru_cache(maxsize=256)
def solve_schedule(visual_tokens: int, depth: int, boundaries: tuple[int, ...], target: float) -> Schedule:
    """The lambda on a 1e-4 grid whose layer-averaged count is closest to ``target`` (ties: the larger counts; among
    lambdas giving the same counts, the smallest)."""
    best: Schedule | None = None
    for step in range(LAMBDA_STEPS, 0, -1):
        lam = step / LAMBDA_STEPS
        counts = stage_counts(visual_tokens, lam, len(boundaries))
        mean = layer_average(visual_tokens, boundaries, counts, depth)
        if best is None or abs(mean - target) < abs(best.mean_tokens - target):
            best = Schedule(visual_tokens, depth, boundaries, lam, counts, mean)
        elif counts == best.counts:
            best = replace(best, lam=lam)
        elif mean < target:
            break  # the average falls with lambda: lower lambdas only move further away
    assert best is not None
    return best


def scaled_boundaries(layers: tuple[int, ...], depth: int) -> tuple[int, ...]:
    """Paper boundaries (of 32 layers) moved proportionally to ``depth``; 0 stays 0, others at least 1, deduplicated
    and below ``depth``."""
    scaled = {0 if b == 0 else max(1, round(b * depth / PAPER_DEPTH)) for b in layers}
    return tuple(sorted(b for b in scaled if b < depth))


@register
class PyramidDrop(Method):
    """PyramidDrop — Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
    Redundancy Reduction", CVPR 2025, arXiv 2410.17247.

    Stage: ``layer`` (LLM prefill), at several boundaries. Before boundary layer b, the surviving image tokens are
    ranked by the attention the last prompt token pays them in layer b itself — layer b's input norm and q/k applied
    to the tokens about to enter it, RoPE at their current positions, softmax over every causal key, mean over heads
    (the official ``pdrop_rank_drop``; not the previous layer's attention) — and ``int(N0 * lam ** s)`` survive the
    s-th boundary (N0: the image's tokens entering the LLM). Later stages rank only the survivors; nothing comes back.
    Decoding reuses every stage's kept cache.

    Defaults (the paper's and the code's): boundaries 8, 16, 24 of 32 layers (scaled to the depth), ``lam`` 0.5
    (576 -> 288 -> 144 -> 72, 270 on average over 32 layers), positions renumbered after each drop as the official
    code does (``positions='original'`` is a named variant; on 3-D M-RoPE models positions stay original), the whole
    image span ranked (LLaVA-NeXT newline tokens are candidates).

    Budget convention (the paper's Table 2): ``keep`` = image tokens per image averaged over all decoder layers
    (layers before the first boundary count with all N0), ``ratio`` = that average as a share of N0. Given one,
    ``lam`` is solved on a 1e-4 grid so that the average is as close as the integer counts allow. The paper does not
    publish the (boundaries, lam) behind its 192/128/64 rows ([GAP]); ours, when ``layers`` is not given: the first
    of the paper's boundaries, then 2, 6, 12, 18, 24 and 0, 6, 12, 18, 24 that reaches the budget with lam >=
    0.25 (the smallest lambda of the paper's own schedules; the paper's boundaries can reach about 8/32 of N0 only
    by keeping almost nothing after the first cut), else the one reaching it with the largest lam. The last list
    cuts before layer 0, scored by layer 0's own q/k on the input embeddings, which the paper
    never uses but which small budgets on shallow models need. ``schedule(N0, depth)`` returns the plan; the bench
    stores it with every result. ``lam=`` fixes the paper's parameter instead of a budget.
    ``criterion_rope=False`` scores without RoPE (FEATHER's fix, a named variant).
    """

    name = "pyramiddrop"
    paper = "arXiv 2410.17247 (CVPR 2025)"
    stages = ("layer",)
    budget_convention = "image tokens per image averaged over all decoder layers (paper Table 2)"
    default_ratio = 0.5  # unused: without keep/ratio the paper's lam applies
    default_positions = "renumber"
    default_separators = "candidates"
    params = (
        Param("layers", None, "stage boundaries: tokens are dropped before these decoder layers (None: the paper's "
              "8, 16, 24 of 32 scaled to the depth, or earlier ones when the budget needs them)", tuple, low=0),
        Param("lam", None, "lambda: share of the previous stage's count kept at each boundary (None: 0.5 without a "
              "budget, solved from keep/ratio otherwise)", float, low=0, high=1, low_open=True),
        Param("criterion_rope", True, "score with RoPE on q and k (False: FEATHER's no-RoPE variant)", bool),
    )

    def __init__(self, **values) -> None:
        super().__init__(**values)
        if self.lam is not None and (self.keep is not None or self.ratio is not None):
            raise ValueError("pyramiddrop: give lam= (the paper's parameter) or a budget (keep= / ratio=), not both")

    def schedule(self, visual_tokens: int, depth: int) -> Schedule:
        """The plan for an image of ``visual_tokens`` tokens on a ``depth``-layer LLM."""
        candidates = [self.layers] if self.layers is not None else [
            scaled_boundaries(b, depth) for b in (PAPER_LAYERS, *FALLBACK_LAYERS)]
        if self.keep is None and self.ratio is None:
            lam = PAPER_LAMBDA if self.lam is None else self.lam
            counts = stage_counts(visual_tokens, lam, len(candidates[0]))
            return Schedule(visual_tokens, depth, candidates[0], lam, counts,
                            layer_average(visual_tokens, candidates[0], counts, depth))
        target = min(self.keep, visual_tokens) if self.keep is not None else self.ratio * visual_tokens
        reached = []
        for boundaries in candidates:
            plan = solve_schedule(visual_tokens, depth, boundaries, float(target))
            if abs(plan.mean_tokens - target) <= min(2.0, max(0.5, 0.05 * target)):  # within 2 tokens, tighter when small
                if plan.lam >= MIN_LAMBDA or len(candidates) == 1:
                    return plan
                reached.append(plan)
        if reached:  # every candidate needs a degenerate lambda: the gentlest of them
            return max(reached, key=lambda plan: plan.lam)
        lowest = solve_schedule(visual_tokens, depth, candidates[-1], 0.0).mean_tokens
        raise ValueError(
            f"pyramiddrop: a layer average of {target:g} image tokens out of {visual_tokens} cannot be reached with "
            f"boundaries {candidates[-1]} on {depth} layers (the lowest is {lowest:.1f}); use an earlier first "
            "boundary in layers=, e.g. layers=(0, ...), or a larger keep/ratio"
        )

    def operators(self, adapter: Adapter) -> list:
        depth = len(adapter.decoder_layers)
        self.check_budget(adapter)
        if self.layers is not None and self.layers[-1] >= depth:
            raise ValueError(f"pyramiddrop: layers={self.layers} reach past the last of the {depth} decoder layers; "
                             f"use boundaries in 0..{depth - 1}")
        if self.layers is not None and self.ratio is not None and self.ratio < self.layers[0] / depth:
            raise ValueError(f"pyramiddrop: ratio={self.ratio} is below what boundaries {self.layers} reach on {depth} "
                             f"layers (layers before {self.layers[0]} see every token: at least "
                             f"{self.layers[0] / depth:.3f}); use an earlier first boundary or a larger ratio")
        fixed = adapter.fixed_tokens_per_image
        if fixed is not None:
            boundaries = self.schedule(fixed, depth).boundaries  # refuses an unreachable budget at apply()
        elif self.layers is not None:
            boundaries = self.layers
        else:  # images differ in size: every boundary any plan may use
            boundaries = tuple(sorted({b for c in (PAPER_LAYERS, *FALLBACK_LAYERS) for b in scaled_boundaries(c, depth)}))
        return [_PyramidStage(self, boundaries, depth)]

    def resolved(self, adapter: Adapter) -> dict[str, object]:
        fixed = adapter.fixed_tokens_per_image
        depth = len(adapter.decoder_layers)
        return {} if fixed is None else schedule_summary(self.schedule(fixed, depth))


class _PyramidStage(LayerOperator):
    needs_previous_input = False  # scores with the boundary layer's own q/k

    def __init__(self, method: PyramidDrop, boundaries: tuple[int, ...], depth: int) -> None:
        self.method, self.layers, self.depth = method, boundaries, depth

    def scores(self, ctx: LayerContext) -> torch.Tensor:
        return attention_received(ctx, "last", layer="current", rope=self.method.criterion_rope)

    def alive_after(self, visual_tokens: torch.Tensor, layer: int) -> torch.Tensor:
        """Tokens each image [B, G] keeps from ``layer`` on, from its own plan (0 for absent images)."""
        out = torch.zeros_like(visual_tokens)
        for n0 in visual_tokens.unique().tolist():
            if n0 <= 0:
                continue
            plan = self.method.schedule(int(n0), self.depth)
            passed = [s for s, b in enumerate(plan.boundaries) if b <= layer]
            out[visual_tokens == n0] = plan.counts[passed[-1]] if passed else int(n0)
        return out

    def transform(self, ctx: LayerContext) -> Transition:
        budget = torch.minimum(self.alive_after(ctx.image_candidates, ctx.layer), ctx.image_candidates)
        group = ctx.image.masked_fill(~ctx.candidate, -1)
        return Transition(keep=group_topk(self.scores(ctx), group, budget))


def schedule_summary(plan: Schedule) -> dict[str, object]:
    """A JSON-ready description of a plan (stored with bench results)."""
    return {"visual_tokens": plan.visual_tokens, "layers": list(plan.boundaries), "lam": round(plan.lam, 4),
            "counts": list(plan.counts), "mean_tokens": round(plan.mean_tokens, 2),
            "profile": [plan.visual_tokens] * plan.boundaries[0] + [
                c for s, c in enumerate(plan.counts)
                for _ in range((*plan.boundaries, plan.depth)[s + 1] - plan.boundaries[s])]}


