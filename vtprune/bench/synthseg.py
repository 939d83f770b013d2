"""SynthSeg: referring and reasoning segmentation prompts on SynthVQA scenes, scored as LISA scores them.

Every prompt names exactly one object of a 336 x 336 SynthVQA scene (``synthvqa.generate_scene``); the target is
that object's pixel mask. Prompt families (word-level, lower case, as MiniLISA's tokenizer reads them):

* referring    "segment the <desc>": a description that matches one object only ("triangle", "red object",
               "red triangle", "small red triangle"), as SynthVQA's questions use them.
* relation     "segment the object left of | right of | above | below the <desc>": the one object clearly on that
               side of the anchor (dominant axis >= 2x the other, >= 40 px, as SynthVQA's spatial questions); any
               other object even loosely on that side (>= 20 px along that axis, and more along it than across)
               rules the prompt out.
* reading      "segment the object with the digit | letter <glyph>": the only object carrying that glyph.
* superlative  "segment the largest | smallest <colour> object" or "... <shape>": among >= 2 objects of the
               colour (shape), the one whose mask is at least 1.5x larger (smaller) than every other's.

Splits share SynthVQA's scene seeds (train 0.., val 1_000_000.., test 2_000_000..); the prompt draws use their own
random stream, so the same seed always gives the same prompts. Metrics are LISA's: gIoU = mean of per-prompt IoU,
cIoU = total intersection / total union over the split, for a predicted mask = mask logits > 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from vtprune.bench import synthvqa as sv

FAMILIES: tuple[str, ...] = ("referring", "relation", "reading", "superlative")
RELATIONS = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
SUPERLATIVE_MARGIN = 1.5  # the target's area against every other candidate's
LOOSE_SIDE_PX = 20
PROMPT_STREAM = 13  # np.random.default_rng([seed, PROMPT_STREAM + draw]): SynthVQA uses 7.. for its questions


@dataclass
class SegSample:
    """One prompt: ``mask`` bool [height, width] is the target object's pixel mask, ``box`` its (x0, y0, x1, y1)."""

    scene_seed: int
    image: Image.Image
    prompt: str
    family: str
    mask: np.ndarray
    box: tuple[int, int, int, int]

    def patch_mask(self) -> np.ndarray:
        """bool [height / 14, width / 14]: the patches the target covers (SynthVQA's 15% rule)."""
        rows, cols = self.mask.shape[0] // sv.PATCH_SIZE, self.mask.shape[1] // sv.PATCH_SIZE
        cover = self.mask.reshape(rows, sv.PATCH_SIZE, cols, sv.PATCH_SIZE).mean(axis=(1, 3))
        return cover >= sv.COVERAGE_THRESHOLD


def _loosely(a: sv.SceneObject, b: sv.SceneObject, side: str) -> bool:
    """a lies at least a little towards ``side`` of b (used to rule out ambiguous relation prompts)."""
    (ax, ay), (bx, by) = a.centroid(), b.centroid()
    along, across = {"left": (bx - ax, ay - by), "right": (ax - bx, ay - by),
                     "above": (by - ay, ax - bx), "below": (ay - by, ax - bx)}[side]
    return along >= LOOSE_SIDE_PX and along > abs(across)


def _referring(objs, rng):
    forms = [(f"segment the {d}", o) for o in objs for d in sv._descriptions(o, objs)]
    return sv._pick(rng, forms) if forms else None


def _relation(objs, rng):
    forms = []
    for anchor in objs:
        names = sv._descriptions(anchor, objs)
        if not names:
            continue
        for side, words in RELATIONS.items():
            on_side = [o for o in objs if o is not anchor and sv._side(o, anchor) == side]
            loose = [o for o in objs if o is not anchor and _loosely(o, anchor, side)]
            if len(on_side) == 1 and len(loose) == 1:
                forms.append((side, words, names, on_side[0]))
    if not forms:
        return None
    side = sv._pick(rng, sorted({f[0] for f in forms}))  # balances the four relations
    _, words, names, target = sv._pick(rng, [f for f in forms if f[0] == side])
    return f"segment the object {words} the {sv._pick(rng, names)}", target


def _reading(objs, rng):
    eligible = [o for o in objs if o.label is not None and sum(p.label == o.label for p in objs) == 1]
    if not eligible:
        return None
    o = sv._pick(rng, eligible)
    return f"segment the object with the {'digit' if o.label in sv.DIGITS else 'letter'} {o.label}", o


def _superlative(objs, rng):
    forms = []
    groups = [(f"{c} object", [o for o in objs if o.colour == c]) for c in sv.COLOURS]
    groups += [(s, [o for o in objs if o.shape == s]) for s in sv.SHAPES]
    for noun, members in groups:
        if len(members) < 2:
            continue
        areas = sorted(((int(o.mask.sum()), i) for i, o in enumerate(members)))
        if areas[-1][0] >= SUPERLATIVE_MARGIN * areas[-2][0]:
            forms.append((f"segment the largest {noun}", members[areas[-1][1]]))
        if areas[1][0] >= SUPERLATIVE_MARGIN * areas[0][0]:
            forms.append((f"segment the smallest {noun}", members[areas[0][1]]))
    return sv._pick(rng, forms) if forms else None


_GENERATORS = {"referring": _referring, "relation": _relation, "reading": _reading, "superlative": _superlative}


def prompts_for_scene(scene: sv.Scene, rng: np.random.Generator) -> list[SegSample]:
    """At most one prompt per family for ``scene`` (one child stream per family, like SynthVQA's questions)."""
    child_seeds = rng.integers(0, 2**63, size=len(FAMILIES))
    out = []
    for family, child in zip(FAMILIES, child_seeds):
        made = _GENERATORS[family](scene.objects, np.random.default_rng(int(child)))
        if made is not None:
            prompt, target = made
            out.append(SegSample(scene.seed, scene.image, prompt, family, target.mask, target.box))
    return out


def load_split(split: str, n: int, families: Sequence[str] | None = None) -> list[SegSample]:
    """``n`` prompts cycling round-robin over ``families``: family f's j-th prompt comes from the j-th scene of the
    split that can pose f, so ``load_split(s, n)`` is a prefix of ``load_split(s, n + k)``."""
    if split not in sv.SPLIT_SEED_BASE:
        raise ValueError(f"split must be one of {tuple(sv.SPLIT_SEED_BASE)}, got {split!r}")
    fams = tuple(families) if families is not None else FAMILIES
    unknown = set(fams) - set(FAMILIES)
    if unknown or not fams:
        raise ValueError(f"unknown or empty SynthSeg families {sorted(unknown)}; the families are {FAMILIES}")
    pending: dict[str, list[SegSample]] = {f: [] for f in fams}
    seed = sv.SPLIT_SEED_BASE[split]
    out: list[SegSample] = []
    while len(out) < n:
        family = fams[len(out) % len(fams)]
        while not pending[family]:
            for s in prompts_for_scene(sv.generate_scene(seed), np.random.default_rng([seed, PROMPT_STREAM])):
                if s.family in pending:
                    pending[s.family].append(s)
            seed += 1
        out.append(pending[family].pop(0))
    return out


def prompt_vocabulary() -> list[str]:
    """Words SynthSeg prompts use that SynthVQA's questions do not."""
    return ["segment", "with", "largest", "smallest", "above", "below", "left", "right"]


# ------------------------------------------------------------------ metrics

def iou(prediction: np.ndarray, target: np.ndarray) -> float:
    """Intersection over union of two bool masks (1.0 when both are empty)."""
    union = np.logical_or(prediction, target).sum()
    return float(np.logical_and(prediction, target).sum() / union) if union else 1.0


def segmentation_scores(predictions: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> dict[str, float]:
    """LISA's metrics over a split: ``giou`` (mean per-prompt IoU) and ``ciou`` (sum of intersections / sum of
    unions)."""
    if len(predictions) != len(targets) or not targets:
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets; give one mask per target")
    inter = [int(np.logical_and(p, t).sum()) for p, t in zip(predictions, targets)]
    union = [int(np.logical_or(p, t).sum()) for p, t in zip(predictions, targets)]
    per = [i / u if u else 1.0 for i, u in zip(inter, union)]
    return {"giou": float(np.mean(per)), "ciou": float(sum(inter) / max(1, sum(union)))}


def box_mask(box: tuple[int, int, int, int], size: tuple[int, int] = (sv.IMAGE_SIZE, sv.IMAGE_SIZE)) -> np.ndarray:
    """bool [height, width] with the pixels of ``box`` = (x0, y0, x1, y1) set (x1, y1 exclusive)."""
    out = np.zeros((size[1], size[0]), bool)
    x0, y0, x1, y1 = box
    out[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = True
    return out


def blind_box_baseline(train: Sequence[SegSample], sides: Sequence[int] = tuple(range(14, 337, 14))
                       ) -> dict[str, tuple[int, int, int, int]]:
    """The box-from-text baseline: for each family, the centred square box (side from ``sides``) with the best
    gIoU on ``train`` -- the best any predictor that reads the prompt's family but never the image can do with a
    fixed box. Returns {family: box}."""
    out = {}
    for family in sorted({s.family for s in train}):
        targets = [s.mask for s in train if s.family == family]
        best = None
        for side in sides:
            start = (sv.IMAGE_SIZE - side) // 2
            box = (start, start, start + side, start + side)
            score = segmentation_scores([box_mask(box)] * len(targets), targets)["giou"]
            if best is None or score > best[0]:
                best = (score, box)
        out[family] = best[1]
    return out
