"""The reference models shipped with vtprune, one call each.

>>> from vtprune import reference
>>> model, processor = reference.load_reference()          # the shipped MiniLLaVA
>>> sample = reference.sample(0)                           # a SynthVQA test question with its image
>>> inputs = processor(images=sample.image, text=reference.format_prompt(sample.question), return_tensors="pt")

Training code lives in :mod:`vtprune.reference.train` (``vtprune train-reference``); the checkpoints are plain
HuggingFace folders (``path(name)``) loadable with ``from_pretrained``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from vtprune.reference.build import (PROMPT_TEMPLATE, build_config, build_processor, build_tokenizer,
                                     format_prompt)

__all__ = ["MODELS", "PROMPT_TEMPLATE", "RESOLUTION", "build_config", "build_processor", "build_tokenizer", "format_prompt",
           "load_reference", "path", "sample"]

_ROOT = Path(__file__).resolve().parent
#: shipped reference models: name -> what it is
MODELS = {
    "mini-llava": "LLaVA-1.5-style, CLIP ViT 24x24 grid (576 tokens) + 8-layer Llama, trained on SynthVQA",
    "mini-llava-next": "LLaVA-NeXT-style: base view + 336-px crops on 1x2/2x1/2x2 grids (1,752-2,928 tokens), "
                       "from MiniLLaVA, trained on high-resolution SynthVQA",
    "mini-lisa": "LISA-style segmentation: MiniLLaVA + a [SEG] token whose last hidden state drives a mask decoder, "
                 "trained on SynthSeg (load_reference returns a MiniLisa; prune its .vlm)",
}
#: the SynthVQA variant each reference model is trained and measured on (``synthvqa.load_split(resolution=)``)
RESOLUTION = {"mini-llava": "base", "mini-llava-next": "high", "mini-lisa": "base"}


def path(name: str = "mini-llava") -> Path:
    """The folder of a shipped reference checkpoint."""
    if name not in MODELS:
        raise ValueError(f"no shipped reference model {name!r}; shipped: {', '.join(MODELS)}")
    folder = _ROOT / name
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no checkpoint: reinstall vtprune, or retrain it with "
                                "`vtprune train-reference --output DIR` and load it from DIR")
    return folder


def load_reference(name: str = "mini-llava", *, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32):
    """(model, processor) of a shipped reference model, in eval mode. ``mini-lisa`` gives a
    :class:`vtprune.reference.lisa.MiniLisa` (apply pruners to its ``.vlm``)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = path(name)
    if name == "mini-lisa":
        from vtprune.reference.lisa import MiniLisa

        return MiniLisa.from_pretrained(folder, dtype=dtype).to(device).eval(), AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype).to(device).eval()
    return model, AutoProcessor.from_pretrained(folder)


def sample(index: int = 0, split: str = "test", model: str = "mini-llava"):
    """The ``index``-th SynthVQA question of ``split`` (a ``Sample``: image, question, answer, family, choices,
    relevant_patches) in the variant reference ``model`` is measured on; the same question ``vtprune bench`` asks."""
    from vtprune.bench import synthvqa

    if index < 0:
        raise ValueError(f"index={index}: use a non-negative index")
    if model not in RESOLUTION:
        raise ValueError(f"no shipped reference model {model!r}; shipped: {', '.join(MODELS)}")
    return synthvqa.load_split(split, index + 1, resolution=RESOLUTION[model])[index]
