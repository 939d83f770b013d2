"""Half precision: scores are computed in float32, so a bf16/fp16 model keeps the same tokens as its fp32 twin
wherever the fp32 ranking is not within the two models' score difference of a tie."""
from __future__ import annotations

import sys

import pytest
import torch

import vtprune
from vtprune.methods.fastv import _FastVDrop
from vtprune.methods import scoring
from families import Family, picture

CASES = [("llava", "fastv", torch.bfloat16), ("llava", "fastv", torch.float16), ("llava_next", "fastv", torch.bfloat16),
         ("qwen2_vl", "fastv", torch.bfloat16), ("qwen2_5_vl", "fastv", torch.bfloat16),
         ("llava", "fastervlm", torch.bfloat16), ("llava_next", "fastervlm", torch.bfloat16)]


def _twins(name: str, dtype: torch.dtype):
    family = Family(name)
    half = family.model(seed=21, dtype=dtype)
    full = family.model(seed=21)
    full.load_state_dict({k: v.float() for k, v in half.state_dict().items()})  # the same (rounded) weights
    return family, full, half


def _scores_and_kept(model, family, inputs, method, keep, monkeypatch):
    recorded = []
    if method == "fastv":
        original = _FastVDrop.scores
        monkeypatch.setattr(_FastVDrop, "scores", lambda self, ctx: recorded.append(original(self, ctx)) or
                            recorded[-1])
        params = {"layer": 2}
    else:
        original = scoring.cls_attention
        monkeypatch.setattr(sys.modules["vtprune.methods.fastervlm"], "cls_attention",
                            lambda ctx, image: recorded.append(original(ctx, image)) or recorded[-1])
        params = {}
    pixels = inputs["pixel_values"].to(model.dtype)
    with torch.no_grad(), vtprune.apply(model, method, keep=keep, **params) as pruner:
        model(**{**inputs, "pixel_values": pixels})
    monkeypatch.undo()
    return recorded[0], pruner.stats.kept_patches(0)


@pytest.mark.parametrize("name,method,dtype", CASES, ids=lambda c: str(c).replace("torch.", ""))
def test_half_precision_keeps_the_fp32_set_where_not_tied(name, method, dtype, monkeypatch):
    family, full, half = _twins(name, dtype)
    inputs = family.inputs([["user:", picture(100, 150, 1), "what", "is", "in", "the", "image", "?"]])
    scores32, _ = _scores_and_kept(full, family, inputs, method, 4, monkeypatch)
    scores16, _ = _scores_and_kept(half, family, inputs, method, 4, monkeypatch)
    assert scores16.dtype == torch.float32  # scored in float32 from the half-precision q/k
    if method == "fastv":
        visual = inputs["input_ids"][0] == 99
        scores32, scores16 = scores32[0][visual], scores16[0][visual]
    finite = torch.isfinite(scores32)
    difference = (scores32 - scores16)[finite].abs().max()
    ranked = scores32[finite].sort(descending=True).values
    clear = [k for k in range(2, len(ranked) - 1) if ranked[k - 1] - ranked[k] > 2 * difference]
    assert clear, "no clearly separated budget to test at"
    for keep in clear[:3]:
        if method == "fastervlm" and name == "llava_next":
            continue  # per-view budgets: covered by the llava case; ranks above are over the whole image
        _, kept32 = _scores_and_kept(full, family, inputs, method, keep, monkeypatch)
        _, kept16 = _scores_and_kept(half, family, inputs, method, keep, monkeypatch)
        assert torch.equal(kept32, kept16), f"keep={keep}"
