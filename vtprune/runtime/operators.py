"""Stage operators: what a method contributes at each stage point, and what the runtime hands it.

Stage points (in execution order):
- ``vision``: between ViT blocks (``VisionOperator``), may merge tokens; carries token sizes and source maps.
- ``pre_llm``: on the projected visual features of each image (``PreLLMOperator``), selects or merges.
- ``layer``: inside the LLM prefill, before decoder layer K (``LayerOperator``), drops visual tokens per sample.
- ``decode``: after prefill, trims visual entries of the KV cache of chosen layers (``DecodeOperator``).
Operators only decide *which* tokens survive; the runtime applies the decision to sequences, positions, masks and
the KV cache.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property

import torch

from vtprune.models.base import Adapter

@dataclass
class VisionState:
    """Per-image token bookkeeping while the ViT runs: ``size`` [n_img, T, 1] (patches per token) and ``source``
    [n_img, T, 1 + N] (weights of the original tokens, [CLS] first, that each current token averages)."""

    size: torch.Tensor
    source: torch.Tensor


class VisionOperator:
    """Replaces the forward of some ViT blocks while the vision tower runs."""

    stage = "vision"
    blocks: tuple[int, ...] = ()

    def block_forward(
        self, adapter: Adapter, block: int, state: VisionState, hidden_states: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class Reduction:
    """The visual tokens of one image that enter the LLM, in LLM order.

    ``features`` [k, D]: projected features; ``sources`` [k, N]: weights over the image's N original patch tokens
    (a one-hot row for a selected token, averaging weights for a merged one). Positions of merged tokens are derived
    from the weighted mean of their sources.
    """

    features: torch.Tensor
    sources: torch.Tensor

    @staticmethod
    def select(features: torch.Tensor, sources: torch.Tensor, keep_indices: torch.Tensor) -> Reduction:
        return Reduction(features=features[keep_indices], sources=sources[keep_indices])


@dataclass
class PreLLMContext:
    """Everything known about a batch of images between the ViT and the LLM."""

    adapter: Adapter
    features: torch.Tensor  # [n_img, T, D_llm] projected
    vision_features: torch.Tensor  # [n_img, T, D_vit] fed to the projector
    sources: torch.Tensor  # [n_img, T, N] from the vision stage (identity when nothing merged there)
    vision_hidden_states: tuple[torch.Tensor, ...]
    pixel_values: torch.Tensor
    seed: int = 0

    def generator(self, image: int) -> torch.Generator:
        """A generator seeded by ``seed`` and the image's pixels: random choices depend on the image alone, not on
        its place in the batch or on how often the model was called."""
        digest = hashlib.blake2b(self.pixel_values[image].detach().cpu().numpy().tobytes(), digest_size=7).digest()
        return torch.Generator().manual_seed(self.seed * 1_000_003 + int.from_bytes(digest, "little"))

    @cached_property
    def cls_attention(self) -> torch.Tensor:
        """Head-mean [CLS] -> patch attention of the feature block (its input recomputed through q/k): [n_img, T]."""
        block = self.adapter.feature_block
        return self.adapter.vit_cls_attention(block, self.vision_hidden_states[block]).mean(dim=1)[:, 1:]


class PreLLMOperator:
    stage = "pre_llm"

    def reduce(self, ctx: PreLLMContext) -> list[Reduction]:
        raise NotImplementedError


@dataclass
class LayerContext:
    """The prefill sequence as it is about to enter decoder layer ``layer``."""

    adapter: Adapter
    layer: int
    hidden_states: torch.Tensor  # [B, n, D]
    valid: torch.Tensor  # [B, n] False for padding
    visual: torch.Tensor  # [B, n] True for (alive) visual tokens
    original_visual: torch.Tensor  # [B] visual tokens each sample had before any reduction
    previous_input: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None
    _cache: dict = field(default_factory=dict)

    def attention_from(self, query: str = "last") -> torch.Tensor:
        """Head-mean attention of layer ``layer - 1`` received by each token [B, n], recomputed from that layer's
        q/k with RoPE. ``query``: ``"last"`` (the last prompt token's row), ``"text"`` (mean over text tokens after
        the first visual token) or ``"all"`` (mean over all valid rows, each over its causal keys)."""
        if query in self._cache:
            return self._cache[query]
        if self.previous_input is None:
            raise RuntimeError("attention_from needs the input of the previous layer (layer >= 1)")
        hidden, position_embeddings = self.previous_input
        batch, n = self.valid.shape
        order = torch.arange(n, device=self.valid.device)
        if query == "last":
            rows = torch.full((batch, 1), n - 1, device=self.valid.device)
        else:
            rows = order.expand(batch, n)
        causal = order[None, :] <= rows[..., None]
        key_mask = causal & self.valid[:, None, :]
        probs = self.adapter.llm_attention(self.layer - 1, hidden, position_embeddings, rows, key_mask).mean(1)
        if query == "last":
            score = probs[:, 0]
        else:
            first_visual = torch.where(self.visual.any(1), self.visual.float().argmax(1), n)
            use = self.valid.clone()
            if query == "text":
                use &= ~self.visual & (order[None, :] > first_visual[:, None])
            score = (probs * use[..., None]).sum(1) / use.sum(1, keepdim=True).clamp_min(1)
        self._cache[query] = score
        return score


class LayerOperator:
    """Drops visual tokens before some decoder layers. ``select`` returns a keep mask [B, n] over the current
    sequence; the runtime keeps every non-visual token regardless."""

    stage = "layer"
    layers: tuple[int, ...] = ()
    needs_previous_input: bool = True

    def select(self, ctx: LayerContext) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class DecodeContext:
    """The KV cache right after prefill: ``cache_visual[l]`` [B, len_l] marks visual entries of layer l."""

    adapter: Adapter
    cache: object
    cache_valid: list[torch.Tensor]
    cache_visual: list[torch.Tensor]


class DecodeOperator:
    """Trims visual entries from the KV cache after prefill: returns {layer: keep mask [B, len_l]}."""

    stage = "decode"

    def trim(self, ctx: DecodeContext) -> dict[int, torch.Tensor]:
        raise NotImplementedError
