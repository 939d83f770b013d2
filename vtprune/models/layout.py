"""The visual layout of one image: what each of its placeholder tokens is, as the language model sees them.

Adapters build layouts; the runtime and the methods only read them. A layout is family-agnostic data:
- LLaVA-1.5: one 24x24 grid of ``BASE`` tokens.
- LLaVA-NeXT: a 24x24 ``BASE`` view, then the sub-image ``CROP`` tokens of the stitched and unpadded canvas, each canvas
  row closed by a ``SEPARATOR`` (the model's ``image_newline``); ``partition`` says which 336-px view a token came from.
- Qwen2-VL / 2.5-VL: one (merged) grid of ``BASE`` tokens per image, or one grid per ``FRAME`` of a video.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from functools import cached_property

import torch


class TokenKind(enum.IntEnum):
    BASE = 0  # a single-view image, or the downscaled whole-image view of a high-resolution layout
    CROP = 1  # a sub-image (crop) token of a high-resolution layout
    SEPARATOR = 2  # a learned structural token (LLaVA-NeXT's image_newline) closing one grid row
    FRAME = 3  # a video frame token


@dataclass(frozen=True, eq=False)
class ImageLayout:
    """Per placeholder token (all [N], long):

    - ``kind``: a ``TokenKind``;
    - ``partition``: the view the token comes from (0: base or single view; k >= 1: k-th crop; video: frame index);
      -1 for separators;
    - ``grid``, ``row``, ``col``: the spatial grid the token lies on (``grid_shapes[grid]`` = (height, width)) and its
      place in it; a separator has the grid and row it closes and ``col`` -1 (``row`` -1: it closes the whole grid);
    - ``vision_index``: which of the image's vision-tower output tokens (views concatenated, [CLS] excluded) it is;
      -1 for separators.

    ``crop_grid``: (rows, cols) of the crop views when partitions 1..rows*cols tile one canvas in row-major order
    (LLaVA-NeXT's anyres sub-images; a crop unpadding removed entirely still counts); None without crops.
    """

    kind: torch.Tensor
    partition: torch.Tensor
    grid: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    vision_index: torch.Tensor
    grid_shapes: tuple[tuple[int, int], ...]
    num_vision_tokens: int
    crop_grid: tuple[int, int] | None = None
    _raster: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return self.kind.shape[0]

    @staticmethod
    def grids(shapes: list[tuple[int, int]], kind: TokenKind = TokenKind.BASE) -> ImageLayout:
        """Consecutive full grids in raster order, grid g = partition g (Qwen: one grid per image or video frame)."""
        parts = []
        for g, (height, width) in enumerate(shapes):
            rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
            parts.append((torch.full((height * width,), g), rows.flatten(), cols.flatten()))
        grid, row, col = (torch.cat(x) for x in zip(*parts))
        n = len(grid)
        return ImageLayout(
            kind=torch.full((n,), int(kind)), partition=grid.clone(), grid=grid, row=row, col=col,
            vision_index=torch.arange(n), grid_shapes=tuple(shapes), num_vision_tokens=n,
        )

    @cached_property
    def separators(self) -> torch.Tensor:
        """Indices of the separator tokens."""
        return (self.kind == TokenKind.SEPARATOR).nonzero().flatten()

    @cached_property
    def content(self) -> torch.Tensor:
        """Indices of every other token."""
        return (self.kind != TokenKind.SEPARATOR).nonzero().flatten()

    @cached_property
    def has_separators(self) -> bool:
        return len(self.separators) > 0

    @cached_property
    def num_partitions(self) -> int:
        return int(self.partition.max()) + 1

    def raster(self, grid: int) -> torch.Tensor:
        """Layout indices of the tokens of ``grid`` in raster order (every grid is a full rectangle)."""
        if grid not in self._raster:
            width = self.grid_shapes[grid][1]
            on_grid = ((self.grid == grid) & (self.kind != TokenKind.SEPARATOR)).nonzero().flatten()
            key = self.row[on_grid] * width + self.col[on_grid]
            self._raster[grid] = on_grid[key.argsort()]
        return self._raster[grid]

    def to(self, device: torch.device) -> ImageLayout:
        if self.kind.device == torch.device(device):
            return self
        moved = {name: getattr(self, name).to(device)
                 for name in ("kind", "partition", "grid", "row", "col", "vision_index")}
        return ImageLayout(**moved, grid_shapes=self.grid_shapes, num_vision_tokens=self.num_vision_tokens,
                           crop_grid=self.crop_grid)
