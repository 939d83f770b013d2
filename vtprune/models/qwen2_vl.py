"""Qwen2-VL and Qwen2.5-VL: a dynamic-resolution ViT ending in a 2x2 patch merger, 3-D M-RoPE in the language model.

``encode`` mirrors ``Qwen2VLModel.get_image_features`` / ``get_video_features`` in transformers 5.x (Qwen2.5-VL's are
the same at this level; its windowed ViT attention stays inside the tower): the tower runs on the packed patches of
all images, the merged tokens are split per image, one grid of (h/2) x (w/2) tokens per image or per video frame.

Positions are 3-D (temporal, height, width). The model computes them on the full prompt (``get_rope_index``) before
calling the language model, and vtprune keeps each surviving token's own, so decoding continues after the original
maximum position with the model's own ``rope_deltas``; ``positions='renumber'`` has no 3-D meaning and is refused.
The ViT has no [CLS] token, and its patch merger needs every 2x2 group intact, so nothing merges inside it.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vtprune.models.base import Adapter, ImageRecord, Modality
from vtprune.models.layout import ImageLayout, TokenKind


class Qwen2VLAdapter(Adapter):
    family = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2VLModel")
    position_dims = 3

    @property
    def vision_layers(self) -> nn.ModuleList:
        return self.multimodal_model.visual.blocks

    @property
    def modalities(self) -> tuple[Modality, ...]:
        config = self.model.config
        return (Modality("image", "get_image_features", config.image_token_id),
                Modality("video", "get_video_features", config.video_token_id))

    def encode(self, method: str, arguments: dict[str, Any], owner: Callable[[int], torch.Tensor | None]
               ) -> list[ImageRecord]:
        video = method == "get_video_features"
        pixels = arguments["pixel_values_videos" if video else "pixel_values"]
        grid_thw = arguments["video_grid_thw" if video else "image_grid_thw"]
        if grid_thw is None:
            raise ValueError(f"vtprune: {'video' if video else 'image'}_grid_thw is required with Qwen2-VL inputs")
        visual = self.multimodal_model.visual
        merged = visual(pixels.type(visual.dtype), grid_thw=grid_thw).pooler_output
        merge = self.model.config.vision_config.spatial_merge_size
        features = torch.split(merged, (grid_thw.prod(-1) // merge**2).tolist())
        patches = torch.split(pixels, grid_thw.prod(-1).tolist())
        kind = TokenKind.FRAME if video else TokenKind.BASE
        records = []
        for (frames, height, width), carrier, image_pixels in zip(grid_thw.tolist(), features, patches):
            shape = (height // merge, width // merge)
            layout = self.layout((kind, frames, shape), lambda: ImageLayout.grids([shape] * frames, kind),
                                 carrier.device)
            records.append(ImageRecord(layout, carrier, image_pixels))
        return records

    def positions_in(self, position_ids, batch, length, past, device):
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=device)
        if position_ids.dim() == 3 and position_ids.shape[0] == 4:  # generate() puts the text positions first
            position_ids = position_ids[1:]
        if position_ids.dim() < 3:
            position_ids = position_ids.expand(batch, length)[None]
        return position_ids.expand(3, batch, length)

    def positions_out(self, positions: torch.Tensor) -> torch.Tensor:
        return positions


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: the same at this level (windowed ViT attention stays inside the tower)."""

    family = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel")
