"""MustDrop's stage operators (the method, its parameters and its documentation are in ``mustdrop.py``).

- ``WindowMerge`` (vision): collapses the similar 3x3 windows of every view at the output of ViT block 0 and runs
  the later blocks on the shorter, padded views (padding masked as keys).
- ``KeyTokens`` (pre-LLM): orders each image's tokens and tags its key tokens (top [CLS] attention of the last ViT
  block) and the view bookkeeping the later stages read back.
- ``DualAttentionFilter`` (layer): the dual-attention drop after the filtering layers.
- ``CacheTrim`` / ``OutputAwareEviction`` (decode): the two decoding policies.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache

import torch

from vtprune.models.base import Adapter
from vtprune.models.layout import TokenKind
from vtprune.ops import group_topk, mean_by_assignment, window_assignment, window_similarity
from vtprune.runtime.operators import (
    DecodeContext,
    DecodeOperator,
    DecodeStepContext,
    ImageTokens,
    LayerContext,
    LayerOperator,
    PreLLMContext,
    PreLLMOperator,
    Reduction,
    Transition,
    VisionOperator,
    VisionState,
)

KEY, VIEW, VIEW_TOKENS, VIEW_PATCHES = "mustdrop_key", "mustdrop_view", "mustdrop_view_tokens", "mustdrop_view_patches"
VIEW_STRIDE = 1024  # view tag = 1 + image number * VIEW_STRIDE + view (0: not a view's token)


# --- vision ---------------------------------------------------------------------------------------------------
class WindowMerge(VisionOperator):
    """Merges windows at the input of block 1 (the output of block 0) and runs blocks 1.. with padding masked.

    ``count``: ``"view"`` (each view merges its own windows with similarity >= tau) or ``"batch_min"`` (every view
    merges the smallest such count of the tower call, as the official code); ``cap`` (or None): at most this many
    windows per view; ``exact``: merge exactly ``cap`` windows, the most similar, whatever their similarity.
    """

    def __init__(self, windows: torch.Tensor, last_block: int, tau: float, count: str, cap: int | None,
                 exact: bool) -> None:
        self.windows, self.tau, self.count, self.cap, self.exact = windows, tau, count, cap, exact
        self.blocks = tuple(range(1, last_block + 1))

    def block_forward(self, adapter: Adapter, block: int, state: VisionState, hidden: torch.Tensor) -> torch.Tensor:
        if block == self.blocks[0]:
            hidden = self.merge(state, block, hidden)
        bias = None
        padding = state.size[..., 0] == 0
        if bool(padding.any()):  # views shorter than the longest: their padding is invisible as a key
            bias = torch.zeros(padding.shape, dtype=hidden.dtype, device=hidden.device)
            bias = bias.masked_fill(padding, torch.finfo(hidden.dtype).min)[:, None, None, :]
        return adapter.vision_block_step(block, hidden, bias, lambda x, keys: x)

    def merge_counts(self, similarity: torch.Tensor) -> torch.Tensor:
        """Windows each view merges [V]."""
        views, windows = similarity.shape
        if self.exact:
            return torch.full((views,), min(self.cap or 0, windows), dtype=torch.long, device=similarity.device)
        counts = (similarity >= self.tau).sum(1)
        if self.count == "batch_min":  # the official code: one count for every view the tower sees together
            counts = counts.min().expand(views)
        return counts if self.cap is None else counts.clamp(max=self.cap)

    def merge(self, state: VisionState, block: int, hidden: torch.Tensor) -> torch.Tensor:
        patches = hidden[:, 1:]
        tokens = patches.shape[1]
        if tokens != self.windows.numel():
            raise ValueError(f"mustdrop: the vision tower gave {tokens} patch tokens per view, but the windows cover "
                             f"{self.windows.numel()}; load the model at the image size it was configured for")
        windows = self.windows.to(hidden.device)
        similarity = window_similarity(patches, windows)
        counts = self.merge_counts(similarity)
        if not bool(counts.any()):
            return hidden
        slot, lengths = window_assignment(similarity, windows, counts, tokens)
        merged, size = mean_by_assignment(patches, slot, int(lengths.max()))
        views = hidden.shape[0]
        owner = torch.cat([torch.zeros(views, 1, dtype=torch.long, device=hidden.device), slot + 1], dim=1)
        state.owner = owner.gather(1, state.owner)
        state.owner_after[block] = state.owner
        state.size = torch.cat([size.new_ones(views, 1), size], dim=1)[..., None].to(state.size.dtype)
        return torch.cat([hidden[:, :1], merged], dim=1)


# --- pre-LLM ----------------------------------------------------------------------------------------------------
def key_scores(ctx: PreLLMContext, image: ImageTokens, block: int) -> torch.Tensor:
    """Head-mean [CLS] attention of vision ``block`` for each of the image's tokens [k] (float32; -inf for a
    separator), over the tokens each view really has: a merged view's padding is left out of the softmax (the rows
    are renormalised over the real keys, which equals masking them)."""
    record = image.record
    hidden = record.trace.hidden_states[block]
    views, slots = hidden.shape[0], hidden.shape[1] - 1
    per_view = record.layout.num_vision_tokens // views
    query = torch.zeros(1, dtype=torch.long, device=hidden.device)
    probs = ctx.adapter.vision_attention(record.trace, block, query)[:, :, 0].float()  # [views, H, 1 + slots]
    real = torch.ones(views, 1 + slots, dtype=torch.bool, device=probs.device)
    if record.view_owner is not None:
        real = torch.zeros_like(real)
        real[:, 0] = True
        real.scatter_(1, record.view_owner.to(probs.device) + 1, True)
    elif slots != per_view:
        raise ValueError("mustdrop: the vision tower merged tokens after the features were taken; use a "
                         "vision_feature_layer after block 0")
    probs = probs * real[:, None]
    per_slot = (probs / probs.sum(-1, keepdim=True)).mean(1)[:, 1:]  # [views, slots]
    vision = record.layout.vision_index[image.sources.strongest()].to(probs.device)
    view, patch = vision.clamp_min(0) // per_view, vision.clamp_min(0) % per_view
    slot = patch if record.view_owner is None else record.view_owner.to(probs.device)[view, patch]
    return torch.where(vision >= 0, per_slot[view, slot], float("-inf"))


class KeyTokens(PreLLMOperator):
    """Hands each image's tokens to the LLM (in MustDrop's order or raster order) with tags: its key tokens (top
    ``ceil(key_ratio * n)`` of each view's n tokens by [CLS] attention of ``key_block``; None: no key set) and, per
    token, its view, the tokens that view brings into the LLM and the patches it covers."""

    def __init__(self, key_ratio: float, key_block: int | None, order: str) -> None:
        self.key_ratio, self.key_block, self.order = key_ratio, key_block, order

    def reduce_image(self, ctx: PreLLMContext, index: int, image: ImageTokens) -> Reduction:
        layout, device = image.layout, image.features.device
        n = len(image.features)
        strongest = image.sources.strongest()
        content = layout.kind[strongest] != int(TokenKind.SEPARATOR)
        view = layout.partition[strongest].clamp_min(0)
        views = int(layout.partition.max()) + 1
        tokens = torch.bincount(view[content], minlength=views)
        patches = torch.bincount(layout.partition[layout.content], minlength=views)
        key = torch.zeros(n, dtype=torch.bool, device=device)
        if self.key_ratio > 0 and self.key_block is not None and image.record.trace is not None:
            scores = key_scores(ctx, image, self.key_block)
            for v in range(views):
                members = (content & (view == v)).nonzero().flatten()
                k = math.ceil(self.key_ratio * len(members))
                if k:  # ties go to the earlier token
                    best = torch.sort(scores[members], descending=True, stable=True).indices[:k]
                    key[members[best]] = True
        tags = {
            KEY: key.float(),
            VIEW: torch.where(content, 1 + image.number * VIEW_STRIDE + view, 0).float(),
            VIEW_TOKENS: torch.where(content, tokens[view], 0).float(),
            VIEW_PATCHES: torch.where(content, patches[view], 0).float(),
        }
        order = torch.arange(n, device=device)
        if self.order == "raster" or layout.has_separators:  # by the mean place of each token's patches
            centre = image.sources.mean(torch.arange(len(layout), device=device))
            order = torch.sort(centre, stable=True).indices
        return Reduction(image.features[order], image.sources.select(order), {k: v[order] for k, v in tags.items()})


# --- prefill: the dual-attention filter -------------------------------------------------------------------------
@dataclass(frozen=True)
class ViewPlan:
    """One view's budgeted plan: ``tokens`` entering the LLM, the ``floor`` no stage goes below (its key tokens, at
    least 1), the layer-averaged ``target``, the stage ``counts`` (tokens alive after each filtering layer) with
    their common ratio ``rho``, and the layer average ``mean`` they give."""

    tokens: int
    floor: int
    target: float
    counts: tuple[int, ...]
    rho: float
    mean: float


def layer_average(tokens: int, drops: tuple[int, ...], counts: tuple[int, ...], depth: int) -> float:
    """Visual tokens entering each decoder layer, averaged over the ``depth`` layers: ``tokens`` before the first
    drop, ``counts[s]`` from drop s on (``drops``: the layers tokens are dropped before)."""
    edges = (*drops, depth)
    return (drops[0] * tokens + sum((edges[s + 1] - edges[s]) * c for s, c in enumerate(counts))) / depth


def _counts(tokens: int, floor: int, rho: float, stages: int) -> tuple[int, ...]:
    return tuple(min(tokens, max(floor, round(tokens * rho ** s))) for s in range(1, stages + 1))


@lru_cache(maxsize=4096)
def solve_view_plan(tokens: int, floor: int, target: float, drops: tuple[int, ...], depth: int) -> ViewPlan:
    """The geometric schedule (each stage keeps the share ``rho`` of the previous one, never below ``floor``) whose
    layer average is closest to ``target``; bisection on rho (the average never falls as rho grows). When even the
    floor stays above the target, the floor is the plan."""
    floor = min(floor, tokens)

    def mean(rho: float) -> float:
        return layer_average(tokens, drops, _counts(tokens, floor, rho, len(drops)), depth)

    low, high = 0.0, 1.0
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (low, middle) if mean(middle) >= target else (middle, high)
    rho = high if abs(mean(high) - target) <= abs(mean(low) - target) else low
    counts = _counts(tokens, floor, rho, len(drops))
    return ViewPlan(tokens, floor, float(target), counts, rho, mean(rho))


def image_mass(g: torch.Tensor, candidate: torch.Tensor, image: torch.Tensor, images: int) -> torch.Tensor:
    """For every token [B, n], the sum of ``g`` over the candidates of its image (``image``: -1 for text)."""
    index = image.clamp_min(0)
    total = g.new_zeros(g.shape[0], images + 1).scatter_add(1, torch.where(candidate, index, images), g * candidate)
    return total.gather(1, index)


def dual_filter(g: torch.Tensor, m: torch.Tensor, mass: torch.Tensor, candidate: torch.Tensor, key: torch.Tensor,
                gamma_g: float, gamma_i: float) -> torch.Tensor:
    """MustDrop's rule, as a keep mask over the candidates: a token goes iff its global score is below ``gamma_g``
    times its image's ``mass`` AND its individual score is below ``gamma_i``; key tokens always stay."""
    drop = candidate & ~key & (g < gamma_g * mass) & (m < gamma_i)
    return candidate & ~drop


class DualAttentionFilter(LayerOperator):
    """After each filtering layer l (so before layer l + 1), drops a visual token that gets little attention from
    the text after its image both in total (g < gamma_g * the image's total) and at its best text token
    (m < gamma_i); key tokens stay. Budget mode: each view keeps the tokens of its plan's stage count, ranked by
    the scale at which the two thresholds would drop them."""

    needs_previous_input = True

    def __init__(self, scoring_layers: tuple[int, ...], depth: int, gamma_g: float, gamma_i: float,
                 target: Callable[[float, float], float] | None) -> None:
        self.scoring_layers, self.depth = scoring_layers, depth
        self.layers = tuple(layer + 1 for layer in scoring_layers)
        self.gamma_g, self.gamma_i, self.target = gamma_g, gamma_i, target

    def scores(self, ctx: LayerContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(global g, individual m) [B, n]: the sum and the max over the text rows after the first visual token of
        the head-mean attention layer l computed (its own q/k with RoPE, softmax over every causal key). Causality
        makes a token's rows exactly the text after its image (visual rows are never queries)."""
        hidden, rope = ctx.previous_input
        batch, n = ctx.valid.shape
        order = torch.arange(n, device=ctx.valid.device)
        first_visual = torch.where(ctx.visual.any(1), ctx.visual.float().argmax(1), n)
        text = ctx.valid & ~ctx.visual & (order[None, :] > first_visual[:, None])
        count = text.sum(1)
        width = int(count.max())
        if width == 0:
            zero = torch.zeros(batch, n, device=ctx.valid.device)
            return zero, zero
        rows = torch.sort((~text).long(), dim=1, stable=True).indices[:, :width]  # text rows first, in order
        used = torch.arange(width, device=rows.device)[None, :] < count[:, None]
        key_mask = (order[None, None, :] <= rows[..., None]) & ctx.valid[:, None, :]
        keys = ctx.adapter.cached_keys(ctx.kv_cache, ctx.layer - 1, hidden.shape[1])  # layer l's own, not re-projected
        probs = ctx.adapter.llm_attention(ctx.layer - 1, hidden, rope, rows, key_mask, keys=keys).mean(1)
        probs = probs * used[..., None]
        return probs.sum(1), probs.amax(1)

    def transform(self, ctx: LayerContext) -> Transition:
        g, m = self.scores(ctx)
        candidate = ctx.candidate
        key = candidate & (ctx.tags[KEY] > 0) if KEY in ctx.tags else torch.zeros_like(candidate)
        mass = image_mass(g, candidate, ctx.image, ctx.image_candidates.shape[1])
        if self.target is None:
            return Transition(keep=dual_filter(g, m, mass, candidate, key, self.gamma_g, self.gamma_i))
        # The scale c at which thresholds (c*gamma_g, c*gamma_i) would drop a token: survivors of any c are the top
        # tokens by it, so a stage count is met exactly by ranking.
        scale = torch.maximum(g / (self.gamma_g * mass).clamp_min(1e-30), m / self.gamma_i)
        scale = scale.masked_fill(key, float("inf"))
        return Transition(keep=self._budgeted(ctx, scale, key))

    def _budgeted(self, ctx: LayerContext, scale: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        stage = self.layers.index(ctx.layer)
        drops = self.layers
        candidate = ctx.candidate
        views = int(ctx.partition.max()) + 1
        content = candidate & (ctx.partition >= 0)
        group = torch.where(content, ctx.image.clamp_min(0) * views + ctx.partition, -1)
        slots = ctx.image_candidates.shape[1] * views
        index = group.masked_fill(group < 0, slots)

        def per_group(values: torch.Tensor, how: str) -> torch.Tensor:
            out = values.new_zeros(values.shape[0], slots + 1)
            return out.scatter_reduce(1, index, values * content, how, include_self=True)[:, :slots]

        tokens = per_group(ctx.tags[VIEW_TOKENS].float(), "amax")
        patches = per_group(ctx.tags[VIEW_PATCHES].float(), "amax")
        keys = per_group(key.float(), "sum")
        budget = torch.zeros_like(tokens, dtype=torch.long)
        for (b, s), n, p, k in zip(tokens.nonzero().tolist(), tokens[tokens > 0].tolist(),
                                   patches[tokens > 0].tolist(), keys[tokens > 0].tolist()):
            plan = solve_view_plan(int(n), max(1, int(k)), self.target(n, p), drops, self.depth)
            budget[b, s] = plan.counts[stage]
        return group_topk(scale, group, budget) | (candidate & ~content)  # separators as candidates stay


# --- decoding ---------------------------------------------------------------------------------------------------
class CacheTrim(DecodeOperator):
    """After prefill, every layer from ``first`` on keeps only the visual entries still alive after the last layer
    (the official code's policy: tokens dropped at a later filtering layer leave the earlier layers' caches too)."""

    def __init__(self, first: int) -> None:
        self.first = first

    def trim(self, ctx: DecodeContext) -> dict[int, torch.Tensor]:
        final = ctx.rows[-1]
        width = int(max(int(rows.max()) for rows in ctx.rows)) + 2
        alive = torch.zeros(final.shape[0], width, dtype=torch.bool, device=final.device)
        alive.scatter_(1, final.masked_fill(final < 0, width - 1), True)
        alive[:, -1] = False
        return {layer: alive.gather(1, rows.masked_fill(rows < 0, width - 1)) | ~ctx.visual[layer]
                for layer, rows in enumerate(ctx.rows) if layer >= self.first and rows is not final}


class OutputAwareEviction(DecodeOperator):
    """During decoding, in every layer of ``step_layers``: a visual entry whose head-mean attention from the step's
    query (over the cached entries, i.e. the step's softmax without its own key; the largest over the step's query
    rows) stays below ``threshold`` for ``patience`` consecutive steps is evicted before the next step. Key tokens
    and separators are never evicted; with a ``floor`` (tokens per view) a view keeps at least that many visual
    entries in each layer, its least attended entries going first."""

    compact_interval = 8  # evicted entries are masked at once; the cache tensors are compacted every 8 steps

    def __init__(self, step_layers: tuple[int, ...], threshold: float, patience: int,
                 floor: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        self.step_layers, self.threshold, self.patience, self.floor = step_layers, threshold, patience, floor

    def _key(self, name: str, layer: int | None = None) -> tuple:
        return ("mustdrop", id(self), name, layer)

    def trim(self, ctx: DecodeContext) -> dict[int, torch.Tensor]:
        """Set up the cache's memory: each LLM-input row's view group (-1: text and separators) and key-token flag,
        the groups' floors, and per layer the steps each entry has been below the threshold and the pending
        evictions."""
        rows = torch.cat(ctx.rows, dim=1)
        visual = torch.cat(ctx.visual, dim=1)
        width = int(rows.max()) + 1
        batch, device = rows.shape[0], rows.device
        if VIEW in ctx.tags:
            view = ctx.tags[VIEW].long()
            protected = ctx.tags[KEY] > 0
        else:  # no MustDrop pre-LLM stage: every visual entry is evictable, one group per sample
            view = torch.zeros(batch, width + 1, dtype=torch.long, device=device)
            view.scatter_(1, rows.masked_fill(rows < 0, width), visual.long())
            view = view[:, :width]
            protected = torch.zeros_like(view, dtype=torch.bool)
        values, inverse = torch.unique(view, return_inverse=True)
        group = torch.where(view > 0, inverse - int(values[0] == 0), -1)
        groups = len(values) - int(values[0] == 0)
        floor = torch.zeros(batch, groups, dtype=torch.long, device=device)
        if self.floor is not None and groups:
            patches = ctx.tags.get(VIEW_PATCHES, torch.zeros_like(view, dtype=torch.float))
            index = torch.where(view > 0, inverse - int(values[0] == 0), groups)
            per_group = patches.new_zeros(batch, groups + 1).scatter_reduce(1, index, patches.float(), "amax")
            floor = self.floor(per_group[:, :groups])
        ctx.memory[self._key("group")] = group
        ctx.memory[self._key("protected")] = protected
        ctx.memory[self._key("floor")] = floor
        for layer in self.step_layers:
            ctx.memory[self._key("low", layer)] = torch.zeros_like(group)
            ctx.memory[self._key("pending", layer)] = torch.zeros_like(group, dtype=torch.bool)
        return {}

    def step(self, ctx: DecodeStepContext) -> torch.Tensor | None:
        group_of, floor = ctx.memory[self._key("group")], ctx.memory[self._key("floor")]
        low_steps, pending = ctx.memory[self._key("low", ctx.layer)], ctx.memory[self._key("pending", ctx.layer)]
        width = group_of.shape[1]
        inside = (ctx.rows >= 0) & (ctx.rows < width)
        slot = ctx.rows.masked_fill(~inside, width)  # generated tokens and padding go to a dump column

        def read(table: torch.Tensor, fill) -> torch.Tensor:
            return torch.cat([table, table.new_full((table.shape[0], 1), fill)], 1).gather(1, slot)

        evict = read(pending, False) & ctx.valid  # decided at the previous step
        live = ctx.valid & ~evict
        attention = replace(ctx, valid=live).query_attention().mean(1).amax(1)  # [B, len]
        group = read(group_of, -1).masked_fill(~live, -1)
        evictable = (group >= 0) & ~read(ctx.memory[self._key("protected")], True)
        low = evictable & (attention < self.threshold)
        steps = torch.where(low, read(low_steps, 0) + 1, 0)
        ready = low & (steps >= self.patience)
        groups = floor.shape[1]
        alive = floor.new_zeros(floor.shape[0], groups + 1).scatter_add(1, group.masked_fill(group < 0, groups),
                                                                        (group >= 0).long())[:, :groups]
        chosen = group_topk(-attention, group.masked_fill(~ready, -1), (alive - floor).clamp_min(0))
        ctx.memory[self._key("low", ctx.layer)] = self._write(low_steps, slot, steps)
        ctx.memory[self._key("pending", ctx.layer)] = self._write(pending, slot, chosen)
        return evict

    @staticmethod
    def _write(table: torch.Tensor, slot: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``table`` [B, n0] with the entries at ``slot`` set to ``values`` (the dump column discarded)."""
        padded = torch.cat([table, table.new_zeros(table.shape[0], 1)], 1)
        return padded.scatter(1, slot, values.to(table.dtype))[:, :-1]
