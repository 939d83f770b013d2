"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP ViT -> 2-layer MLP projector -> Llama-style decoder.

An image is ``grid * grid`` consecutive ``<image>`` placeholders (576 = 24x24 for CLIP-L/336), filled in raster
order with the projected patch features of ``vision_feature_layer`` (default -2: the output of the second-to-last
ViT block), [CLS] removed (``vision_feature_select_strategy="default"``). ``encode`` mirrors
``LlavaModel.get_image_features`` in transformers 5.x for that configuration; positions are 1-D.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vtprune.models import clip
from vtprune.models.base import Adapter, ImageRecord, Modality, VisionTrace, records_from_views
from vtprune.models.layout import ImageLayout


def feature_block(layer: Any, strategy: Any, num_blocks: int) -> int:
    """The ViT block whose output feeds the projector, for a LLaVA-style ``vision_feature_layer`` (refusing, with the
    fix, what vtprune does not support: several feature layers, or keeping [CLS] as a visual token)."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(
            f"vision_feature_layer={layer!r}: vtprune supports a single feature layer (an int; LLaVA uses -2)"
        )
    if not -(num_blocks + 1) <= layer <= num_blocks:
        raise ValueError(f"vision_feature_layer={layer} is out of range for a {num_blocks}-block vision tower")
    if strategy != "default":
        raise ValueError(
            f"vision_feature_select_strategy={strategy!r}: vtprune supports 'default' (patch tokens without [CLS])"
        )
    # hidden_states has num_blocks + 1 entries; entry i is the output of block i - 1.
    return layer % (num_blocks + 1) - 1


class LlavaAdapter(Adapter):
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration", "LlavaModel")
    capabilities = frozenset({"cls", "vision_merge"})

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        clip.check_clip_tower(config.vision_config)
        try:
            self.default_feature_block = feature_block(
                config.vision_feature_layer, config.vision_feature_select_strategy, len(self.vision_layers))
        except ValueError as error:
            raise TypeError(f"{error} (in the model config)") from None

    @property
    def vision_layers(self) -> nn.ModuleList:
        return clip.encoder_layers(self.multimodal_model.vision_tower)

    @property
    def modalities(self) -> tuple[Modality, ...]:
        return (Modality("image", "get_image_features", self.model.config.image_token_id),)

    @property
    def grid(self) -> tuple[int, int]:
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        return side, side

    @property
    def view_tokens(self) -> int:
        """Patch tokens of one 336-px view (576 on CLIP-L/336)."""
        height, width = self.grid
        return height * width

    @property
    def fixed_tokens_per_image(self) -> int | None:
        return self.view_tokens

    def _feature_block(self, arguments: dict[str, Any]) -> int:
        config = self.model.config
        layer = arguments.get("vision_feature_layer")
        strategy = arguments.get("vision_feature_select_strategy")
        return feature_block(config.vision_feature_layer if layer is None else layer,
                             config.vision_feature_select_strategy if strategy is None else strategy,
                             len(self.vision_layers))

    def encode(self, method: str, arguments: dict[str, Any], owner: Callable[[int], torch.Tensor | None]
               ) -> list[ImageRecord]:
        if arguments.get("image_sizes") is not None:
            raise ValueError("vtprune: image_sizes is for variable-resolution towers; the CLIP tower takes none")
        block = self._feature_block(arguments)
        pixel_values = arguments["pixel_values"]
        tower = self.multimodal_model.vision_tower
        out = tower(pixel_values.to(tower.dtype), output_hidden_states=True, return_dict=True)
        features = out.hidden_states[block + 1][:, 1:]
        projected = self.multimodal_model.multi_modal_projector(features)
        merge = owner(block)
        layout = self.layout("grid", lambda: ImageLayout.grids([self.grid]), projected.device)
        count = projected.shape[0]
        traces = [VisionTrace(tuple(h[i:i + 1] for h in out.hidden_states), block) for i in range(count)]
        return records_from_views([layout] * count, [1] * count, projected,
                                  None if merge is None else merge[:, 1:] - 1, list(pixel_values), traces)

    def vision_attention(self, trace: VisionTrace, block: int, query_rows: torch.Tensor) -> torch.Tensor:
        return clip.attention_rows(self.vision_layers[block], trace.hidden_states[block], query_rows)

    def vision_block_step(self, block, hidden, bias, between):
        return clip.block_step(self.vision_layers[block], hidden, bias, between)

    def positions_in(self, position_ids, batch, length, past, device):
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=device)
        return position_ids.expand(batch, length)[None]

    def positions_out(self, positions: torch.Tensor) -> torch.Tensor:
        return positions[0]
