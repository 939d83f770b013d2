from collections import Counter
from functools import lru_cache

import numpy as np
import pytest

from vtprune.bench import synthvqa as sv

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 210, 40), "purple": (140, 60, 190), "orange": (245, 140, 30)}
SHAPES = {"circle", "square", "triangle", "diamond", "cross"}
PLURALS = {s + ("es" if s.endswith("s") else "s"): s for s in SHAPES}
SIZES = {"small", "medium", "large"}
REGIONS = [["top-left", "top", "top-right"], ["left", "centre", "right"],
           ["bottom-left", "bottom", "bottom-right"]]


@lru_cache(maxsize=None)
def scene(seed):
    return sv.generate_scene(seed)


@pytest.fixture(scope="module")
def samples():
    return sv.load_split("val", 1200)


def centroid(mask):
    ys, xs = np.nonzero(mask)
    return xs.mean() + 0.5, ys.mean() + 0.5


def patch_mask_slow(mask):
    out = np.zeros((24, 24), bool)
    for i in range(24):
        for j in range(24):
            out[i, j] = mask[14 * i:14 * i + 14, 14 * j:14 * j + 14].sum() >= 0.15 * 196
    return out


def resolve(words, objects):
    """The unique object a description such as 'small red circle' / 'red object' names."""
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    size = next((w for w in words if w in SIZES), None)
    assert colour or shape, words
    found = [o for o in objects if (colour is None or o.colour == colour)
             and (shape is None or o.shape == shape) and (size is None or o.size == size)]
    assert len(found) == 1, f"description {words} matches {len(found)} objects"
    return found[0]


def rederive(sample):
    """Independently recompute (answer, referred objects) from the scene ground truth."""
    objs = scene(sample.scene_seed).objects
    w = sample.question.split()[:-1]
    if sample.family == "attribute":
        o = resolve(w[3:], objs)
        return (o.colour if w[1] == "colour" else o.shape), [o]
    if sample.family == "existence":
        colour, shape = w[-2], w[-1]
        hits = [o for o in objs if o.colour == colour and o.shape == shape]
        if hits:
            return "yes", hits
        return "no", [o for o in objs if o.colour == colour or o.shape == shape]
    if sample.family == "counting":
        if w[2] in COLOURS:
            hits = [o for o in objs if o.colour == w[2]]
        else:
            hits = [o for o in objs if o.shape == PLURALS[w[2]]]
        return str(len(hits)), hits
    if sample.family == "spatial":
        # which side of the <B> is the <A> on
        i = w.index("is")
        b, a = resolve(w[4:i], objs), resolve(w[i + 2:-1], objs)
        (ax, ay), (bx, by) = centroid(a.mask), centroid(b.mask)
        dx, dy = ax - bx, ay - by
        assert max(abs(dx), abs(dy)) >= 30 and max(abs(dx), abs(dy)) >= 1.5 * min(abs(dx), abs(dy))
        if abs(dx) > abs(dy):
            return ("left" if dx < 0 else "right"), [a, b]
        return ("above" if dy < 0 else "below"), [a, b]
    if sample.family == "localisation":
        o = resolve(w[3:], objs)
        x, y = centroid(o.mask)
        for v in (x, y):  # clear of the 3x3 cell borders
            assert min(abs(v - 112), abs(v - 224)) >= 5
        return REGIONS[int(y // 112)][int(x // 112)], [o]
    if sample.family == "reading":
        o = resolve(w[5:], objs)
        assert w[1] == ("digit" if o.label.isdigit() else "letter")
        return o.label, [o]
    raise AssertionError(sample.family)


def test_api_constants():
    assert sv.FAMILIES == ("attribute", "existence", "counting", "spatial", "localisation", "reading")
    assert (sv.IMAGE_SIZE, sv.PATCH_SIZE, sv.GRID) == (336, 14, 24)
    assert sv.answer_choices("localisation") == tuple(r for row in REGIONS for r in row)
    assert sv.answer_choices("existence") == ("yes", "no")
    for f in sv.FAMILIES:
        assert 0 < sv.chance_rate(f) <= 1
        assert sv.chance_rate(f) >= 1 / len(sv.answer_choices(f)) - 1e-9
        assert set(sv.answer_choices(f)) <= set(sv.answer_vocabulary())
    with pytest.raises(ValueError):
        sv.load_split("dev", 3)


def test_scene_determinism():
    a, b = sv.generate_scene(123), sv.generate_scene(123)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert [(o.shape, o.colour, o.size, o.label, o.box) for o in a.objects] == \
           [(o.shape, o.colour, o.size, o.label, o.box) for o in b.objects]
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.objects, b.objects))
    c = sv.generate_scene(124)
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))
    assert a.image.size == (336, 336) and a.image.mode == "RGB"


def test_load_split_determinism_and_prefix():
    x, y = sv.load_split("test", 30), sv.load_split("test", 45)
    for s, t in zip(x, y):
        assert (s.scene_seed, s.question, s.answer, s.family) == (t.scene_seed, t.question, t.answer, t.family)
        assert np.array_equal(np.asarray(s.image), np.asarray(t.image))
        assert np.array_equal(s.relevant_patches, t.relevant_patches)
    # a family's samples do not depend on which other families are requested
    only = sv.load_split("test", 5, families=["reading"])
    assert [s.question for s in only] == [s.question for s in y if s.family == "reading"][:5]


def test_splits_use_disjoint_seeds():
    seeds = {sp: {s.scene_seed for s in sv.load_split(sp, 60)} for sp in ("train", "val", "test")}
    assert not seeds["train"] & seeds["val"] and not seeds["val"] & seeds["test"]
    assert not seeds["train"] & seeds["test"]
    assert max(seeds["train"]) < 1_000_000 <= min(seeds["val"]) and max(seeds["val"]) < 2_000_000 <= min(seeds["test"])


def test_answers_and_relevance_match_ground_truth(samples):
    for s in samples[:300]:
        answer, refs = rederive(s)
        assert s.answer == answer, s.question
        union = np.zeros((24, 24), bool)
        for o in refs:
            union |= o.patch_mask()
        assert np.array_equal(s.relevant_patches, union), s.question
        assert s.relevant_patches.shape == (24, 24) and s.relevant_patches.dtype == bool
        assert s.relevant_patches.any() or (s.family == "counting" and s.answer == "0")


def test_masks_are_drawn_on_image():
    for seed in range(20):
        sc = scene(seed)
        img = np.asarray(sc.image).astype(float)
        assert 3 <= len(sc.objects) <= 8
        taken = np.zeros((336, 336), bool)
        for o in sc.objects:
            assert o.mask.shape == (336, 336) and o.mask.dtype == bool
            assert not (taken & o.mask).any(), "objects overlap"
            taken |= o.mask
            x0, y0, x1, y1 = o.box
            assert o.mask[y0:y1, x0:x1].sum() == o.mask.sum() > 0
            body = o.mask & ~o.label_mask if o.label is not None else o.mask
            assert np.abs(img[body].mean(0) - COLOURS[o.colour]).max() < 6, (seed, o.colour)
            if o.label is not None:
                assert o.size != "small" and o.label_mask.sum() > 15
                assert not (o.label_mask & ~o.mask).any()
                glyph = img[o.label_mask].mean(0)
                assert glyph.max() < 40 or glyph.min() > 220  # black or white ink
        # background stays muted (low saturation) so it cannot be confused with objects
        bg = img[~taken]
        assert (bg.max(1) - bg.min(1)).mean() < 40


def test_patch_masks_follow_coverage_threshold():
    for seed in range(4):
        for o in scene(seed).objects:
            assert np.array_equal(o.patch_mask(), patch_mask_slow(o.mask))
            assert o.patch_mask().any()


def test_small_objects_cover_few_patches():
    smalls = [o for seed in range(30) for o in scene(seed).objects if o.size == "small"]
    assert smalls
    assert all(o.box[2] - o.box[0] <= 28 for o in smalls)
    assert sum(o.patch_mask().sum() <= 4 for o in smalls) >= len(smalls) // 2
    larges = [o for seed in range(30) for o in scene(seed).objects if o.size == "large"]
    assert all(o.patch_mask().sum() >= 16 for o in larges)


def test_family_balance_and_distributions(samples):
    by_family = Counter(s.family for s in samples)
    assert by_family == {f: 200 for f in sv.FAMILIES}
    assert [s.family for s in samples[:12]] == list(sv.FAMILIES) * 2
    ans = {f: Counter(s.answer for s in samples if s.family == f) for f in sv.FAMILIES}
    assert 0.4 <= ans["existence"]["yes"] / 200 <= 0.6
    assert set(ans["localisation"]) == set(sv.answer_choices("localisation"))
    assert set(ans["spatial"]) == set(sv.answer_choices("spatial"))
    assert ans["counting"]["0"] > 0 and max(map(int, ans["counting"])) >= 3
    for f in ("attribute", "counting"):
        assert abs(ans[f].most_common(1)[0][1] / 200 - sv.chance_rate(f)) < 0.08


def test_existence_negatives_are_adversarial(samples):
    negs = [s for s in samples if s.family == "existence" and s.answer == "no"]
    adversarial = 0
    for s in negs:
        colour, shape = s.question.split()[-3:-1]
        objs = scene(s.scene_seed).objects
        adversarial += any(o.colour == colour for o in objs) and any(o.shape == shape for o in objs)
    assert adversarial >= 0.9 * len(negs)


def test_vocabularies_and_choices(samples):
    qv, av = set(sv.question_vocabulary()), set(sv.answer_vocabulary())
    for s in samples:
        assert s.question.endswith(" ?") and s.question == s.question.lower()
        assert set(s.question.split()) <= qv, s.question
        assert s.choices == sv.answer_choices(s.family)
        assert s.answer in s.choices and s.answer in av and " " not in s.answer
