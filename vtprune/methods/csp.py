"""LVLM_CSP: a few representative image tokens in the shallow layers, every token in the middle ones, the tokens the
query attends to most in the deep ones."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from vtprune.methods.base import Method, Param, register, scaled_layer
from vtprune.methods.scoring import attention_received, cls_attention
from vtprune.models.base import Adapter
from vtprune.ops import (
    group_topk,
    nearest_by_cosine,
    nearest_point,
    random_indices,
    split_budget,
    stride_membership,
    stride_representatives,
    topk_indices,
    uniform_grid_indices,
)
from vtprune.runtime.operators import (
    ImageTokens,
    LayerContext,
    LayerOperator,
    PreLLMContext,
    PreLLMOperator,
    Reduction,
    Transition,
)

PAPER_DEPTH = 32
ILLUSTRATIVE_CLUSTER_UNTIL = 12  # an illustrative L_c of 32 layers ([GAP]), not a value read from the paper
ILLUSTRATIVE_PRUNE_FROM = 16  # an illustrative L_p of 32 layers ([GAP]), not a value read from the paper
# Without a budget: a layer average of 11/32 of N, i.e. 88 of 256 (L_c 12, L_p 16 of 32, N_c = K =
# N/4): a 65.6% token reduction, near the paper's 65% headline. Not a value read from the paper.
DEFAULT_RATIO = 11 / 32
CLUSTERINGS = ("uniform_1d", "uniform_2d", "random", "cls", "seg_first")
SCATTERS = ("raw", "copy_rep", "rep_delta")
REP, CLUSTER = "csp_rep", "csp_cluster"  # pre-LLM tags: representative flag; cluster id + 1, unique in its sample


@dataclass(frozen=True)
class Plan:
    """One image's plan on a ``depth``-layer LLM: its ``visual_tokens`` N, ``cluster_tokens`` N_c entering layers
    [0, cluster_until), all N in [cluster_until, prune_from), ``prune_tokens`` K in [prune_from, depth)."""

    visual_tokens: int
    depth: int
    cluster_until: int
    prune_from: int
    cluster_tokens: int
    prune_tokens: int

    @property
    def profile(self) -> list[int]:
        """Image tokens entering each decoder layer."""
        return ([self.cluster_tokens] * self.cluster_until
                + [self.visual_tokens] * (self.prune_from - self.cluster_until)
                + [self.prune_tokens] * (self.depth - self.prune_from))

    @property
    def mean_tokens(self) -> float:
        """(L_c N_c + (L_p - L_c) N + (L - L_p) K) / L: the paper's average image tokens per layer."""
        return layer_average(self.visual_tokens, self.depth, self.cluster_until, self.prune_from,
                             self.cluster_tokens, self.prune_tokens)

    def summary(self) -> dict[str, Any]:
        """JSON-ready (stored with bench results)."""
        return {"visual_tokens": self.visual_tokens, "cluster_until": self.cluster_until,
                "prune_from": self.prune_from, "cluster_tokens": self.cluster_tokens,
                "prune_tokens": self.prune_tokens, "mean_tokens": round(self.mean_tokens, 2),
                "token_reduction": round(1 - self.mean_tokens / self.visual_tokens, 4), "profile": self.profile}


def layer_average(visual_tokens: int, depth: int, cluster_until: int, prune_from: int, cluster_tokens: int,
                  prune_tokens: int) -> float:
    """Image tokens per layer averaged over the depth: (L_c N_c + (L_p - L_c) N + (L - L_p) K) / L."""
    return (cluster_until * cluster_tokens + (prune_from - cluster_until) * visual_tokens
            + (depth - prune_from) * prune_tokens) / depth


def view_shares(total: int, sizes: list[int]) -> list[int]:
    """``total`` representatives shared among views of ``sizes``: one per view first when there are enough, the rest
    in proportion to the views' remaining tokens (largest remainder, ties to the earlier view)."""
    if total >= len(sizes):
        return [1 + s for s in split_budget(total - len(sizes), [size - 1 for size in sizes])]
    return split_budget(total, sizes)


def _round(value: float) -> int:
    return math.floor(value + 0.5)  # halves go up (more tokens)


@register
class CSP(Method):
    """LVLM_CSP — Chen et al., "LVLM_CSP: Accelerating Large Vision Language Models via Clustering, Scattering, and
    Pruning for Reasoning Segmentation", arXiv 2504.10854. No public code exists, and only the paper's abstract and
    its public reviews could be read: the layer settings, the counts and the scatter mechanism are unknown ([GAP]);
    the choices made for them are listed at the end.

    Stages: ``pre_llm`` (the clustering decision only: every image token enters the LLM, tagged with its cluster)
    and ``layer`` (LLM prefill, three depth stages):

    1. Clustering, layers [0, ``cluster_until``): only N_c representative tokens per image are in the sequence (the
       others leave before layer 0). ``clustering``: ``uniform_1d`` (default, the reviews' formula: representatives
       ``i * floor(n / k)`` over the view's raster order, a token belonging to ``floor(j / stride)``, the last cluster
       taking the tail; a stride that divides the grid width picks columns), ``uniform_2d`` (a regular 2-D lattice,
       ``uniform_grid_indices``, members join the nearest lattice point), ``random`` (seeded by ``seed`` and the
       image, so an image gets the same set alone or in any batch) and ``cls`` (top N_c by the vision tower's [CLS]
       attention of the block feeding the projector, head mean, [GAP]: which block; refused on towers without a [CLS]
       token, Qwen2-VL); with ``random``/``cls`` a token joins the representative whose LLM-input (projector) feature
       is most cosine-similar. ``seg_first`` (an instance segmenter's masks) needs a detector vtprune does not ship
       and is refused. Each view is clustered on its own (LLaVA-NeXT: base image and every crop; Qwen video: every
       frame): N_c is shared among the views one each first, then by size (our choice).
    2. Scattering, layers [``cluster_until``, ``prune_from``): every image token is back. [GAP] what state a returning
       token has; ``scatter``: ``raw`` (default: its layer-0 input, the projector output), ``copy_rep`` (its
       representative's state entering layer ``cluster_until``), ``rep_delta`` (its layer-0 input plus what its
       representative gained over layers [0, ``cluster_until``)). A token whose view has no representative, and a
       returning newline separator, comes back raw.
    3. Pruning, layers [``prune_from``, L): the top K image tokens per image by the head-mean attention that the query
       row pays them in layer ``prune_from - 1`` (recomputed from that layer's q/k with RoPE, softmax over every key
       the row sees; all N tokens are present there), kept in sequence order. ``prune_query``: ``seg_token`` (the row
       of the [SEG] token, id from ``seg_token_id`` or ``model.config.seg_token_id``; the paper's criterion, which
       needs the [SEG] token in the prompt, i.e. LISA's teacher-forced evaluation; several [SEG] rows are averaged,
       [GAP]), ``last`` (the last prompt token: our *last-token adaptation* for VQA, not the paper's method;
       ``label()`` and ``resolved()`` say so) or ``auto`` (default: ``seg_token`` when an id is known, else ``last``).

    Defaults ([GAP]: the paper's layers and counts could not be read): ``cluster_until`` 12 and ``prune_from`` 16 of
    32 layers — an illustrative setting, not the paper's — scaled to the depth (``max(1, round(b * L / 32))``,
    ``prune_from`` at least ``cluster_until + 1``; when only one is given the other's default adapts to it); without
    a budget or counts, ``ratio`` 11/32 (88 of 256 tokens with N_c = K = N/4 at 12/16 of 32,
    i.e. N_c = K = N/4 on 32 layers and about 65.6% fewer image tokens per layer at any depth, near the paper's 65%
    headline; solved like a given ratio, clamped to 1..N instead of refused). Positions: always the original ones (no
    renumbering; ``positions='renumber'`` is refused), 3-D M-RoPE ids on Qwen2-VL. LLaVA-NeXT newline tokens:
    ``separators='keep'`` (never clustered or pruned; ``'rows'``/``'drop'`` work, ``'candidates'`` is refused as a
    newline has no grid place to cluster).

    Budget convention (the paper's reporting unit): ``keep`` = image tokens per image averaged over all decoder layers,
    avg = (L_c N_c + (L_p - L_c) N + (L - L_p) K) / L; ``ratio`` = that average as a share of the image's N. Given
    one, N_c = K is solved as the integer making avg closest (ties: more tokens); with one of ``cluster_tokens`` /
    ``prune_tokens`` fixed, the other is solved. A budget below avg at N_c = K = 1 is refused at ``apply()`` on
    fixed-size layouts (LLaVA-1.5; a ``ratio`` below (L_p - L_c) / L on every model), with the lowest reachable value;
    elsewhere at the forward of the image that cannot reach it. The scattering layers alone hold all N tokens, so
    small averages need a short scattering stage (one layer of 6 already averages N / 6). ``plan(N, L)`` and
    ``resolved()`` give the plan; ``pruner.stats.mean_visual_tokens`` the measured average and
    ``pruner.stats.visual_flops`` the image-token FLOPs (the two reduction measures the paper reports).

    Choices where the paper is not known ([GAP]): the boundaries and the default budget above; N_c = K
    when a budget is solved; ``uniform_1d`` and ``raw`` as defaults; the membership rules (stride cluster, nearest
    lattice point, nearest representative by cosine of the projector output); the [CLS] block; per-view clustering
    with N_c shared among views, K per image over all its views; the criterion read in layer ``prune_from - 1``
    (the last layer where every token is present) with RoPE at the original positions; several [SEG] rows averaged.
    """

    name = "csp"
    paper = "arXiv 2504.10854"
    stages = ("pre_llm", "layer")
    budget_convention = ("image tokens per image averaged over all decoder layers (L_c N_c + (L_p - L_c) N + "
                         "(L - L_p) K) / L, the paper's unit; N_c = K solved from it")
    default_ratio = DEFAULT_RATIO  # a layer average, as keep/ratio
    default_positions = "original"
    default_separators = "keep"
    params = (
        Param("clustering", "uniform_1d", "how the representatives entering the shallow layers are chosen: "
              "'uniform_1d' (stride over raster order), 'uniform_2d' (2-D lattice), 'random' (seeded), 'cls' (vision "
              "[CLS] attention; needs a [CLS] token) or 'seg_first' (refused: needs an instance segmenter)", str,
              CLUSTERINGS),
        Param("scatter", "raw", "state of the tokens returning at cluster_until: 'raw' (layer-0 input), 'copy_rep' "
              "(the representative's state), 'rep_delta' (own layer-0 input + the representative's update)", str,
              SCATTERS),
        Param("cluster_until", None, "L_c: layers [0, L_c) see only the representatives (None: 12 of 32, scaled; "
              "0: no clustering stage)", int, low=0),
        Param("prune_from", None, "L_p: layers [L_c, L_p) see every image token, layers >= L_p the top K (None: 16 "
              "of 32, scaled, at least L_c + 1)", int, low=1),
        Param("cluster_tokens", None, "N_c: representatives per image (None: solved from keep/ratio)", int, low=1),
        Param("prune_tokens", None, "K: image tokens per image kept from L_p on (None: solved from keep/ratio)",
              int, low=1),
        Param("prune_query", "auto", "query row of the pruning criterion: 'seg_token' (the [SEG] token, the paper), "
              "'last' (last prompt token, the last-token adaptation) or 'auto' ([SEG] when its id is known)", str,
              ("auto", "seg_token", "last")),
        Param("seg_token_id", None, "token id of [SEG] (None: model.config.seg_token_id when the config has it)", int,
              low=0),
        Param("seed", 0, "seed of clustering='random' (with the image's pixels)", int),
    )

    def __init__(self, **values: Any) -> None:
        super().__init__(**values)
        if self.clustering == "seg_first":
            raise ValueError("csp: clustering='seg_first' needs an instance segmenter (e.g. a small YOLO) to give "
                             "object masks on the token grid; vtprune ships no detector, so this design is out of "
                             "scope. Use clustering='uniform_1d' (default), 'uniform_2d', 'random' or 'cls'")
        if self.positions == "renumber":
            raise ValueError("csp: every image token keeps its original position in all three stages (representatives "
                             "and returning tokens alike); positions='renumber' is not supported, use "
                             "positions='original' (the default)")
        if self.separators == "candidates":
            raise ValueError("csp clusters each view's grid tokens; separators='candidates' would cluster LLaVA-NeXT's "
                             "newline tokens, which have no grid place. Use separators='keep' (default), 'rows' or "
                             "'drop'")
        budget = self.keep is not None or self.ratio is not None
        if budget and self.cluster_tokens is not None and self.prune_tokens is not None:
            raise ValueError("csp: give a budget (keep= / ratio=, the layer average) or both counts (cluster_tokens= "
                             "and prune_tokens=), not all three: with both counts fixed the average is fixed")
        if self.cluster_until is not None and self.prune_from is not None and self.cluster_until >= self.prune_from:
            raise ValueError(f"csp: cluster_until={self.cluster_until} must be below prune_from={self.prune_from}: "
                             "layers [cluster_until, prune_from) are the scattering stage, where every image token is "
                             "back and the pruning criterion is read; use cluster_until < prune_from")
        self._plans: dict[tuple[int, int], Plan] = {}

    # --- stage boundaries and counts -------------------------------------------------------------------------------
    def boundaries(self, depth: int) -> tuple[int, int]:
        """(L_c, L_p) on a ``depth``-layer LLM."""
        lc, lp = self.cluster_until, self.prune_from
        if lc is None:
            lc = scaled_layer(ILLUSTRATIVE_CLUSTER_UNTIL, PAPER_DEPTH, depth)
            if lp is not None:
                lc = min(lc, lp - 1)
        if lp is None:
            lp = max(lc + 1, scaled_layer(ILLUSTRATIVE_PRUNE_FROM, PAPER_DEPTH, depth))
        if lc >= lp:
            raise ValueError(f"csp: cluster_until={lc} must be below prune_from={lp}; use cluster_until < prune_from")
        if lp > depth - 1:
            raise ValueError(
                f"csp: prune_from={lp} is past the last of the {depth} decoder layers (tokens are pruned before layer "
                f"prune_from, and the three stages must fit in it); use cluster_until < prune_from <= {depth - 1}"
                + ("" if self.prune_from is not None else f" (the default needs at least {lc + 2} layers)"))
        return lc, lp

    def plan(self, visual_tokens: int, depth: int) -> Plan:
        """The plan for an image of ``visual_tokens`` tokens on a ``depth``-layer LLM (see the class docstring)."""
        key = (visual_tokens, depth)
        if key not in self._plans:
            self._plans[key] = self._solve(visual_tokens, depth)
        return self._plans[key]

    def _solve(self, n: int, depth: int) -> Plan:
        lc, lp = self.boundaries(depth)
        scatter, tail = lp - lc, depth - lp
        nc = None if self.cluster_tokens is None else min(self.cluster_tokens, n)
        k = None if self.prune_tokens is None else min(self.prune_tokens, n)
        if lc == 0:
            nc = n  # no clustering stage
        given = self.keep is not None or self.ratio is not None
        if nc is not None and k is not None:
            if given:
                raise ValueError(f"csp: with cluster_until=0 only K sets the average; give keep=/ratio= or "
                                 f"prune_tokens={self.prune_tokens}, not both")
            return Plan(n, depth, lc, lp, nc, k)
        if self.keep is not None:
            target = min(self.keep, n)
        else:
            target = (self.ratio if self.ratio is not None else DEFAULT_RATIO) * n
        total = target * depth - scatter * n
        if nc is None and k is None:
            nc = k = _round(total / (lc + tail))
            low = layer_average(n, depth, lc, lp, 1, 1)
        elif k is None:
            k = _round((total - lc * nc) / tail)
            low = layer_average(n, depth, lc, lp, nc, 1)
        else:
            nc = _round((total - tail * k) / lc)
            low = layer_average(n, depth, lc, lp, 1, k)
        if not given:  # the default average: as near as the counts allow
            return Plan(n, depth, lc, lp, min(max(nc, 1), n), min(max(k, 1), n))
        if min(nc, k) < 1:
            unit = "ratio" if self.keep is None else "keep"
            need = f"ratio >= {low / n:.4f}" if self.keep is None else f"keep >= {math.ceil(low - 0.5)}"
            raise ValueError(
                f"csp: a layer average of {target:g} image tokens per image ({unit}; the image has {n}) cannot be "
                f"reached with cluster_until={lc}, prune_from={lp} on {depth} layers: the {scatter} scattering "
                f"layer(s) hold all {n} tokens, so the lowest reachable average is {low:.2f}; use {need}, or a shorter "
                "scattering stage (prune_from closer to cluster_until)")
        if max(nc, k) > n:  # a fixed count too small for the budget
            high = layer_average(n, depth, lc, lp, n if self.cluster_tokens is None else nc,
                                 n if self.prune_tokens is None else k)
            raise ValueError(f"csp: a layer average of {target:g} of {n} image tokens is above what the fixed counts "
                             f"reach ({high:.2f}); raise cluster_tokens/prune_tokens or lower the budget")
        return Plan(n, depth, lc, lp, nc, k)

    def prune_budgets(self, image_candidates: torch.Tensor, depth: int) -> torch.Tensor:
        """K for every image [B, G] (0 for absent images)."""
        out = torch.zeros_like(image_candidates)
        for n in image_candidates.unique().tolist():
            if n > 0:
                out[image_candidates == n] = self.plan(int(n), depth).prune_tokens
        return out

    # --- the pruning query ---------------------------------------------------------------------------------------
    def seg_id(self, adapter: Adapter) -> int | None:
        """The [SEG] token id: ``seg_token_id``, else the model config's ``seg_token_id``, else None."""
        if self.seg_token_id is not None:
            return self.seg_token_id
        config = adapter.model.config
        for part in (config, getattr(config, "text_config", None)):
            value = getattr(part, "seg_token_id", None) if part is not None else None
            if value is not None:
                return int(value)
        return None

    def query(self, adapter: Adapter) -> str:
        """'seg_token' or 'last' on this model."""
        if self.prune_query == "last":
            return "last"
        known = self.seg_id(adapter) is not None
        if self.prune_query == "seg_token" and not known:
            raise ValueError(
                f"csp: prune_query='seg_token' needs the [SEG] token's id, and {type(adapter.model).__name__}'s config "
                "has no seg_token_id; pass seg_token_id=<id of '[SEG]' in the tokenizer>, or use prune_query='last' "
                "(the last-token adaptation for prompts without [SEG])")
        return "seg_token" if known else "last"

    def label(self, adapter: Adapter | None = None) -> str:
        """'csp' with the paper's [SEG] query, 'csp (last-token adaptation)' with the last prompt token."""
        if adapter is not None:
            query = self.query(adapter)
        elif self.prune_query == "auto":
            query = "seg_token" if self.seg_token_id is not None else "auto"
        else:
            query = self.prune_query
        return {"seg_token": "csp", "last": "csp (last-token adaptation)"}.get(
            query, "csp ([SEG] query if the model config has seg_token_id, else last-token adaptation)")

    # --- installation ------------------------------------------------------------------------------------------
    def operators(self, adapter: Adapter) -> list:
        depth = len(adapter.decoder_layers)
        lc, lp = self.boundaries(depth)
        if self.clustering == "cls" and lc > 0 and "cls" not in adapter.capabilities:
            raise ValueError(
                f"csp: clustering='cls' needs a vision tower with a [CLS] token; {type(adapter.model).__name__} "
                f"({adapter.family}) has none. Use clustering='uniform_1d' (default), 'uniform_2d' or 'random'")
        query = self.query(adapter)
        self.check_budget(adapter)
        if self.ratio is not None and self.cluster_tokens is None and self.prune_tokens is None and \
                self.ratio < (lp - lc) / depth:
            raise ValueError(f"csp: ratio={self.ratio} is below what cluster_until={lc}, prune_from={lp} reach on "
                             f"{depth} layers (the scattering layers hold every token: at least {(lp - lc) / depth:.4f}"
                             "); use a larger ratio or a shorter scattering stage")
        fixed = adapter.fixed_tokens_per_image
        if fixed is not None:
            self.plan(fixed, depth)  # refuses an unreachable budget at apply()
        ops: list = []
        if lc > 0:
            ops += [_Clusters(self, depth), _ClusterScatter(self, lc)]
        return ops + [_Prune(self, lp, depth, query, self.seg_id(adapter))]

    def resolved(self, adapter: Adapter) -> dict[str, Any]:
        depth = len(adapter.decoder_layers)
        lc, lp = self.boundaries(depth)
        query = self.query(adapter)
        out: dict[str, Any] = {"variant": self.label(adapter), "clustering": self.clustering, "scatter": self.scatter,
                               "prune_query": query, "seg_token_id": self.seg_id(adapter) if query == "seg_token"
                               else None, "depth": depth, "cluster_until": lc, "prune_from": lp}
        fixed = adapter.fixed_tokens_per_image
        if fixed is not None:
            out.update(self.plan(fixed, depth).summary())
        return out

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, variant={self.label()!r})"

    # --- clustering ----------------------------------------------------------------------------------------------
    def cluster_image(self, ctx: PreLLMContext, index: int, image: ImageTokens, count: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(representative flag [n], cluster index [n], -1: none) of one image's n tokens with ``count``
        representatives shared among its views."""
        if image.record.merged is not None:
            raise ValueError("csp clusters the tokens of each view's grid; these tokens were merged inside the vision "
                             "tower, which csp does not compose with")
        device = image.features.device
        n = len(image.features)
        layout = image.layout
        where = image.sources.strongest()
        partition = layout.partition[where]
        views = partition.unique().tolist()
        members_of = [(partition == v).nonzero().flatten() for v in views]
        shares = view_shares(count, [len(m) for m in members_of])
        representative = torch.zeros(n, dtype=torch.bool, device=device)
        cluster = torch.full((n,), -1, dtype=torch.long, device=device)
        generator = ctx.generator(index) if self.clustering == "random" else None
        scores = cls_attention(ctx, image) if self.clustering == "cls" else None
        first = 0
        for members, share in zip(members_of, shares):
            if share == 0:
                continue
            rows, cols = layout.row[where[members]], layout.col[where[members]]
            order = (rows * (int(cols.max()) + 1) + cols).argsort()  # the view's raster order
            members, rows, cols = members[order], rows[order], cols[order]
            size = len(members)
            if self.clustering == "uniform_1d":
                chosen = stride_representatives(size, share).to(device)
                local = stride_membership(size, share).to(device)
            elif self.clustering == "uniform_2d":
                top, left = int(rows.min()), int(cols.min())
                height, width = int(rows.max()) - top + 1, int(cols.max()) - left + 1
                if height * width != size:
                    raise ValueError(f"csp: clustering='uniform_2d' needs each view to be a full rectangle; a view of "
                                     f"{size} tokens spans {height}x{width}")
                chosen = uniform_grid_indices(height, width, share).to(device)
                coords = torch.stack([rows - top, cols - left], dim=1)
                local = nearest_point(coords, coords[chosen])
            else:
                if self.clustering == "random":
                    chosen = random_indices(1, size, share, generator)[0].to(device)
                else:
                    chosen = topk_indices(scores[members], share)
                local = nearest_by_cosine(image.features[members], chosen)
            representative[members[chosen]] = True
            cluster[members] = local + first
            first += share
        return representative, cluster


class _Clusters(PreLLMOperator):
    """Every image token enters the LLM, tagged: ``csp_rep`` 1 for representatives, ``csp_cluster`` its cluster + 1
    (numbered through the sample's images, so a cluster id names one cluster of one sample)."""

    def __init__(self, method: CSP, depth: int) -> None:
        self.method, self.depth = method, depth

    def reduce(self, ctx: PreLLMContext) -> list[Reduction]:
        out, offsets = [], {}
        for index, image in enumerate(ctx.images):
            n = len(image.features)
            plan = self.method.plan(n, self.depth)
            representative, cluster = self.method.cluster_image(ctx, index, image, plan.cluster_tokens)
            start = offsets.get(image.sample, 0)
            offsets[image.sample] = start + n
            cluster_tag = torch.where(cluster >= 0, cluster + start + 1, 0)
            out.append(Reduction(image.features, image.sources,
                                 {REP: representative.float(), CLUSTER: cluster_tag.float()}))
        return out


class _ClusterScatter(LayerOperator):
    """Before layer 0: only the representatives stay. Before layer L_c: every missing image token comes back."""

    needs_previous_input = False

    def __init__(self, method: CSP, cluster_until: int) -> None:
        self.method, self.layers = method, (0, cluster_until)

    def transform(self, ctx: LayerContext) -> Transition:
        if ctx.layer == 0:
            return Transition(keep=ctx.candidate & (ctx.tags[REP] > 0))
        batch, width = ctx.universe_visual.shape
        slots = ctx.rows.masked_fill(~ctx.valid, width)
        present = torch.zeros(batch, width + 1, dtype=torch.bool, device=slots.device).scatter(
            1, slots, torch.ones_like(ctx.valid))[:, :width]
        missing = ctx.universe_visual & ~present
        restore = torch.where(missing, torch.arange(width, device=slots.device), -1)
        return Transition(restore=restore, restore_hidden=self.returning_states(ctx, missing))

    def returning_states(self, ctx: LayerContext, missing: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, n0, D] of the returning tokens (rows of the LLM-input sequence) per ``scatter``."""
        layer0 = ctx.universe_hidden
        if self.method.scatter == "raw":
            return layer0
        cluster = ctx.universe_tags[CLUSTER].long()  # [B, n0], 0: none
        slots = int(cluster.max()) + 2  # the last slot takes what is not a representative
        current = (ctx.tags[REP] > 0) & ctx.valid
        slot = torch.where(current, ctx.tags[CLUSTER].long(), slots - 1)
        index_of = torch.full((cluster.shape[0], slots), -1, dtype=torch.long, device=cluster.device)
        index_of.scatter_(1, slot, torch.where(current, torch.arange(ctx.rows.shape[1], device=slot.device), -1))
        row_of = torch.full_like(index_of, -1).scatter_(1, slot, torch.where(current, ctx.rows, -1))
        index_of[:, -1] = -1
        index, rep_row = index_of.gather(1, cluster), row_of.gather(1, cluster)  # the representative's
        has = missing & (index >= 0) & (cluster > 0)
        dim = layer0.shape[-1]
        now = ctx.hidden_states.gather(1, index.clamp_min(0)[..., None].expand(-1, -1, dim))
        if self.method.scatter == "copy_rep":
            value = now.to(layer0.dtype)
        else:
            start = layer0.gather(1, rep_row.clamp_min(0)[..., None].expand(-1, -1, dim))
            value = (layer0.float() + now.float() - start.float()).to(layer0.dtype)
        return torch.where(has[..., None], value, layer0)


class _Prune(LayerOperator):
    """Before layer L_p: the top K image tokens per image by the query row's attention in layer L_p - 1."""

    def __init__(self, method: CSP, prune_from: int, depth: int, query: str, seg_id: int | None) -> None:
        self.method, self.layers, self.depth = method, (prune_from,), depth
        self.query, self.seg_id = query, seg_id

    def scores(self, ctx: LayerContext) -> torch.Tensor:
        if self.query == "last":
            return attention_received(ctx, "last")
        if ctx.token_ids is None:
            raise ValueError("csp: prune_query='seg_token' finds the [SEG] token in input_ids; call the model with "
                             "input_ids (not inputs_embeds)")
        n = ctx.valid.shape[1]
        order = torch.arange(n, device=ctx.valid.device)
        seg = (ctx.token_ids == self.seg_id) & ctx.valid
        images = ctx.visual.any(1)
        lacking = (images & ~seg.any(1)).nonzero().flatten().tolist()
        if lacking:
            raise ValueError(
                f"csp: prompt row(s) {lacking} have no [SEG] token (id {self.seg_id}); prune_query='seg_token' ranks "
                "image tokens by the [SEG] row's attention, so the prompt must contain it (LISA's teacher-forced "
                "'... [SEG].'). Add it, or use prune_query='last' (the last-token adaptation)")
        last_visual = torch.where(ctx.visual, order, -1).max(1).values
        first_seg = torch.where(seg, order, n).min(1).values
        early = (images & (first_seg < last_visual)).nonzero().flatten().tolist()
        if early:
            raise ValueError(f"csp: in prompt row(s) {early} a [SEG] token comes before image tokens, which it cannot "
                             "attend to; put [SEG] after the images")
        width = int(seg.sum(1).max())
        rows = torch.where(seg, order, -1).sort(dim=1, descending=True).values[:, :width]
        return attention_received(ctx, "rows", query_rows=rows)

    def transform(self, ctx: LayerContext) -> Transition:
        group = ctx.image.masked_fill(~ctx.candidate, -1)
        budgets = self.method.prune_budgets(ctx.image_candidates, self.depth)
        return Transition(keep=group_topk(self.scores(ctx), group, budgets))
