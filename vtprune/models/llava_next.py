"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres views through CLIP, packed with unpadding and newlines.

Every image is a base view (the whole image at 336 px) plus a grid of sub-image crops. ``encode`` mirrors
``LlavaNextModel.get_image_features`` in transformers 5.x: all views go through the tower together, the projected
features are split per image and packed by the model's own ``pack_image_features`` — 24x24 base tokens, then the crops
stitched into one canvas, unpadded to the image's aspect ratio, each canvas row closed by ``image_newline``. The
layout is read by packing index tensors through that same method, so it follows the model exactly. Positions 1-D.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, image_size_to_num_patches

from vtprune.models.base import ImageRecord, VisionTrace, records_from_views
from vtprune.models.layout import ImageLayout, TokenKind
from vtprune.models.llava import LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration", "LlavaNextModel")
    separator_tokens = True

    @property
    def fixed_tokens_per_image(self) -> None:
        return None

    def _views(self, image_size: torch.Tensor) -> int:
        config = self.model.config
        return image_size_to_num_patches(image_size=image_size, grid_pinpoints=config.image_grid_pinpoints,
                                         patch_size=config.vision_config.image_size)

    def _build_layout(self, image_size: torch.Tensor, views: int) -> ImageLayout:
        side = self.grid[0]
        tokens = side * side
        index = torch.arange(views * tokens, dtype=torch.float64).view(views, tokens, 1)
        packed, _ = self.multimodal_model.pack_image_features(
            [index], image_size[None].cpu(), "default", image_newline=torch.tensor([-1.0], dtype=torch.float64))
        vision_index = packed[0][:, 0].round().long()
        view, patch = vision_index.div(tokens, rounding_mode="floor"), vision_index % tokens
        separator = vision_index < 0
        crop = (view >= 1) & ~separator
        config = self.model.config
        crop_rows, crop_cols = get_anyres_image_grid_shape(image_size.tolist(), config.image_grid_pinpoints,
                                                           config.vision_config.image_size)
        canvas_row = (view - 1).div(crop_cols, rounding_mode="floor") * side + patch.div(side, rounding_mode="floor")
        canvas_col = (view - 1) % crop_cols * side + patch % side
        row = torch.where(crop, canvas_row, patch.div(side, rounding_mode="floor"))
        col = torch.where(crop, canvas_col, patch % side)
        shapes = [(side, side)]
        if crop.any():  # canvas coordinates after unpadding
            row = torch.where(crop, row - canvas_row[crop].min(), row)
            col = torch.where(crop, col - canvas_col[crop].min(), col)
            shapes.append((int(row[crop].max()) + 1, int(col[crop].max()) + 1))
        grid = crop.long()
        previous_row = torch.cat([row[:1], row[:-1]])
        # A separator closes the canvas row before it; after a base-only image it closes the whole base grid.
        row = torch.where(separator, previous_row if crop.any() else torch.full_like(row, -1), row)
        grid = torch.where(separator, torch.full_like(grid, len(shapes) - 1), grid)
        kind = torch.where(crop, int(TokenKind.CROP), int(TokenKind.BASE))
        kind = torch.where(separator, int(TokenKind.SEPARATOR), kind)
        return ImageLayout(
            kind=kind, partition=torch.where(separator, -1, view), grid=grid, row=row,
            col=torch.where(separator, -1, col), vision_index=vision_index, grid_shapes=tuple(shapes),
            num_vision_tokens=views * tokens, crop_grid=(int(crop_rows), int(crop_cols)) if views > 1 else None,
        )

    def encode(self, method: str, arguments: dict[str, Any], owner: Callable[[int], torch.Tensor | None]
               ) -> list[ImageRecord]:
        block = self._feature_block(arguments)
        pixel_values = arguments["pixel_values"]
        if arguments["image_sizes"] is None:
            raise ValueError("vtprune: LLaVA-NeXT inputs need image_sizes (the processor returns them)")
        image_sizes = torch.as_tensor(arguments["image_sizes"])
        views = [self._views(size) for size in image_sizes]
        if pixel_values.dim() == 5:  # (images, max views, C, H, W): drop the padding views
            pixel_values = torch.cat([pixels[:count] for pixels, count in zip(pixel_values, views)])
        elif pixel_values.dim() != 4:
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}: expected 4 or 5 dimensions")
        tower = self.multimodal_model.vision_tower
        out = tower(pixel_values.to(tower.dtype), output_hidden_states=True, return_dict=True)
        projected = self.multimodal_model.multi_modal_projector(out.hidden_states[block + 1][:, 1:])
        merge = owner(block)
        layouts, traces, pixels, start = [], [], [], 0
        for size, count in zip(image_sizes, views):
            key = (tuple(int(s) for s in size), count)
            layouts.append(self.layout(key, lambda: self._build_layout(size, count), projected.device))
            traces.append(VisionTrace(tuple(h[start:start + count] for h in out.hidden_states), block))
            pixels.append(pixel_values[start:start + count])
            start += count
        return records_from_views(layouts, views, projected, None if merge is None else merge[:, 1:] - 1, pixels,
                                  traces, separator=self.multimodal_model.image_newline)

