"""What the runtime needs from a model family, and the records an adapter hands it for every encoded image.

An adapter owns everything family-specific: where the language model, decoder layers and vision blocks are; how the
model's image-feature methods are called (``encode``); each image's ``ImageLayout``; the format of position ids
(1-D or 3-D M-RoPE); attention rows of a vision block or a decoder layer; cache access. Nothing method-specific.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vtprune.models.layout import ImageLayout
from vtprune.models.text import check_language_model, decoder_attention_rows
from vtprune.ops import Sources

CAPABILITIES = {
    "cls": "the vision tower has a [CLS] token whose attention rows score patches",
    "vision_merge": "tokens can be merged between vision-tower blocks",
}


@dataclass(eq=False)
class VisionTrace:
    """The vision tower's hidden states for one image's views (``hidden_states[i]`` = input of block i,
    [views, 1 + T, D] with [CLS] first), for methods that score tokens by vision attention rows."""

    hidden_states: tuple[torch.Tensor, ...]
    feature_block: int


@dataclass(eq=False)
class ImageRecord:
    """One encoded image as the pre-LLM stage sees it.

    ``carrier`` [N, D]: what the model scatters into the image's N placeholders (the projected features in layout
    order; after an in-ViT merge, each placeholder gets the features of the token it was merged into). ``merged``:
    the tokens an in-ViT merge left (features [k, D], sources over the layout), else None. ``pixels``: the image's
    pixel values (random methods seed on them). ``view_owner`` [views, T]: after an in-ViT merge, the token each
    patch of each view ended up in at the feature block (its index among the view's tokens, [CLS] excluded; the
    trace's merged hidden states carry [CLS] first), so vision attention rows of a merged sequence can be read per
    token; a token no patch ended up in is padding. None when nothing merged.
    """

    layout: ImageLayout
    carrier: torch.Tensor
    pixels: torch.Tensor
    trace: VisionTrace | None = None
    merged: tuple[torch.Tensor, Sources] | None = None
    view_owner: torch.Tensor | None = None


@dataclass
class EncodedImages(BaseModelOutputWithPooling):
    """``get_image_features`` output while a pruner is installed: ``pooler_output`` is a list of per-image carriers,
    exactly what the stock model returns when nothing merged inside the vision tower. The ``records`` (by carrier
    identity) and ``vision_key`` are plain attributes, not output fields, so transformers' generation helpers
    that expand (beam search) or rebuild encoder outputs treat this as an ordinary pooled output."""

    def attach(self, records: list[ImageRecord], vision_key: object) -> EncodedImages:
        self.pooler_output = [record.carrier for record in records]
        self.records = {id(record.carrier): record for record in records}
        self.vision_key = vision_key
        return self

    def images(self) -> list[ImageRecord]:
        """The records in placeholder order (after generate's expansion for beams, one per expanded image)."""
        records = getattr(self, "records", None)
        if records is None:
            raise ValueError(
                "vtprune: these image features were not encoded by the installed pruner (they were encoded before it "
                "was installed, or sliced by chunked prefill); pass pixel_values, and with generate() leave "
                "prefill_chunk_size unset"
            )
        return [records[id(carrier)] for carrier in self.pooler_output]


@dataclass
class Modality:
    """A kind of visual input: the multimodal model's method that encodes it and its placeholder token id."""

    name: str
    method: str
    token_id: int


class Adapter:
    """Per-family access to a VLM. Subclasses fill the ClassVars and implement ``encode`` and the positions."""

    family: ClassVar[str]
    model_classes: ClassVar[tuple[str, ...]] = ()
    capabilities: ClassVar[frozenset[str]] = frozenset()
    position_dims: ClassVar[int] = 1
    separator_tokens: ClassVar[bool] = False  # layouts may hold learned separator tokens (LLaVA-NeXT's newlines)

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        check_language_model(self.language_model)
        self._layouts: dict[Any, ImageLayout] = {}

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.model_classes

    # --- structure -------------------------------------------------------------------------------------------
    @property
    def multimodal_model(self) -> nn.Module:
        """The module whose forward receives pixel values and calls the language model."""
        return self.model.model if hasattr(self.model, "lm_head") else self.model

    @property
    def language_model(self) -> nn.Module:
        return self.multimodal_model.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def vision_layers(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def modalities(self) -> tuple[Modality, ...]:
        raise NotImplementedError

    @property
    def attn_implementation(self) -> str:
        return self.language_model.config._attn_implementation

    @property
    def fixed_tokens_per_image(self) -> int | None:
        """Visual tokens of every image when the family has one fixed layout (LLaVA-1.5), else None."""
        return None

    # --- encoding ---------------------------------------------------------------------------------------------
    def encode(self, method: str, arguments: dict[str, Any], owner: Callable[[int], torch.Tensor | None]
               ) -> list[ImageRecord]:
        """Run the vision tower and projector as ``method`` of the multimodal model would, given its bound
        ``arguments``, and describe every image. ``owner(block)``: after an in-ViT merge, which current token each
        token of every view ([CLS] first) ended up in after ``block`` ([views, 1 + T]); None when nothing merged."""
        raise NotImplementedError

    def layout(self, key: Any, build: Callable[[], ImageLayout], device: torch.device) -> ImageLayout:
        """A layout cached by ``key`` and device (images of one size share it)."""
        if (key, device) not in self._layouts:
            self._layouts[key, device] = build().to(device)
        return self._layouts[key, device]

    # --- positions -------------------------------------------------------------------------------------------
    def positions_in(self, position_ids: torch.Tensor | None, batch: int, length: int, past: int,
                     device: torch.device) -> torch.Tensor:
        """The language model's position ids as [P, B, n] (P = ``position_dims``)."""
        raise NotImplementedError

    def positions_out(self, positions: torch.Tensor) -> torch.Tensor:
        """[P, B, n] back into the language model's own format."""
        raise NotImplementedError

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of the language model's RoPE at ``positions`` [P, B, n]."""
        return self.language_model.rotary_emb(hidden, self.positions_out(positions))

    # --- attention rows --------------------------------------------------------------------------------------
    def llm_attention(self, layer: int, layer_input: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                      query_rows: torch.Tensor, key_mask: torch.Tensor, keys: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Attention [B, H, q, n] of decoder ``layer`` for ``query_rows`` [B, q] over its own input tokens (``rope``
        None: without rotary embeddings; ``keys``: the layer's own rotated keys of them, from ``cached_keys``)."""
        return decoder_attention_rows(self.decoder_layers[layer], layer_input, rope, query_rows, key_mask, keys)

    def vision_attention(self, trace: VisionTrace, block: int, query_rows: torch.Tensor) -> torch.Tensor:
        """Attention [views, H, q, 1 + T] of vision ``block`` for ``query_rows`` [q] (0 = [CLS]) of one image."""
        raise NotImplementedError(f"{self.family}: no vision attention rows")

    def vision_block_step(self, block: int, hidden: torch.Tensor, bias: torch.Tensor | None,
                          between: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError(f"{self.family}: no merging inside the vision tower")

    # --- cache -----------------------------------------------------------------------------------------------
    @staticmethod
    def cached_keys(cache: Any, layer: int, tokens: int) -> torch.Tensor | None:
        """During a prefill: the rotated keys [B, H_kv, tokens, d] decoder ``layer`` stored for the ``tokens``
        tokens that entered it (what its attention used), or None when the cache does not hold exactly those (no
        cache, another cache type, or entries from before this prefill)."""
        layers = getattr(cache, "layers", None)
        if layers is None or layer >= len(layers) or type(layers[layer]).__name__ != "DynamicLayer":
            return None
        keys = getattr(layers[layer], "keys", None)
        return keys if keys is not None and keys.dim() == 4 and keys.shape[2] == tokens else None

    @staticmethod
    def cache_layers(cache: Any) -> list[Any]:
        """The per-layer key/value stores of a ``DynamicCache`` (``.keys``/``.values`` [B, H, len, d])."""
        layers = getattr(cache, "layers", None)
        if layers is None or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
            kinds = sorted({type(layer).__name__ for layer in layers or []}) or [type(cache).__name__]
            raise ValueError(
                f"vtprune keeps per-layer KV caches of different lengths and needs a DynamicCache; got "
                f"{', '.join(kinds)}. Use the default cache (drop cache_implementation='static' / a StaticCache)"
            )
        return layers


def records_from_views(
    layouts: list[ImageLayout],
    views: list[int],
    projected: torch.Tensor,
    owner: torch.Tensor | None,
    pixels: list[torch.Tensor],
    traces: list[VisionTrace | None],
    separator: torch.Tensor | None = None,
) -> list[ImageRecord]:
    """Records of images whose views went through the vision tower together.

    ``projected`` [total views, k, D]: projected tokens per view (k = T patches, or fewer after an in-ViT merge);
    ``owner`` [total views, T] (None: no merge): which of the view's k tokens each patch ended up in;
    ``separator`` [D]: the separator embedding, when layouts have separators.
    """
    records, start = [], 0
    for layout, count, image_pixels, trace in zip(layouts, views, pixels, traces):
        tokens = projected[start:start + count].reshape(-1, projected.shape[-1])
        extra = tokens.new_zeros(1, tokens.shape[-1]) if separator is None else separator[None].to(tokens)
        table = torch.cat([tokens, extra])
        per_view = projected.shape[1]
        if owner is None:
            carrier = table[layout.vision_index]  # -1 (separator) reads the last row
            records.append(ImageRecord(layout, carrier, image_pixels, trace))
        else:
            patch_owner = owner[start:start + count]  # [views, T]
            flat_owner = (patch_owner + per_view * torch.arange(count, device=owner.device)[:, None]).flatten()
            carrier = table[torch.where(layout.vision_index >= 0, flat_owner[layout.vision_index], -1)]
            to_layout = torch.full((layout.num_vision_tokens,), -1, dtype=torch.long, device=owner.device)
            content = (layout.vision_index >= 0).nonzero().flatten()
            to_layout[layout.vision_index[content]] = content
            sources = Sources.from_assignment(flat_owner, count * per_view).remap(to_layout)
            alive = sources.total() > 0  # tokens made only of patches the layout drops (unpadding) are gone
            merged = (tokens[alive], sources.select(alive.nonzero().flatten()))
            records.append(ImageRecord(layout, carrier, image_pixels, trace, merged, patch_owner))
        start += count
    return records
