"""Scoring a LISA-style segmentation model on SynthSeg (gIoU, cIoU, per family), with or without a pruner applied to
its VLM (``vtprune.apply(model.vlm, ...)``)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from vtprune.bench.synthseg import SegSample, iou, segmentation_scores


@torch.no_grad()
def predict_masks(model, processor, samples: Sequence[SegSample], batch_size: int = 8,
                  progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """Predicted bool masks [H, W], one per sample, in order (``model.segment``, batched)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: use batch_size >= 1")
    out: list[np.ndarray] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        out.extend(model.segment(processor, [s.image for s in chunk], [s.prompt for s in chunk]))
        if progress is not None:
            progress(len(chunk))
    return out


def evaluate_segmentation(model, processor, samples: Sequence[SegSample], batch_size: int = 8,
                          return_masks: bool = False,
                          progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """``giou``/``ciou`` over ``samples``, ``per_family`` {family: {giou, ciou, n}}, ``ious`` per sample (and the
    predicted ``masks`` when asked)."""
    masks = predict_masks(model, processor, samples, batch_size, progress)
    result: dict[str, Any] = segmentation_scores(masks, [s.mask for s in samples])
    result["per_family"] = {}
    for family in dict.fromkeys(s.family for s in samples):
        chosen = [i for i, s in enumerate(samples) if s.family == family]
        scores = segmentation_scores([masks[i] for i in chosen], [samples[i].mask for i in chosen])
        result["per_family"][family] = {**scores, "n": len(chosen)}
    result["ious"] = [iou(m, s.mask) for m, s in zip(masks, samples)]
    if return_masks:
        result["masks"] = masks
    return result
