"""MustDrop: window merging in the ViT, a dual-attention filter in the LLM prefill, and a KV-cache policy for
decoding; each stage on its own or all three (the operators are in ``mustdrop_stages.py``)."""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from vtprune.methods.base import Method, Param, register
from vtprune.methods.mustdrop_stages import (
    CacheTrim,
    DualAttentionFilter,
    KeyTokens,
    OutputAwareEviction,
    WindowMerge,
    solve_view_plan,
)
from vtprune.models.base import Adapter
from vtprune.ops import window_indices

PAPER_DEPTH = 32
PAPER_LAYERS = (2, 6, 10, 14)  # filtering after these decoder layers (0-indexed), Vicuna-7B
TEXTVQA_192 = 0.001  # gamma_g = gamma_i of the official TextVQA-192 script

SWITCHES = (
    Param("vision", True, "stage 1: merge similar windows inside the ViT", bool),
    Param("prefill", True, "stage 2: dual-attention filter in the LLM prefill", bool),
    Param("decode", True, "stage 3: KV-cache policy while decoding", bool),
)
VISION_PARAMS = (
    Param("tau", 0.8, "window similarity threshold (mean pairwise cosine, inclusive; > 1 merges nothing)", float,
          low=-1.0),
    Param("window", 3, "window side in patches (windows must tile the patch grid)", int, low=2),
    Param("merge_count", "view", "'view': each view merges its own similar windows; 'batch_min': every view merges "
          "the smallest count of the tower call, as the official code (results then depend on the batch)", str,
          ("view", "batch_min")),
    Param("order", "similarity", "visual token order into the LLM: 'similarity' (merged windows first, most "
          "similar first, then the rest in raster order; the official code's) or 'raster'", str,
          ("similarity", "raster")),
)
KEY_PARAMS = (
    Param("key_ratio", 0.08, "key tokens per view: the top ceil(key_ratio * n) by [CLS] attention of the last ViT "
          "block, never dropped (0: none)", float, low=0.0, high=1.0),
)
PREFILL_PARAMS = (
    Param("layers", None, "filtering layers: tokens are filtered with layer l's attention and dropped before layer "
          "l + 1 (None: 2, 6, 10, 14 of 32, scaled to the depth)", tuple, low=0),
    Param("gamma_g", TEXTVQA_192, "global threshold, relative to the image's text->vision attention mass", float,
          low=0.0, high=1.0),
    Param("gamma_i", TEXTVQA_192, "individual threshold on a token's largest attention from one text token", float,
          low=0.0),
)
DECODE_PARAMS = (
    Param("decode_policy", "trim", "'trim': after prefill, cut the cache of every layer from the first filtering "
          "layer on to the final token set (the official code); 'output_aware': evict entries the generated tokens "
          "stop attending to", str, ("trim", "output_aware")),
    Param("evict_threshold", 0.001, "output_aware: a visual entry goes once its head-mean attention from the "
          "step's query stays below this for `patience` steps (0: never)", float, low=0.0),
    Param("patience", 3, "output_aware: consecutive decode steps below evict_threshold before an entry goes", int,
          low=1),
)
DECODE_ONLY_PARAMS = (
    Param("layers", None, "the first of these is the first evicting layer (None: 2 of 32, scaled to the depth); "
          "earlier layers keep every entry", tuple, low=0),
    Param("decode_policy", "output_aware", "'output_aware' (see mustdrop); 'trim' needs the prefill stage", str,
          ("output_aware", "trim")),
    *DECODE_PARAMS[1:],
)
ALL_PARAMS = (*SWITCHES, *VISION_PARAMS, *KEY_PARAMS, *PREFILL_PARAMS, *DECODE_PARAMS)


def scaled_filter_layers(depth: int) -> tuple[int, ...]:
    """The paper's filtering layers (2, 6, 10, 14 of 32) moved proportionally to ``depth`` (``round``), kept below
    the last layer (a drop needs a later layer); layers that collide are merged, so shallow models get fewer
    stages (4 layers: 0, 1, 2)."""
    return tuple(sorted({max(0, min(round(layer * depth / PAPER_DEPTH), depth - 2)) for layer in PAPER_LAYERS}))


def equivalent_tokens(per_layer: torch.Tensor) -> torch.Tensor:
    """The official code's logged "equal token number" from visual tokens entering each decoder layer
    [..., L]: it counts every layer with the tokens left *after* that layer's filtering, i.e. (2*N1 + 4*V2 + 4*V6 +
    4*V10 + 18*V14) / 32 on 32 layers. ``Stats.mean_visual_tokens`` (``keep``'s convention) counts what enters a
    layer and is larger by (N1 - V_first) / L."""
    return (per_layer[..., 1:].sum(-1) + per_layer[..., -1]).double() / per_layer.shape[-1]


@register
class MustDrop(Method):
    """MustDrop — Liu et al., "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large Language Model",
    arXiv 2411.10803 (official code: github.com/liuting20/MustDrop, the source of every number here; the paper
    body could not be read).

    Stages (each switchable: ``vision``, ``prefill``, ``decode``; ``mustdrop_vision`` / ``_prefill`` / ``_decode``
    run one alone):

    1. ``vision``: on the output of ViT block 0, each non-overlapping ``window`` x ``window`` cell of a view's patch
       grid whose tokens have a mean pairwise cosine similarity >= ``tau`` (0.8, over the 72 ordered pairs of
       distinct tokens, raw block-0 outputs) collapses into the plain mean of its tokens; [CLS] is untouched; blocks
       1.. run on the shorter sequence (no size bias, as the official code).
    2. ``pre_llm``: key tokens — per view the top ``ceil(key_ratio * n)`` (0.08) of its n tokens by the head-mean
       [CLS] attention of the last ViT block (recomputed from its q/k, merged padding masked). They are tagged and
       no later stage drops or evicts them. Order into the LLM: merged windows first, most similar first, then the
       other tokens in raster order (``order='similarity'``, the official code's) or raster order.
    3. ``layer`` (``prefill``): after filtering layer l (2, 6, 10, 14 of 32, scaled to the depth by rounding,
       colliding layers merged: 0, 1, 2 on 4 layers) the head-mean attention of layer l (its own q/k with RoPE,
       softmax over every causal key) from the text tokens after an image to its tokens gives each token a global
       score g (sum over those rows) and an individual score m (max); a token is dropped before layer l + 1 iff
       g < ``gamma_g`` * (sum of g over the image's current tokens) and m < ``gamma_i``. The text rows are every
       real text token after the image (question and answer prefix, and with several images the text between them:
       causality leaves an image only the rows after it; padding never counts); an image with no text after it
       keeps all. Default thresholds: the official TextVQA-192 pair (0.001, 0.001) — the code's own defaults
       (1.0, 0.0) drop nothing.
    4. ``decode``: ``decode_policy='trim'`` (the official code's): after prefill, the cache of every layer from the
       first filtering layer on keeps only the final visual set; earlier layers keep all. ``'output_aware'`` (the
       abstract's wording; no code exists, the rule is ours): in those layers, a visual entry whose head-mean
       attention from the step's query (its softmax over the cached entries) stays below ``evict_threshold`` for
       ``patience`` consecutive steps is masked from the next step on (compacted every 8 steps); key tokens and
       newline tokens never go. Without the prefill stage, ``layers``' first entry is the first evicting layer.

    Budget: without ``keep``/``ratio``, the thresholds above decide (token counts vary per image). ``keep`` = visual
    tokens per VIEW (LLaVA-1.5: per image; LLaVA-NeXT: base image and each crop, the paper's per-crop convention)
    averaged over all decoder layers, counting the tokens that enter each layer (``Stats.mean_visual_tokens``;
    ``equivalent_tokens`` gives the official code's slightly smaller count, and ``Stats.llm_input_visual_tokens`` the
    tokens entering the LLM); ``ratio`` = that average as a share of the view's patches. Reached by: the window merge
    never taking a view below the target; then per view a geometric stage schedule (each filtering layer keeps the
    share rho of the previous count, never fewer than its key tokens; rho bisected to the layer average closest to
    the target, ``solve_view_plan``), each stage keeping the tokens the two thresholds would drop last (ranked by
    ``max(g / (gamma_g * sum g), m / gamma_i)``: the survivors of every common scale of (gamma_g, gamma_i)). A view
    whose key tokens already exceed the target keeps them (a floor, as in the paper: 64 on LLaVA-1.5 needs merged
    windows). ``mustdrop_vision`` alone merges exactly floor((T - target) / (window² - 1)) most similar windows
    whatever ``tau`` (LightCompress-style); output-aware eviction reads the budget as a floor: it leaves each view
    at least that many visual entries (key tokens included) per layer, so ``mustdrop_decode``'s prefill is
    untouched. ``ratio=1.0`` therefore changes nothing at any stage.

    Departures from the official code: merge counts per view (``merge_count='batch_min'`` restores the code's
    minimum over the tower's whole batch, which makes an image's result depend on its batch; on LLaVA-NeXT the
    official code shares it over an image's crops, which the vision stage cannot see); batches of any size with left
    padding (the code runs batch 1); text rows = the text after each image (one image: exactly the code's); several
    images each filtered against their own mass; LLaVA-NeXT keeps its packing (unpadding, newline tokens; the code
    packs 'flat') so the order is always raster there, with newline tokens kept while their row lives (default
    ``separators='rows'``; ``'drop'`` is closest to the code's flat packing), and key sets are 8% of the tokens a
    view brings into the LLM; positions renumbered after each drop (the default, as the code; original on M-RoPE)
    but decoding continues each layer's own numbering where the code uses the layer's cache length; the last ViT
    block's attention is recomputed, no eager attention anywhere; any depth (the code hard-codes 32 layers).

    Requires: the vision stage needs a [CLS] token and merging inside the ViT (refused on Qwen2-VL);
    ``mustdrop_prefill`` / ``mustdrop_decode`` run anywhere, with an empty key set on towers without [CLS].
    """

    name = "mustdrop"
    paper = "arXiv 2411.10803"
    stages = ("vision", "pre_llm", "layer", "decode")
    budget_convention = "visual tokens per view averaged over all decoder layers (tokens entering each layer)"
    default_ratio = 1.0  # unused: without keep/ratio the thresholds decide (ratio=1.0 changes nothing)
    default_positions = "renumber"
    default_separators = "rows"
    requires = frozenset({"cls", "vision_merge"})
    params = ALL_PARAMS
    switches: ClassVar[dict[str, bool] | None] = None  # fixed stage switches of the one-stage variants

    def __init__(self, **values: Any) -> None:
        super().__init__(**values)
        for param in ALL_PARAMS:  # settings a variant does not declare keep their defaults
            if not hasattr(self, param.name):
                setattr(self, param.name, param.default)
        if self.switches is not None:
            for stage, on in self.switches.items():
                setattr(self, stage, on)
        if not (self.vision or self.prefill or self.decode):
            raise ValueError(f"{self.name}: every stage is switched off; switch on vision=, prefill= or decode=")
        if self.decode and self.decode_policy == "trim" and not self.prefill:
            raise ValueError(f"{self.name}: decode_policy='trim' trims the cache to what the prefill filter kept, "
                             "and the prefill stage is off; use decode_policy='output_aware' or prefill=True")
        if self.budgeted and self.prefill and (self.gamma_g == 0 or self.gamma_i == 0):
            raise ValueError(f"{self.name}: a budget (keep=/ratio=) ranks tokens by the common scale of gamma_g and "
                             "gamma_i, which must both be > 0")
        if not self.vision:  # the key set is read where a [CLS] exists; nothing else needs the tower
            self.requires = frozenset()

    @property
    def budgeted(self) -> bool:
        return self.keep is not None or self.ratio is not None

    # --- budgets ------------------------------------------------------------------------------------------------
    def view_target(self, patches: float) -> float:
        """Layer-averaged target of a view covering ``patches`` patches."""
        return float(self.keep) if self.keep is not None else self.ratio * patches

    def merge_cap(self, patches: int) -> int | None:
        """Most windows a view of ``patches`` patches may merge under the budget (None: no budget)."""
        if not self.budgeted:
            return None
        target = self.keep if self.keep is not None else round(self.ratio * patches)
        return max(0, patches - target) // (self.window ** 2 - 1)

    def floor_of(self, patches: torch.Tensor) -> torch.Tensor:
        """output_aware's per-view floor [B, G] from the views' patches."""
        if self.keep is not None:
            return torch.full_like(patches, self.keep, dtype=torch.long)
        return (patches.double() * self.ratio).round().long()

    # --- operators ----------------------------------------------------------------------------------------------
    def filter_layers(self, adapter: Adapter) -> tuple[int, ...]:
        """The filtering layers (prefill) / whose first is the first trimmed or evicting layer (decode)."""
        depth = len(adapter.decoder_layers)
        layers = self.layers if self.layers is not None else scaled_filter_layers(depth)
        if self.prefill and layers[-1] > depth - 2:
            raise ValueError(f"{self.name}: filtering layers {layers} need a later layer to drop before; this model "
                             f"has {depth} decoder layers, so use layers in 0..{depth - 2}")
        if layers[0] >= depth:
            raise ValueError(f"{self.name}: layers {layers} start past the last of the {depth} decoder layers")
        return layers

    def operators(self, adapter: Adapter) -> list:
        self.check_support(adapter)
        self.check_budget(adapter, per="view")
        depth = len(adapter.decoder_layers)
        operators: list = []
        if self.vision:
            operators.append(self._vision_stage(adapter))
        key_block = len(adapter.vision_layers) - 1 if "cls" in adapter.capabilities else None
        wants_keys = self.prefill or self.decode
        operators.append(KeyTokens(self.key_ratio if wants_keys else 0.0, key_block, self.order))
        if self.prefill or self.decode:
            layers = self.filter_layers(adapter)
        if self.prefill:
            target = (lambda tokens, patches: self.view_target(patches)) if self.budgeted else None
            operators.append(DualAttentionFilter(layers, depth, self.gamma_g, self.gamma_i, target))
        if self.decode and self.decode_policy == "trim":
            operators.append(CacheTrim(layers[0]))
        elif self.decode:
            operators.append(OutputAwareEviction(tuple(range(layers[0], depth)), self.evict_threshold, self.patience,
                                                 self.floor_of if self.budgeted else None))
        return operators

    def _vision_stage(self, adapter: Adapter) -> WindowMerge | None:
        grid = adapter.grid
        try:
            windows = window_indices(grid, self.window)
        except ValueError:
            raise ValueError(f"{self.name}: {self.window}x{self.window} windows do not tile the {grid[0]}x{grid[1]} "
                             f"patch grid of this vision tower; use a window that divides {grid[0]} and {grid[1]}, "
                             "or vision=False") from None
        if adapter.default_feature_block < 1:
            raise ValueError(f"{self.name}: windows merge after ViT block 0, but this model takes its features from "
                             "block 0; use vision=False")
        cap = self.merge_cap(grid[0] * grid[1])
        exact = cap is not None and not (self.prefill or self.decode)  # alone, the budget sets the count
        return WindowMerge(windows, len(adapter.vision_layers) - 1, self.tau, self.merge_count, cap, exact)

    def resolved(self, adapter: Adapter) -> dict[str, Any]:
        depth = len(adapter.decoder_layers)
        out: dict[str, Any] = {"stages": [s for s in ("vision", "prefill", "decode") if getattr(self, s)]}
        if self.vision:
            out["merge_cap"] = self.merge_cap(adapter.grid[0] * adapter.grid[1])
        if self.prefill or self.decode:
            layers = self.filter_layers(adapter)
            out["key_set"] = "cls" in adapter.capabilities and self.key_ratio > 0
        if self.prefill:
            out.update(filter_layers=list(layers), drop_before=[layer + 1 for layer in layers])
        if self.decode:
            out.update(decode_policy=self.decode_policy, decode_layers=[layers[0], depth - 1])
        fixed = adapter.fixed_tokens_per_image
        if self.prefill and self.budgeted and fixed is not None:  # the plan of a view nothing merged in
            keys = math.ceil(self.key_ratio * fixed) if out["key_set"] else 0
            plan = solve_view_plan(fixed, max(1, keys), self.view_target(fixed), tuple(layer + 1 for layer in layers),
                                   depth)
            out["plan_without_merge"] = {"counts": list(plan.counts), "rho": round(plan.rho, 4),
                                         "mean_tokens": round(plan.mean, 2)}
        return out


@register
class MustDropVision(MustDrop):
    """MustDrop's stage 1 alone (see ``mustdrop``): window merging inside the ViT, tokens handed to the LLM in
    ``order``. Budget: ``keep`` / ``ratio`` = tokens per view entering the LLM, reached by merging the
    floor((T - keep) / (window² - 1)) most similar windows whatever ``tau`` (LightCompress-style)."""

    name = "mustdrop_vision"
    stages = ("vision", "pre_llm")
    budget_convention = "visual tokens per view entering the LLM (window merges of window² - 1 tokens each)"
    params = VISION_PARAMS
    switches = {"vision": True, "prefill": False, "decode": False}


@register
class MustDropPrefill(MustDrop):
    """MustDrop's stage 2 alone (see ``mustdrop``): the key set (where the tower has [CLS]) and the dual-attention
    filter; the cache keeps what each layer saw. Runs on every family (no key set on Qwen2-VL, positions original
    there)."""

    name = "mustdrop_prefill"
    stages = ("pre_llm", "layer")
    requires = frozenset()
    params = (*KEY_PARAMS, *PREFILL_PARAMS)
    switches = {"vision": False, "prefill": True, "decode": False}


@register
class MustDropDecode(MustDrop):
    """MustDrop's stage 3 alone (see ``mustdrop``), with the output-aware policy (the trim policy needs the prefill
    stage): the key set is tagged and stale visual entries are evicted while decoding. Budget: ``keep`` / ``ratio``
    is a floor of visual entries per view and layer that eviction respects; the prefill is untouched."""

    name = "mustdrop_decode"
    stages = ("pre_llm", "decode")
    budget_convention = "floor of visual KV entries per view kept by every evicting layer (prefill untouched)"
    requires = frozenset()
    params = (*KEY_PARAMS, *DECODE_ONLY_PARAMS)
    switches = {"vision": False, "prefill": False, "decode": True}
