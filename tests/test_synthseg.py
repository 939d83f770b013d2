"""SynthSeg: every prompt names exactly the object whose mask is its target (re-derived from the scene, not from the
generator's own bookkeeping), splits are deterministic, and the metrics are LISA's."""
from __future__ import annotations

import numpy as np
import pytest

from vtprune.bench import synthseg as ss
from vtprune.bench import synthvqa as sv


@pytest.fixture(scope="module")
def samples():
    return ss.load_split("test", 48)


def _target(sample):
    scene = sv.generate_scene(sample.scene_seed)
    hits = [o for o in scene.objects if np.array_equal(o.mask, sample.mask)]
    assert len(hits) == 1, "the target mask must be exactly one object's mask"
    return scene.objects, hits[0]


def _matches(obj, words: list[str]) -> bool:
    """Whether ``obj`` fits a description like ["small", "red", "triangle"] / ["red", "object"] / ["triangle"]."""
    attrs = {obj.shape, obj.colour, obj.size, "object"}
    return all(w in attrs for w in words)


def test_every_prompt_names_exactly_its_target(samples):
    assert {s.family for s in samples} == set(ss.FAMILIES)
    for s in samples:
        objects, target = _target(s)
        words = s.prompt.split()
        assert words[:2] == ["segment", "the"]
        if s.family == "referring":
            fits = [o for o in objects if _matches(o, words[2:])]
            assert fits == [target], s.prompt
        elif s.family == "reading":
            assert words[-1] == target.label and sum(o.label == target.label for o in objects) == 1
            assert words[-2] == ("digit" if target.label.isdigit() else "letter")
        elif s.family == "superlative":
            which, noun = words[2], words[3:]
            group = [o for o in objects if _matches(o, noun if noun[-1] == "object" else [noun[0]])]
            area = {id(o): o.mask.sum() for o in group}
            others = [area[id(o)] for o in group if o is not target]
            assert len(group) >= 2 and target in group
            if which == "largest":
                assert area[id(target)] >= 1.5 * max(others)
            else:
                assert 1.5 * area[id(target)] <= min(others)
        else:  # relation: "segment the object <side> the <desc>"
            side = {"left": "left", "right": "right", "above": "above", "below": "below"}[words[3]]
            desc = words[5:] if words[4] == "of" else words[4:]
            assert desc[0] == "the"
            anchors = [o for o in objects if _matches(o, desc[1:])]
            assert len(anchors) == 1 and anchors[0] is not target
            (tx, ty), (ax, ay) = target.centroid(), anchors[0].centroid()
            along = {"left": ax - tx, "right": tx - ax, "above": ay - ty, "below": ty - ay}[side]
            assert along >= sv.SPATIAL_MIN_PX, s.prompt
            for o in objects:  # nobody else is even loosely on that side
                if o is not target and o is not anchors[0]:
                    (ox, oy) = o.centroid()
                    d = {"left": ax - ox, "right": ox - ax, "above": ay - oy, "below": oy - ay}[side]
                    across = abs(oy - ay) if side in ("left", "right") else abs(ox - ax)
                    assert not (d >= ss.LOOSE_SIDE_PX and d > across), s.prompt


def test_splits_are_deterministic_prefixes_and_disjoint():
    a, b = ss.load_split("val", 12), ss.load_split("val", 20)
    assert [(s.scene_seed, s.prompt) for s in a] == [(s.scene_seed, s.prompt) for s in b[:12]]
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a, b))
    assert [s.family for s in a] == list(ss.FAMILIES) * 3
    train = {s.scene_seed for s in ss.load_split("train", 12)}
    assert not train & {s.scene_seed for s in a}


def test_patch_mask_follows_synthvqa_coverage(samples):
    s = samples[0]
    _, target = _target(s)
    assert np.array_equal(s.patch_mask(), target.patch_mask())


def test_metrics_are_lisas():
    a = np.zeros((4, 4), bool)
    a[:2, :2] = True  # 4 pixels
    b = np.zeros((4, 4), bool)
    b[:2, :1] = True  # 2 pixels inside a
    big_t = np.ones((4, 4), bool)
    big_p = np.zeros((4, 4), bool)
    big_p[:2] = True  # 8 of 16
    assert ss.iou(b, a) == 0.5 and ss.iou(a, a) == 1.0 and ss.iou(~a & a, ~a & a) == 1.0
    scores = ss.segmentation_scores([b, big_p], [a, big_t])
    assert scores["giou"] == pytest.approx((0.5 + 0.5) / 2)
    assert scores["ciou"] == pytest.approx((2 + 8) / (4 + 16))
    scores = ss.segmentation_scores([a, big_p], [a, big_t])
    assert scores["giou"] == pytest.approx(0.75) and scores["ciou"] == pytest.approx(12 / 20)
    with pytest.raises(ValueError, match="one mask per target"):
        ss.segmentation_scores([a], [a, a])


def test_box_from_text_baseline_is_blind_and_weak(samples):
    boxes = ss.blind_box_baseline(ss.load_split("train", 40))
    assert set(boxes) == set(ss.FAMILIES)
    for x0, y0, x1, y1 in boxes.values():
        assert x1 - x0 == y1 - y0 and x0 + x1 == sv.IMAGE_SIZE  # centred squares
    score = ss.segmentation_scores([ss.box_mask(boxes[s.family]) for s in samples], [s.mask for s in samples])
    assert score["giou"] < 0.15
    mask = ss.box_mask((2, 1, 5, 3), (6, 4))
    assert mask.sum() == 6 and mask[1:3, 2:5].all()


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="split must be one of"):
        ss.load_split("dev", 3)
    with pytest.raises(ValueError, match="families are"):
        ss.load_split("test", 3, families=["counting"])
