"""``vtprune show``: an image with the visual tokens a method keeps highlighted and merged groups outlined."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import vtprune


def kept_token_overlay(image: Image.Image, sources: torch.Tensor, alive: torch.Tensor, grid: int) -> Image.Image:
    """Dim patches no surviving token covers; outline groups of patches merged into one token.

    ``sources`` [k, grid*grid]: per visual token its source weights; ``alive``: indices of surviving tokens.
    """
    size = image.size[0]
    patch = size / grid
    covered = (sources[alive] > 0).any(0).reshape(grid, grid).numpy()
    owner = sources.argmax(0).reshape(grid, grid).numpy()  # the token each patch ended up in
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    dim = np.kron(np.where(covered, 1.0, 0.25), np.ones((int(np.ceil(patch)),) * 2))[:size, :size]
    out = Image.fromarray((pixels * dim[..., None]).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    merged = sources.sum(0).gt(0).all() and (sources > 0).sum(-1).max() > 1
    for row in range(grid):
        for col in range(grid):
            x, y = col * patch, row * patch
            if merged and col + 1 < grid and owner[row, col] != owner[row, col + 1]:
                draw.line([(x + patch, y), (x + patch, y + patch)], fill=(255, 255, 0), width=1)
            if merged and row + 1 < grid and owner[row, col] != owner[row + 1, col]:
                draw.line([(x, y + patch), (x + patch, y + patch)], fill=(255, 255, 0), width=1)
    return out


def show(model, processor, sample, method: str, out: Path, prompt, **params) -> Path:
    """Run ``method`` on one SynthVQA sample and write the overlay next to the original image."""
    inputs = processor(images=[sample.image], text=[prompt(sample.question)], return_tensors="pt")
    with torch.no_grad(), vtprune.apply(model, method, **params) as pruner:
        model(**inputs, logits_to_keep=1)
    stats = pruner.stats
    sources = stats.dense_sources(0)
    grid = int(round(sources.shape[1] ** 0.5))
    overlay = kept_token_overlay(sample.image, sources, stats.final_tokens[0], grid)
    canvas = Image.new("RGB", (sample.image.width * 2 + 8, sample.image.height + 40), "white")
    canvas.paste(sample.image.convert("RGB"), (0, 40))
    canvas.paste(overlay, (sample.image.width + 8, 40))
    label = f"{method} {params}: {int(stats.visual_tokens[0, -1])} tokens alive after the last layer"
    ImageDraw.Draw(canvas).text((4, 4), f"{sample.question}  [{sample.answer}]\n{label}", fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out
