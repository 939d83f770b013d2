"""Stage operators: what a method contributes at each stage point, and what the runtime hands it.

Stage points, in execution order:
- ``vision``: between ViT blocks (``VisionOperator``); may merge tokens, carrying token sizes and provenance.
- ``pre_llm``: on each image's projected tokens (``PreLLMOperator``): select, pool or merge -> a ``Reduction``.
- ``layer``: inside the LLM prefill, before decoder layer K (``LayerOperator``): a ``Transition`` of the current token
  set — drop, merge dropped tokens into kept ones, bring back tokens skipped at earlier layers, or (training mode)
  weigh tokens with a differentiable soft mask while every token stays.
- ``decode``: right after prefill (``DecodeOperator.trim``) and at every decode step (``DecodeOperator.step``,
  which sees the step's hidden states): evict visual entries of the KV cache.
Operators only decide; the runtime applies decisions to sequences, positions, masks and the KV cache. An operator
may be an ``nn.Module`` with parameters: ``Pruner.train()`` puts it in training mode, ``Pruner.state_dict()`` saves it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from vtprune.models.base import Adapter, ImageRecord
from vtprune.models.layout import ImageLayout
from vtprune.models.text import query_key
from vtprune.ops import Sources, attention_probs


# --- vision -----------------------------------------------------------------------------------------------------
@dataclass
class VisionState:
    """Per-view token bookkeeping while the ViT runs: ``size`` [views, T, 1] (original tokens per current token) and
    ``owner`` [views, N] (the current token each original token, [CLS] first, is part of). Empty until the first
    operator block runs."""

    size: torch.Tensor | None = None
    owner: torch.Tensor | None = None
    owner_after: dict[int, torch.Tensor] = field(default_factory=dict)

    def owner_at(self, block: int) -> torch.Tensor | None:
        """The assignment after ``block`` (None: nothing merged up to there)."""
        done = [b for b in self.owner_after if b <= block]
        return self.owner_after[max(done)] if done else None


class VisionOperator:
    """Replaces the forward of some ViT blocks while the vision tower runs under the pruner."""

    stage = "vision"
    blocks: tuple[int, ...] = ()

    def block_forward(self, adapter: Adapter, block: int, state: VisionState, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# --- pre-LLM ----------------------------------------------------------------------------------------------------
@dataclass
class ImageTokens:
    """One image's candidate tokens on their way into the LLM.

    ``features`` [k, D] (LLM embedding space); ``sources``: each token's weights over the image's layout tokens;
    ``sample``/``number``: its batch row and its place among that row's images.
    """

    features: torch.Tensor
    sources: Sources
    layout: ImageLayout
    record: ImageRecord
    sample: int
    number: int

    def raster(self, grid: int) -> torch.Tensor:
        """Positions (in ``features``) of grid ``grid``'s tokens in raster order, for images whose tokens are still
        one per layout token (nothing merged in the ViT)."""
        if self.sources.index.shape[1] != 1 or self.record.merged is not None:
            raise ValueError("raster() needs one token per layout position (nothing merged inside the vision tower)")
        where = torch.full((len(self.layout),), -1, dtype=torch.long, device=self.features.device)
        where[self.sources.index[:, 0]] = torch.arange(len(self.sources), device=self.features.device)
        return where[self.layout.raster(grid)]

    @property
    def partition(self) -> torch.Tensor:
        """The view each token comes from [k] (its strongest source's)."""
        return self.layout.partition[self.sources.strongest()]


@dataclass
class Reduction:
    """The visual tokens of one image that enter the LLM, in LLM order: ``features`` [k, D] and their ``sources``
    over the image's layout (positions of merged tokens are the weighted mean of their sources'). ``tags``: named
    per-token values [k] that layer operators read back (``LayerContext.tags``; e.g. tokens a later stage must keep).
    """

    features: torch.Tensor
    sources: Sources
    tags: dict[str, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def select(tokens: ImageTokens, keep_indices: torch.Tensor) -> Reduction:
        keep_indices = keep_indices.to(tokens.features.device)
        return Reduction(tokens.features[keep_indices], tokens.sources.select(keep_indices))


@dataclass
class PreLLMContext:
    """Every image of a batch between the vision tower and the LLM, in placeholder order."""

    adapter: Adapter
    images: list[ImageTokens]
    seed: int = 0

    def generator(self, image: int) -> torch.Generator:
        """A CPU generator seeded by ``seed`` and the image's pixels (rounded to bfloat16, so an image gives the same
        draw in fp32 and bf16): random choices depend on the image alone, not on its place in the batch."""
        pixels = self.images[image].record.pixels.detach().to(torch.bfloat16).contiguous()  # on the device: half the
        # bytes to copy; hashed through a memoryview of the host array (the same bytes as .tobytes(), without a copy
        # of them: ~25% of the time for a 1344x1344 Qwen2.5-VL image)
        array = pixels.view(torch.int16).cpu().numpy()
        digest = hashlib.blake2b(memoryview(array).cast("B"), digest_size=7).digest()
        return torch.Generator().manual_seed(self.seed * 1_000_003 + int.from_bytes(digest, "little"))


class PreLLMOperator:
    """Reduces the images of a batch; by default each image on its own (``reduce_image``)."""

    stage = "pre_llm"

    def reduce(self, ctx: PreLLMContext) -> list[Reduction]:
        return [self.reduce_image(ctx, index, image) for index, image in enumerate(ctx.images)]

    def reduce_image(self, ctx: PreLLMContext, index: int, image: ImageTokens) -> Reduction:
        raise NotImplementedError


# --- inside the LLM ---------------------------------------------------------------------------------------------
@dataclass
class LayerContext:
    """The prefill sequence about to enter decoder layer ``layer`` (rows left-padded; [B, n] unless noted).

    ``visual``: alive visual tokens; ``candidate``: the visual tokens the operator decides over (the method's
    separator policy may exclude LLaVA-NeXT's newline tokens); ``image``: a token's image number in its sample (-1
    text); ``grid``/``row``/``col``: its place on its image's grid (``ImageLayout``); ``tags``: values the pre-LLM
    stage attached per token (0 for others); ``image_candidates`` [B, G]: candidates each image had when it entered
    the LLM (budgets are per image);
    ``rows``: each token's row in the LLM-input sequence (``universe_hidden`` [B, n0, D] holds that sequence's
    layer-0 states, for operators that bring skipped tokens back; ``universe_tags`` the pre-LLM tags over it);
    ``token_ids``: each token's prompt token id (-1 visual and padding; None when the call gave no input ids), to
    find a given token such as a [SEG] query; ``previous_input``: (hidden, rope) entering layer
    ``layer - 1`` when the operator asked for it; ``training``: trainable operators should return soft weights;
    ``weight``: the soft keep weight each token carries from earlier training-mode transitions (None: all 1);
    ``cache``: scratch space for scores shared by operators at this layer; ``kv_cache``: the forward's KV cache
    (None without one), whose entries for earlier layers hold the keys those layers computed
    (``Adapter.cached_keys``).
    """

    adapter: Adapter
    layer: int
    hidden_states: torch.Tensor
    valid: torch.Tensor
    visual: torch.Tensor
    candidate: torch.Tensor
    image: torch.Tensor
    partition: torch.Tensor
    kind: torch.Tensor
    grid: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    tags: dict[str, torch.Tensor]
    image_candidates: torch.Tensor
    positions: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor]
    rows: torch.Tensor
    universe_hidden: torch.Tensor
    universe_visual: torch.Tensor
    universe_tags: dict[str, torch.Tensor] = field(default_factory=dict)
    token_ids: torch.Tensor | None = None
    previous_input: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None
    training: bool = False
    weight: torch.Tensor | None = None
    cache: dict[Any, torch.Tensor] = field(default_factory=dict)
    kv_cache: Any = None


@dataclass
class Transition:
    """What happens to the current token set before a layer (all [B, n] over the current tokens unless noted).

    - ``keep``: which candidates survive (non-candidates follow the runtime's rules: text always stays);
    - ``merge_into``: for a dropped candidate, the index of the kept visual token it is merged into (size-weighted
      mean of hidden states, as ToMe; -1: discarded); the kept token keeps its own position;
    - ``restore`` [B, r]: rows of the LLM-input sequence to bring back (-1: padding), with ``restore_hidden``
      [B, r, D] their hidden states (the operator chooses and documents them); they rejoin in sequence order with
      their original positions;
    - ``weight``: training mode: a soft keep weight in [0, 1] per candidate; every token stays and later layers add
      log(weight) to the attention logits of that key (diagonal exempt), so weight 0 equals dropping the token.
    """

    keep: torch.Tensor | None = None
    merge_into: torch.Tensor | None = None
    restore: torch.Tensor | None = None
    restore_hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None


class LayerOperator:
    """Changes the visual token set before some decoder layers (layer 0 allowed when no previous input is needed)."""

    stage = "layer"
    layers: tuple[int, ...] = ()
    needs_previous_input: bool = True

    def transform(self, ctx: LayerContext) -> Transition:
        raise NotImplementedError


# --- decoding ---------------------------------------------------------------------------------------------------
@dataclass
class DecodeContext:
    """The KV cache right after prefill. ``rows[l]`` [B, len_l]: for each cache entry of layer l its row in the
    LLM-input sequence (-1: padding); ``visual[l]`` [B, len_l]: the visual entries. ``tags``: the pre-LLM stage's
    per-token values over the LLM-input sequence [B, n0] (read them at ``rows``); ``memory``: the cache's scratch
    space for decode operators (see ``DecodeStepContext``)."""

    adapter: Adapter
    cache: object
    rows: list[torch.Tensor]
    visual: list[torch.Tensor]
    tags: dict[str, torch.Tensor] = field(default_factory=dict)
    memory: dict[Any, Any] = field(default_factory=dict)


@dataclass
class DecodeStepContext:
    """One decode step at decoder layer ``layer``: the new tokens' layer input ``hidden`` [B, q, D] and ``rope``,
    and the layer's cached ``keys`` [B, H_kv, len, d] (RoPE applied) with their ``rows``/``visual``/``valid``
    [B, len] flags. ``step`` counts decode steps since prefill (0 = first). ``memory``: one dict per cache that
    lives from prefill (``DecodeContext.memory``) to the cache's end, for operators that remember across steps (key
    it by operator and layer); tensor values whose first dim is the batch follow beam reordering, so index them by
    LLM-input row (stable under compaction), not by cache slot."""

    adapter: Adapter
    layer: int
    step: int
    hidden: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor]
    keys: torch.Tensor
    rows: torch.Tensor
    visual: torch.Tensor
    valid: torch.Tensor
    memory: dict[Any, Any] = field(default_factory=dict)

    def query_attention(self) -> torch.Tensor:
        """Attention [B, H, q, len] of the step's queries over the cached entries (float32, head by head)."""
        layer = self.adapter.decoder_layers[self.layer]
        normed = layer.input_layernorm(self.hidden)
        rows = torch.arange(normed.shape[1], device=normed.device).expand(normed.shape[0], -1)
        query, _ = query_key(layer.self_attn, normed, rows, self.rope)
        return attention_probs(query, self.keys, layer.self_attn.scaling, self.valid[:, None, :].expand(
            -1, query.shape[2], -1))


class DecodeOperator:
    """Evicts visual KV-cache entries: after prefill (``trim``: {layer: keep mask [B, len_l]}) and, for the layers in
    ``step_layers``, at every decode step (``step``: an evict mask [B, len] over the layer's cached entries or None).
    Evicted entries are masked at once; the cache is compacted physically every ``compact_interval`` steps."""

    stage = "decode"
    step_layers: tuple[int, ...] = ()
    compact_interval: int = 1

    def trim(self, ctx: DecodeContext) -> dict[int, torch.Tensor]:
        return {}

    def step(self, ctx: DecodeStepContext) -> torch.Tensor | None:
        return None
