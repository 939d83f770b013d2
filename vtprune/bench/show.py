"""``vtprune show``: an image with the visual tokens a method keeps highlighted and merged groups outlined."""
from __future__ import annotations

import textwrap
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


HEADER, FOOTER = 58, 30  # pixels above the panels (question, answers, method) and below them (legend)
LEGEND = ("bright: patches that feed a visual token alive after the last LLM layer; dimmed: dropped;\n"
          "yellow outlines: groups of patches merged into one token")


def scene_sample(index: int, resolution: str = "base"):
    """The first question on the ``index``-th distinct test scene, so that consecutive indices show different
    images (consecutive questions of the test split share scenes, one per question family)."""
    from vtprune.bench import synthvqa as sv

    if index < 0:
        raise ValueError(f"--sample {index}: use a scene index >= 0")
    count = 6 * (index + 1)
    while True:
        samples = sv.load_split("test", count, resolution=resolution)
        firsts: dict[int, object] = {}
        for sample in samples:
            firsts.setdefault(sample.scene_seed, sample)
        if len(firsts) > index:
            return list(firsts.values())[index]
        count *= 2


def show(model, processor, sample, method: str, out: Path, prompt, **params) -> Path:
    """Run ``method`` (with ``params``) on one SynthVQA sample and write the overlay next to the original image,
    with the question, the answer, the pruned model's prediction (likelihood over the choices, as the bench scores)
    and a legend."""
    from vtprune.bench.evaluate import evaluate

    predicted = evaluate(model, processor, [sample], method=method, params=params, prompt=prompt,
                         return_predictions=True, token_stats=False, bootstrap=0)["predictions"][0]["prediction"]
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
    canvas = Image.new("RGB", ((width + 8) * (1 + len(panels)) - 8, HEADER + height + FOOTER), "white")
    for i, panel in enumerate([sample.image.convert("RGB"), *panels]):
        canvas.paste(panel, (i * (width + 8), HEADER))
    options = ", ".join(f"{key}={value}" for key, value in params.items()) or "its defaults"
    verdict = "right" if predicted == sample.answer else "wrong"
    views = "  (panels: image, base view, crops)" if len(panels) > 1 else ""
    draw = ImageDraw.Draw(canvas)
    run = (f"{method} with {options}: {int(stats.visual_tokens[0, 0])} visual tokens enter the LLM, "
           f"{int(stats.visual_tokens[0, -1])} alive after the last layer{views}")
    lines = [sample.question, f"answer: {sample.answer}   pruned model: {predicted} ({verdict})",
             *textwrap.wrap(run, max(40, canvas.width // 6))][:4]  # about 6 px per character of the default font
    draw.text((4, 4), "\n".join(lines), fill="black")
    draw.text((4, HEADER + height + 4), LEGEND, fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out
