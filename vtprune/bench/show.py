"""``vtprune show``: an image with the visual tokens a method keeps highlighted and merged groups outlined."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import vtprune


def kept_token_overlay(image: Image.Image, covered: np.ndarray, owner: np.ndarray, merged: bool) -> Image.Image:
    """Dim the image where no surviving token covers its grid cell; outline groups of cells merged into one token.

    ``covered`` / ``owner`` [height, width]: per cell of a token grid laid over the whole image (LLaVA-1.5's 24x24;
    LLaVA-NeXT's base view, or its stitched crops) whether a surviving token covers it, and the token it ended up
    in."""
    rows, cols = covered.shape
    cell_w, cell_h = image.width / cols, image.height / rows
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    ys = np.minimum((np.arange(image.height) / cell_h).astype(int), rows - 1)
    xs = np.minimum((np.arange(image.width) / cell_w).astype(int), cols - 1)
    dim = np.where(covered, 1.0, 0.25)[ys][:, xs]
    out = Image.fromarray((pixels * dim[..., None]).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    if merged:
        for row in range(rows):
            for col in range(cols):
                x, y = col * cell_w, row * cell_h
                if col + 1 < cols and owner[row, col] != owner[row, col + 1]:
                    draw.line([(x + cell_w, y), (x + cell_w, y + cell_h)], fill=(255, 255, 0), width=1)
                if row + 1 < rows and owner[row, col] != owner[row + 1, col]:
                    draw.line([(x, y + cell_h), (x + cell_w, y + cell_h)], fill=(255, 255, 0), width=1)
    return out


def grid_cover(layout, sources: torch.Tensor, alive: torch.Tensor, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """(covered, owner) [height, width] of the layout's ``grid`` from the tokens' dense ``sources`` [k, N]."""
    cells = layout.raster(grid)
    height, width = layout.grid_shapes[grid]
    covered = (sources[alive][:, cells] > 0).any(0).reshape(height, width).numpy()
    owner = sources[:, cells].argmax(0).reshape(height, width).numpy()
    return covered, owner


def show(model, processor, sample, method: str, out: Path, prompt, **params) -> Path:
    """Run ``method`` on one SynthVQA sample and write the overlay next to the original image."""
    inputs = processor(images=[sample.image], text=[prompt(sample.question)], return_tensors="pt")
    with torch.no_grad(), vtprune.apply(model, method, **params) as pruner:
        model(**inputs, logits_to_keep=1)
    stats = pruner.stats
    layout = stats.layouts(0)[0]
    sources = stats.dense_sources(0)[:, :len(layout)]
    merged = bool(sources.sum(0).gt(0).all() and (sources > 0).sum(-1).max() > 1)
    # one panel per token grid: LLaVA-1.5 has one; LLaVA-NeXT its base view, then its stitched crops
    panels = [kept_token_overlay(sample.image, *grid_cover(layout, sources, stats.final_tokens[0], g), merged)
              for g in range(len(layout.grid_shapes))]
    width, height = sample.image.size
    canvas = Image.new("RGB", ((width + 8) * (1 + len(panels)) - 8, height + 40), "white")
    for i, panel in enumerate([sample.image.convert("RGB"), *panels]):
        canvas.paste(panel, (i * (width + 8), 40))
    label = f"{method} {params}: {int(stats.visual_tokens[0, -1])} tokens alive after the last layer"
    views = " (panels: image, base view, crops)" if len(panels) > 1 else ""
    ImageDraw.Draw(canvas).text((4, 4), f"{sample.question}  [{sample.answer}]\n{label}{views}", fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out
