"""ATP-LLaVA: small trained modules between decoder layers predict, per image, the thresholds that prune its visual
tokens, so counts differ by layer and by instance."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vtprune.methods.base import Method, Param, register, scaled_layer
from vtprune.models.base import Adapter
from vtprune.ops import group_topk, reweight_keys, sparsest_grid_stride
from vtprune.runtime.operators import LayerContext, LayerOperator, Transition

PAPER_DEPTH = 32
# modules after layers 4, 14, 24 of 32 = before layers 5, 15, 25 ([GAP]: the paper's qualitative figure shows pruning
# at layers 4 and 14; the third is a reimplementation's)
PAPER_LAYERS = (5, 15, 25)
DEFAULTS = {"temperature": 10.0, "score_norm": "max", "strides": (2, 3, 4, 6, 8, 12), "spatial_lambda": 3.0,
            "hidden": 32}
FEATURES = 11
SHIPPED = Path(__file__).resolve().parent.parent / "reference"
CONFIG_NAME, WEIGHTS_NAME = "atp_config.json", "atp.safetensors"


class ThresholdNet(nn.Module):
    """Per image: summary features of its token scores -> (theta_r, theta_s) in (0, 1): a shared trunk and two
    heads. Initialised to keep almost everything (theta_r near 0) with the densest grid as spatial floor."""

    def __init__(self, hidden: int, redundancy_init: float = 0.02, spatial_init: float = 0.2) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(FEATURES, hidden), nn.GELU())
        self.redundancy = nn.Linear(hidden, 1)
        self.spatial = nn.Linear(hidden, 1)
        with torch.no_grad():
            for head, init in ((self.redundancy, redundancy_init), (self.spatial, spatial_init)):
                head.weight.mul_(0.1)
                head.bias.fill_(float(torch.logit(torch.tensor(init))))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(features)
        return torch.sigmoid(self.redundancy(h)).squeeze(-1), torch.sigmoid(self.spatial(h)).squeeze(-1)


def redundancy_scores(probs: torch.Tensor, visual: torch.Tensor, valid: torch.Tensor, image: torch.Tensor,
                      weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(self-modality, cross-modality) attention each token receives [B, n] from a head-mean map ``probs`` [B, n, n].

    Self: mean over the later visual rows of the same image, each weighted by its soft keep weight (the causal mask
    lets token j receive only from rows i > j, so the mean is over those rows, not over all visual tokens). Cross:
    mean over the later text rows (instruction tokens after the image; earlier text cannot see it).
    """
    n = probs.shape[-1]
    order = torch.arange(n, device=probs.device)
    later = order[None, :, None] > order[None, None, :]  # [1, i, j]: row i after column j
    row_weight = (weight * visual * valid).float()
    self_rows = later & (image[:, :, None] == image[:, None, :])
    self_weight = self_rows * row_weight[:, :, None]
    self_score = (probs * self_weight).sum(1) / self_weight.sum(1).clamp_min(1e-12)
    text_rows = later & (valid & ~visual)[:, :, None]
    cross_score = (probs * text_rows).sum(1) / text_rows.sum(1).clamp_min(1)
    return self_score, cross_score


def _per_image(values: torch.Tensor, weight: torch.Tensor, image: torch.Tensor, images: int) -> torch.Tensor:
    """Weighted sums [B, G] of ``values`` [B, n] over each image's tokens (``weight`` 0 elsewhere)."""
    out = values.new_zeros(values.shape[0], images + 1)
    return out.scatter_add(1, image.clamp_min(-1) % (images + 1), values * weight)[:, :images]


def _soft_weight(ctx: LayerContext) -> torch.Tensor:
    """Each token's soft keep weight from earlier training-mode stages [B, n] (all 1 in inference mode)."""
    return torch.ones_like(ctx.valid, dtype=torch.float32) if ctx.weight is None else ctx.weight.float()


class _ATPStage(LayerOperator, nn.Module):
    """All of a method's ATP modules (one per boundary); records thresholds and alive counts of the last forward."""

    def __init__(self, method: ATP, boundaries: tuple[int, ...], settings: dict[str, Any]) -> None:
        nn.Module.__init__(self)
        self.method, self.layers, self.settings = method, boundaries, settings
        self.modules_by_stage = nn.ModuleList(ThresholdNet(settings["hidden"]) for _ in boundaries)
        self.record: dict[str, dict[int, torch.Tensor]] = {}

    def scores(self, ctx: LayerContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(redundancy, self, cross) scores [B, n], normalised per image over its alive candidates."""
        hidden, rope = ctx.previous_input
        batch, n = ctx.valid.shape
        order = torch.arange(n, device=ctx.valid.device)
        rows = order.expand(batch, n)
        key_mask = (order[None, :] <= order[:, None])[None] & ctx.valid[:, None, :]
        probs = ctx.adapter.llm_attention(ctx.layer - 1, hidden, rope, rows, key_mask).mean(1)
        weight = _soft_weight(ctx)
        probs = reweight_keys(probs, weight * ctx.valid)
        self_score, cross_score = redundancy_scores(probs, ctx.visual, ctx.valid, ctx.image, weight)
        alive = ctx.candidate & (weight > 0)
        images = ctx.image_candidates.shape[1]
        normed = [self._normalise(s, alive, ctx.image, images) for s in (self_score, cross_score)]
        return (normed[0] + normed[1]) / 2, normed[0], normed[1]

    def _normalise(self, score: torch.Tensor, alive: torch.Tensor, image: torch.Tensor, images: int) -> torch.Tensor:
        mode = self.settings["score_norm"]
        if mode == "none":
            return score
        index = image.clamp_min(0)
        if mode == "max":
            top = score.new_zeros(score.shape[0], images).scatter_reduce(
                1, index, score.masked_fill(~alive, 0), "amax", include_self=True)
            return score / top.gather(1, index).clamp_min(1e-12)
        total = _per_image(score, alive.float(), image, images)  # sum_to_n: mean 1 over the alive tokens
        count = _per_image(torch.ones_like(score), alive.float(), image, images)
        return score * (count / total.clamp_min(1e-12)).gather(1, index)

    def features(self, ctx: LayerContext, red: torch.Tensor, self_score: torch.Tensor, cross: torch.Tensor,
                 weight: torch.Tensor) -> torch.Tensor:
        """[B, G, FEATURES] per image, weighted by the soft keep weight (hard mode: the alive tokens), detached."""
        images = ctx.image_candidates.shape[1]
        w = (weight * ctx.candidate).float()
        mass = _per_image(torch.ones_like(w), w, ctx.image, images).clamp_min(1e-6)
        columns = []
        for score in (self_score, cross):
            mean = _per_image(score, w, ctx.image, images) / mass
            var = _per_image(score ** 2, w, ctx.image, images) / mass - mean ** 2
            columns += [mean, var.clamp_min(0).sqrt()]
            columns += [_per_image((score > level).float(), w, ctx.image, images) / mass for level in (0.25, 0.5)]
        red_mean = _per_image(red, w, ctx.image, images) / mass
        red_var = _per_image(red ** 2, w, ctx.image, images) / mass - red_mean ** 2
        columns += [red_mean, red_var.clamp_min(0).sqrt(), mass / ctx.image_candidates.clamp_min(1)]
        return torch.stack(columns, -1).detach()

    def transform(self, ctx: LayerContext) -> Transition:
        stage = self.layers.index(ctx.layer)
        if stage == 0:
            self.record = {"theta_r": {}, "theta_s": {}, "alive": {}}
        weight = _soft_weight(ctx)
        red, self_score, cross = self.scores(ctx)
        features = self.features(ctx, red, self_score, cross, weight)
        module = self.modules_by_stage[stage]
        theta_r, theta_s = module(features.to(next(module.parameters()).dtype))
        index = ctx.image.clamp_min(0)
        token_r, token_s = theta_r.gather(1, index), theta_s.gather(1, index)
        stride = sparsest_grid_stride(ctx.row, ctx.col, self.settings["strides"])
        spatial = torch.where(stride > 0, 1 - self.settings["spatial_lambda"] / stride.clamp_min(1).float() ** 2,
                              float("-inf"))
        images = ctx.image_candidates.shape[1]
        self.record["theta_r"][ctx.layer], self.record["theta_s"][ctx.layer] = theta_r, theta_s
        if ctx.training:
            temperature = self.settings["temperature"]
            mask = torch.maximum(torch.sigmoid(temperature * (red - token_r)),
                                 torch.sigmoid(temperature * (spatial - token_s)))
            mask = torch.where(ctx.candidate, mask, torch.ones_like(mask))
            self.record["alive"][ctx.layer] = _per_image(mask, weight * ctx.candidate, ctx.image, images)
            return Transition(weight=mask)
        keep = ctx.candidate & ((red > token_r) | (spatial > token_s))
        group = ctx.image.masked_fill(~ctx.candidate, -1)
        empty = _per_image(keep.float(), torch.ones_like(red), ctx.image, images) == 0
        keep |= group_topk(red, group, (empty & (ctx.image_candidates > 0)).long())  # every image keeps >= 1
        self.record["alive"][ctx.layer] = _per_image(keep.float(), torch.ones_like(red), ctx.image, images)
        return Transition(keep=keep)

    def average_tokens(self, image_candidates: torch.Tensor, depth: int) -> torch.Tensor:
        """Visual tokens per image averaged over all ``depth`` layers [B, G] from the last forward's alive counts
        (soft in training mode): layers before the first module count every token."""
        edges = (*self.layers, depth)
        total = self.layers[0] * image_candidates.float()
        for s, layer in enumerate(self.layers):
            total = total + (edges[s + 1] - layer) * self.record["alive"][layer]
        return total / depth


def model_fingerprint(language_model: nn.Module) -> str:
    """A short digest of a language model's shape and input embeddings (dtype-independent to 3 decimals), so
    trained ATP weights are only loaded onto the model they were trained on."""
    embed = language_model.get_input_embeddings().weight
    sample = embed[: min(64, embed.shape[0])].detach().float().cpu()
    parts = [tuple(embed.shape), len(language_model.layers), round(float(sample.std()), 3),
             round(float(sample.abs().mean()), 3)]
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:16]


def save_atp(path: str | Path, stage: _ATPStage, extra: dict[str, Any]) -> Path:
    """Write trained ATP modules: ``atp_config.json`` (settings, boundaries, training record) + safetensors."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in stage.settings.items()}
    config = {"layers": list(stage.layers), **settings, **extra}
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=1))
    save_file({k: v.detach().cpu().contiguous() for k, v in stage.state_dict().items()}, str(path / WEIGHTS_NAME))
    return path


def shipped_atp() -> list[Path]:
    return sorted(p.parent for p in SHIPPED.glob(f"*/{CONFIG_NAME}"))


@register
class ATP(Method):
    """ATP-LLaVA — Ye et al., "ATP-LLaVA: Adaptive Token Pruning for Large Vision Language Models", CVPR 2025,
    arXiv 2412.00447. No official code exists; what the paper leaves open is marked [GAP] below, with our choice.

    Stage: ``layer`` (LLM prefill), at several boundaries. Before boundary layer l, a module reads layer l-1's
    attention (rows recomputed from its q/k; in training mode reweighted by the soft mask, so they equal what the
    masked layer computed) and scores each alive visual token: self-modality (mean attention from later visual rows
    of its image) and cross-modality (mean from later text rows), each divided by its maximum over the image's alive
    tokens ([GAP]: ``score_norm``), averaged into a redundancy score. A spatial score keeps a uniform grid: a token
    on the sparsest grid of stride s (of ``strides``) that holds it scores ``1 - spatial_lambda / s^2`` ([GAP]).
    A small network (:class:`ThresholdNet`; input: 11 weighted summary statistics of the image's scores, [GAP] — the
    paper's input could not be read) predicts per image theta_r and theta_s. Inference: keep = (redundancy >
    theta_r) or (spatial > theta_s), dropped tokens leave for good, original positions; every image keeps at
    least one token. Training mode: soft mask ``max(sigmoid(T (red - theta_r)), sigmoid(T (sp - theta_s)))``
    multiplied into the earlier stages' mask, applied as a key bias in every later layer (hard == soft > 0.5).

    Defaults: modules after layers 4, 14, 24 of 32 (boundaries 5, 15, 25, scaled to the depth; [GAP]), T = 10,
    strides 2, 3, 4, 6, 8, 12, spatial_lambda 3, hidden 32; LLaVA-NeXT newline tokens always kept ([GAP]: the paper covers LLaVA-1.5 only).
    Budget: learned — ``keep``/``ratio`` are not inference settings; the budget is the layer-averaged target the
    weights were trained for (``vtprune train-atp --target``), stored with them. ``weights``: a folder written by
    ``train-atp``; None loads the shipped weights trained for the shipped MiniLLaVA, refused on other models;
    ``"untrained"`` starts from the keep-everything initialisation (for training).
    """

    name = "atp"
    paper = "arXiv 2412.00447 (CVPR 2025)"
    stages = ("layer",)
    budget_convention = "learned per image and layer; the trained-for target is a layer-averaged count"
    default_positions = "original"
    default_separators = "keep"
    learned_budget = True
    params = (
        Param("weights", None, "folder of trained ATP modules (None: the shipped ones for the shipped model; "
              "'untrained': fresh)", str),
        Param("layers", None, "boundaries: modules prune before these decoder layers (None: 5, 15, 25 of 32 scaled)",
              tuple, low=1),
        Param("temperature", None, "T of the soft mask in training (None: 10 or the checkpoint's)", float, low=0,
              low_open=True),
        Param("score_norm", None, "per-image score normalisation (None: 'max' or the checkpoint's)", str,
              ("max", "sum_to_n", "none")),
        Param("strides", None, "grid strides of the spatial score (None: 2, 3, 4, 6, 8, 12 or the checkpoint's)",
              tuple, low=1),
        Param("spatial_lambda", None, "lambda of the spatial score 1 - lambda / s^2 (None: 3 or the checkpoint's)",
              float, low=0),
        Param("hidden", None, "width of the threshold network (None: 32 or the checkpoint's)", int, low=1),
    )

    def __init__(self, **values: Any) -> None:
        super().__init__(**values)
        if self.keep is not None or self.ratio is not None:
            raise ValueError("atp learns how many tokens each image keeps; keep=/ratio= are not inference settings. "
                             "The budget is the target its weights were trained for: train others with "
                             "`vtprune train-atp --target N` and pass weights=FOLDER")

    def _checkpoint(self, adapter: Adapter) -> tuple[dict[str, Any], Path | None]:
        if self.weights == "untrained":
            return {}, None
        if self.weights is not None:
            folder = Path(self.weights)
            if not (folder / CONFIG_NAME).is_file():
                raise ValueError(f"atp: {folder} holds no {CONFIG_NAME}; pass a folder written by vtprune train-atp")
            return json.loads((folder / CONFIG_NAME).read_text()), folder
        fingerprint = model_fingerprint(adapter.language_model)
        for folder in shipped_atp():
            config = json.loads((folder / CONFIG_NAME).read_text())
            if config.get("base_fingerprint") == fingerprint:
                return config, folder
        raise ValueError(
            "atp needs threshold modules trained for this model, and vtprune ships them only for its reference "
            "MiniLLaVA. Train them with `vtprune train-atp --model PATH --output FOLDER` and pass weights=FOLDER "
            "(or weights='untrained' to start from the keep-everything initialisation)"
        )

    def resolved(self, adapter: Adapter) -> dict[str, Any]:
        config, folder = self._checkpoint(adapter)
        depth = len(adapter.decoder_layers)
        settings = {k: getattr(self, k) if getattr(self, k) is not None else config.get(k, default)
                    for k, default in DEFAULTS.items()}
        settings["strides"] = tuple(settings["strides"])
        layers = self.layers or tuple(config.get("layers") or sorted({scaled_layer(b, PAPER_DEPTH, depth)
                                                                     for b in PAPER_LAYERS}))
        for name in ("layers", "hidden", "strides"):
            given = getattr(self, name)
            if folder is not None and given is not None and json.loads(json.dumps(given)) != config.get(name):
                raise ValueError(f"atp: {name}={given} differs from the weights in {folder} ({config.get(name)}); "
                                 "leave it unset")
        if layers[-1] >= depth:
            raise ValueError(f"atp: boundaries {layers} reach past the last of the {depth} decoder layers")
        return {"layers": list(layers), **settings, "weights": None if folder is None else str(folder),
                "target": config.get("target")}

    def operators(self, adapter: Adapter) -> list:
        resolved = self.resolved(adapter)
        settings = {k: resolved[k] for k in DEFAULTS}
        stage = _ATPStage(self, tuple(resolved["layers"]), settings)
        if resolved["weights"] is not None:
            from safetensors.torch import load_file

            stage.load_state_dict(load_file(str(Path(resolved["weights"]) / WEIGHTS_NAME)))
        device = next(adapter.model.parameters()).device
        return [stage.to(device).eval()]
