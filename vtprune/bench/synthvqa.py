"""SynthVQA: a seeded, procedurally generated VQA benchmark for visual-token pruning.

Every scene is a 336x336 RGB image (LLaVA-1.5 geometry: a patch-14 ViT sees a
24x24 = 576 patch grid) with a muted, textured background (low-frequency colour
gradient, faint stripes, mild noise) and 3-8 non-overlapping objects.  Objects
have one of 5 shapes (circle, square, triangle, diamond, cross), one of 6
saturated colours (red, green, blue, yellow, purple, orange) and one of 3 size
classes (small 20-28 px, i.e. 1-2 patches wide; medium 44-56 px; large 80-96 px).
About 35% of medium/large objects carry a high-contrast digit or letter at their
centroid.  Object centres are drawn uniformly over the 9 cells of a 3x3 split.

Nothing is downloaded; the same seed always gives a pixel-identical image.
Scene seeds per split are disjoint: train 0.., val 1_000_000.., test 2_000_000..

High-resolution variant (``load_split(..., resolution="high")``, for LLaVA-NeXT-style models): canvases of 672x336,
336x672 or 672x672 (anyres grids 1x2, 2x1, 2x2 of 336-px crops), seeds 10_000_000.. / 11_000_000.. /
12_000_000..; objects keep their pixel sizes (so in the whole-image view, downscaled to 336 px, they and their
glyphs shrink to half size or less), the largest canvas holds 4-10 objects, regions and spatial thresholds follow the
canvas, and patch masks are [height / 14, width / 14].

Ground truth per object: shape, colour, size, label, box, a bool [336, 336]
pixel mask and a bool [24, 24] patch mask.  A patch counts as covered when at
least ``COVERAGE_THRESHOLD`` = 15% of its 196 pixels belong to the object.

Question families (lower-case words, final " ?" as its own token, single-word
answers).  ``chance_rate`` is the accuracy of always giving the generator's most
frequent answer: 1/len(choices) where answers are uniform by construction, else
the majority-class rate measured on 4000 test-split scenes.

* attribute    "what colour is the <shape> ?" / "what shape is the <colour>
               object ?" (only when that identifies one object); 11 answers,
               each shape ~11%, each colour ~7.5%                        0.11
* existence    "is there a <colour> <shape> ?" yes/no; negatives are absent
               combinations, adversarial (colour and shape each present)
               whenever possible; yes with probability 1/2               0.50
* counting     "how many <colour> objects are there ?" / "how many <shapes>
               are there ?" answers "0".."8"; the count value is drawn
               uniformly over the values available in the scene, which
               gives roughly 1: 31%, 0: 28%, 2: 26%, 3: 13%, 4+: 3%      0.31
* spatial      "which side of the <B> is the <A> on ?" left/right/above/below,
               only when one axis dominates (>= 2x) with >= 40 px; the side
               is drawn uniformly over the sides available                0.25
* localisation "where is the <desc> ?" one of 9 regions of a 3x3 split, by the
               mask centroid, which must be >= 10 px from a cell border;
               target region drawn uniformly                            1/9
* reading      "what digit|letter is on the <desc> ?" answer the glyph,
               one of 0-9 or A E H K R X (upper case)                   1/16

Descriptions (<desc>) are "<shape>", "<colour> object", "<colour> <shape>" or
"<size> <colour> <shape>", used only when they match exactly one object.
``relevant_patches`` is the union of the patch masks of the objects a question
refers to; for existence negatives, the objects sharing the colour or the
shape; for counting, all matching objects (empty only when the answer is "0").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FAMILIES: tuple[str, ...] = ("attribute", "existence", "counting", "spatial", "localisation", "reading")
IMAGE_SIZE = 336
PATCH_SIZE = 14
GRID = IMAGE_SIZE // PATCH_SIZE
COVERAGE_THRESHOLD = 0.15
SPLIT_SEED_BASE = {"train": 0, "val": 1_000_000, "test": 2_000_000}

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles",
                 "diamond": "diamonds", "cross": "crosses"}
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 210, 40), "purple": (140, 60, 190), "orange": (245, 140, 30)}
SIZES = {"small": (20, 28), "medium": (44, 56), "large": (80, 96)}
SIZE_PROBS = (0.35, 0.4, 0.25)
DIGITS = "0123456789"
LETTERS = "AEHKRX"  # letters that cannot be mistaken for digits
LABELS = tuple(DIGITS + LETTERS)
LABEL_PROB = 0.35
REGIONS = ("top-left", "top", "top-right", "left", "centre", "right", "bottom-left", "bottom", "bottom-right")
SIDES = ("left", "right", "above", "below")

CELL = IMAGE_SIZE / 3
BORDER_MARGIN = 10   # localisation: centroid this far from a 3x3 cell border
OBJECT_GAP = 6       # min free pixels between object boxes
SPATIAL_MIN_PX = 40  # spatial: min centre offset along the dominant axis
_CHANCE = {"attribute": 0.11, "existence": 0.5, "counting": 0.31,
           "spatial": 0.25, "localisation": 1 / 9, "reading": 1 / 16}
# measured on 4000 high-resolution test scenes like _CHANCE: only counting's majority share differs (0 in 29%)
_CHANCE_HIGH = {**_CHANCE, "counting": 0.29}

#: canvases of the high-resolution variant (width, height): LLaVA-NeXT grids 1x2, 2x1 and 2x2 of 336-px crops
HIGH_RES_SIZES: tuple[tuple[int, int], ...] = ((672, 336), (336, 672), (672, 672))
#: scene seeds of the high-resolution splits (disjoint from the 336-px ones)
HIGH_RES_SEED_BASE = {"train": 10_000_000, "val": 11_000_000, "test": 12_000_000}
RESOLUTIONS = ("base", "high")


@lru_cache(maxsize=8)
def _coords(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), each [height, width]."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    return yy, xx


@dataclass
class SceneObject:
    shape: str
    colour: str
    size: str
    label: str | None
    box: tuple[int, int, int, int]
    mask: np.ndarray  # bool [height, width] of the canvas
    label_mask: np.ndarray | None = field(default=None, repr=False)  # glyph pixels, subset of mask
    _centre: tuple[float, float] | None = field(default=None, init=False, repr=False, compare=False)

    def patch_mask(self) -> np.ndarray:
        """bool [height / 14, width / 14]: the patches the object covers."""
        rows, cols = self.mask.shape[0] // PATCH_SIZE, self.mask.shape[1] // PATCH_SIZE
        cover = self.mask.reshape(rows, PATCH_SIZE, cols, PATCH_SIZE).mean(axis=(1, 3))
        return cover >= COVERAGE_THRESHOLD

    def centroid(self) -> tuple[float, float]:
        """(x, y) of the mask centroid in pixels; cached, masks are not meant to change."""
        if self._centre is None:
            ys, xs = np.nonzero(self.mask)
            self._centre = (float(xs.mean() + 0.5), float(ys.mean() + 0.5))
        return self._centre


@dataclass
class Scene:
    seed: int
    image: Image.Image
    objects: list[SceneObject]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.image.size


@dataclass
class Sample:
    scene_seed: int
    image: Image.Image
    question: str
    answer: str
    family: str
    choices: tuple[str, ...]
    relevant_patches: np.ndarray  # bool [height / 14, width / 14] (24 x 24 for a 336-px scene)


def region_of(x: float, y: float, size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> str:
    """The cell of a 3x3 split of a ``size`` = (width, height) canvas that holds (x, y)."""
    col = min(int(x // (size[0] / 3)), 2)
    row = min(int(y // (size[1] / 3)), 2)
    return REGIONS[3 * row + col]


def _shape_mask(shape: str, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    all_y, all_x = _coords(size[1], size[0])
    xx, yy = all_x[y0:y1, x0:x1], all_y[y0:y1, x0:x1]
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    if shape == "circle":
        local = ((xx - cx) / hw) ** 2 + ((yy - cy) / hh) ** 2 <= 1.0
    elif shape == "square":
        local = np.ones(xx.shape, bool)
    elif shape == "triangle":  # apex up
        local = np.abs(xx - cx) <= (yy - y0) / (y1 - y0) * hw
    elif shape == "diamond":
        local = np.abs(xx - cx) / hw + np.abs(yy - cy) / hh <= 1.0
    elif shape == "cross":
        local = (np.abs(xx - cx) <= hw / 3) | (np.abs(yy - cy) <= hh / 3)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    mask = np.zeros((size[1], size[0]), bool)
    mask[y0:y1, x0:x1] = local
    return mask


@lru_cache(maxsize=512)
def _glyph(char: str, height: int) -> np.ndarray:
    """Bool bitmap of `char`, roughly `height` px tall (cap height)."""
    try:
        font = ImageFont.load_default(size=round(height / 0.72))
        scale = 1
    except (TypeError, OSError):  # no FreeType: upscale the built-in bitmap font
        font, scale = ImageFont.load_default(), max(1, round(height / 8))
    l, t, r, b = font.getbbox(char)
    canvas = Image.new("L", (r - l + 2, b - t + 2), 0)
    ImageDraw.Draw(canvas).text((1 - l, 1 - t), char, fill=255, font=font)
    if scale > 1:
        canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST)
    bitmap = np.asarray(canvas) > 127
    ys, xs = np.nonzero(bitmap)
    return bitmap[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def _background(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    width, height = size
    grey = rng.uniform(90, 190, size=(2, 2, 1))
    corners = grey + rng.uniform(-18, 18, size=(2, 2, 3))  # low saturation tint
    tx = np.linspace(0.0, 1.0, width, dtype=np.float32)[:, None, None]
    ty = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    top = corners[0, 0] * (1 - tx) + corners[0, 1] * tx           # [W,1,3] along x
    bottom = corners[1, 0] * (1 - tx) + corners[1, 1] * tx
    img = top[None, :, 0] * (1 - ty) + bottom[None, :, 0] * ty    # [H,W,3]
    angle, period = rng.uniform(0, np.pi), rng.uniform(18, 60)
    yy, xx = _coords(height, width)
    phase = (xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period)
    img = img + (rng.uniform(3, 7) * np.sin(phase))[..., None]
    return img.astype(np.float32)


def _place(rng: np.random.Generator, side: int, boxes: list[tuple[int, int, int, int]], size: tuple[int, int]):
    width, height = size
    cell_x, cell_y = width / 3, height / 3
    for _ in range(60):
        region = rng.integers(9)
        row, col = divmod(int(region), 3)
        half = side / 2
        lo_x = max(col * cell_x + BORDER_MARGIN + 2, half + 4)
        hi_x = min((col + 1) * cell_x - BORDER_MARGIN - 2, width - half - 4)
        lo_y = max(row * cell_y + BORDER_MARGIN + 2, half + 4)
        hi_y = min((row + 1) * cell_y - BORDER_MARGIN - 2, height - half - 4)
        x0 = int(round(rng.uniform(lo_x, hi_x) - half))
        y0 = int(round(rng.uniform(lo_y, hi_y) - half))
        box = (x0, y0, x0 + side, y0 + side)
        if all(box[0] >= b[2] + OBJECT_GAP or b[0] >= box[2] + OBJECT_GAP or
               box[1] >= b[3] + OBJECT_GAP or b[1] >= box[3] + OBJECT_GAP for b in boxes):
            return box
    return None


def generate_scene(seed: int, size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> Scene:
    """The scene of ``seed`` on a ``size`` = (width, height) canvas. Objects keep their pixel sizes on any canvas,
    so on a larger one they are smaller relative to the image; the 672 x 672 canvas holds 4-10 objects (the others
    3-8)."""
    rng = np.random.default_rng(seed)
    img = _background(rng, size)
    objects: list[SceneObject] = []
    boxes: list[tuple[int, int, int, int]] = []
    most = 11 if size[0] * size[1] >= 4 * IMAGE_SIZE * IMAGE_SIZE else 9
    target = int(rng.integers(3 + (most > 9), most))
    while len(objects) < target:
        colour = str(rng.choice(list(COLOURS)))
        shape = str(rng.choice(SHAPES))
        size_idx = int(rng.choice(3, p=SIZE_PROBS))
        box = None
        while box is None and size_idx >= 0:  # crowded scene: try a smaller size class
            size_name = list(SIZES)[size_idx]
            box = _place(rng, int(rng.integers(SIZES[size_name][0], SIZES[size_name][1] + 1)), boxes, size)
            size_idx -= 1
        if box is None:
            if len(objects) >= 3:
                break
            continue
        mask = _shape_mask(shape, box, size)
        img[mask] = COLOURS[colour]
        obj = SceneObject(shape, colour, size_name, None, box, mask)
        if size_name != "small" and rng.random() < LABEL_PROB:
            obj.label = str(rng.choice(LABELS))
            side = box[2] - box[0]
            glyph = _glyph(obj.label, max(10, 2 * round(side * (0.3 if shape in ("triangle", "cross") else 0.4) / 2)))
            cx, cy = obj.centroid()
            gy0, gx0 = int(round(cy - glyph.shape[0] / 2)), int(round(cx - glyph.shape[1] / 2))
            label_mask = np.zeros_like(mask)
            label_mask[gy0:gy0 + glyph.shape[0], gx0:gx0 + glyph.shape[1]] = glyph
            obj.label_mask = label_mask & mask
            dark = colour in ("yellow", "orange")
            img[obj.label_mask] = (15, 15, 15) if dark else (250, 250, 250)
        objects.append(obj)
        boxes.append(box)
    noise = rng.standard_normal((size[1], size[0]), dtype=np.float32) * 3.0
    img += noise[..., None]
    image = Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")
    return Scene(seed, image, objects)


# ---------------------------------------------------------------- questions

def _descriptions(obj: SceneObject, objects: list[SceneObject]) -> list[str]:
    """Descriptions of `obj` that match no other object in the scene."""
    cands = [
        (obj.shape, lambda o: o.shape == obj.shape),
        (f"{obj.colour} object", lambda o: o.colour == obj.colour),
        (f"{obj.colour} {obj.shape}", lambda o: (o.colour, o.shape) == (obj.colour, obj.shape)),
        (f"{obj.size} {obj.colour} {obj.shape}",
         lambda o: (o.size, o.colour, o.shape) == (obj.size, obj.colour, obj.shape)),
    ]
    return [d for d, match in cands if sum(map(match, objects)) == 1]


def _union(objs: Sequence[SceneObject], size: tuple[int, int]) -> np.ndarray:
    out = np.zeros((size[1] // PATCH_SIZE, size[0] // PATCH_SIZE), bool)
    for o in objs:
        out |= o.patch_mask()
    return out


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _attribute(objs, rng, size):
    forms = []
    for o in objs:
        if sum(p.shape == o.shape for p in objs) == 1:
            forms.append((f"what colour is the {o.shape} ?", o.colour, o))
        if sum(p.colour == o.colour for p in objs) == 1:
            forms.append((f"what shape is the {o.colour} object ?", o.shape, o))
    if not forms:
        return None
    q, a, o = _pick(rng, forms)
    return q, a, [o]


def _existence(objs, rng, size):
    present = {(o.colour, o.shape) for o in objs}
    if rng.random() < 0.5:
        colour, shape = _pick(rng, sorted(present))
        answer = "yes"
        refs = [o for o in objs if (o.colour, o.shape) == (colour, shape)]
    else:
        colours, shapes = {o.colour for o in objs}, {o.shape for o in objs}
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        adversarial = [(c, s) for c, s in absent if c in colours and s in shapes]
        partial = [(c, s) for c, s in absent if c in colours or s in shapes]
        colour, shape = _pick(rng, adversarial or partial)
        answer = "no"
        refs = [o for o in objs if o.colour == colour or o.shape == shape]
    article = "an" if colour[0] in "aeiou" else "a"
    return f"is there {article} {colour} {shape} ?", answer, refs


def _counting(objs, rng, size):
    by_count: dict[int, list[tuple[str, str]]] = {}
    for c in COLOURS:
        by_count.setdefault(sum(o.colour == c for o in objs), []).append(("colour", c))
    for s in SHAPES:
        by_count.setdefault(sum(o.shape == s for o in objs), []).append(("shape", s))
    count = _pick(rng, sorted(c for c in by_count if c <= 8))  # flattens the answer prior; answers stop at "8"
    kind, value = _pick(rng, by_count[count])
    if kind == "colour":
        q, refs = f"how many {value} objects are there ?", [o for o in objs if o.colour == value]
    else:
        q, refs = f"how many {SHAPE_PLURALS[value]} are there ?", [o for o in objs if o.shape == value]
    return q, str(count), refs


def _side(a: SceneObject, b: SceneObject) -> str | None:
    """Where a lies relative to b, or None when not clear-cut."""
    (ax, ay), (bx, by) = a.centroid(), b.centroid()
    dx, dy = ax - bx, ay - by
    if abs(dx) >= SPATIAL_MIN_PX and abs(dx) >= 2 * abs(dy):
        return "left" if dx < 0 else "right"
    if abs(dy) >= SPATIAL_MIN_PX and abs(dy) >= 2 * abs(dx):
        return "above" if dy < 0 else "below"
    return None


def _spatial(objs, rng, size):
    pairs = [(a, b) for a in objs for b in objs
             if a is not b and _descriptions(a, objs) and _descriptions(b, objs) and _side(a, b)]
    if not pairs:
        return None
    side = _pick(rng, sorted({_side(a, b) for a, b in pairs}))  # balances the four answers
    a, b = _pick(rng, [(a, b) for a, b in pairs if _side(a, b) == side])
    q = f"which side of the {_pick(rng, _descriptions(b, objs))} is the {_pick(rng, _descriptions(a, objs))} on ?"
    return q, _side(a, b), [a, b]


def _near_border(v: float, extent: int) -> bool:
    return any(abs(v - k * extent / 3) < BORDER_MARGIN for k in (1, 2))


def _localisation(objs, rng, size):
    eligible = [o for o in objs if _descriptions(o, objs)
                and not any(_near_border(v, extent) for v, extent in zip(o.centroid(), size))]
    if not eligible:
        return None
    want = REGIONS[int(rng.integers(9))]  # aim for a uniform region prior
    in_region = [o for o in eligible if region_of(*o.centroid(), size) == want]
    o = _pick(rng, in_region or eligible)
    return f"where is the {_pick(rng, _descriptions(o, objs))} ?", region_of(*o.centroid(), size), [o]


def _reading(objs, rng, size):
    eligible = [o for o in objs if o.label is not None and _descriptions(o, objs)]
    if not eligible:
        return None
    o = _pick(rng, eligible)
    kind = "digit" if o.label in DIGITS else "letter"
    return f"what {kind} is on the {_pick(rng, _descriptions(o, objs))} ?", o.label, [o]


_GENERATORS = {"attribute": _attribute, "existence": _existence, "counting": _counting,
               "spatial": _spatial, "localisation": _localisation, "reading": _reading}


def questions_for_scene(scene: Scene, rng: np.random.Generator) -> list[Sample]:
    # one child stream per family, so a family's question does not depend on which others are asked
    child_seeds = rng.integers(0, 2**63, size=len(FAMILIES))
    samples = []
    for family, child in zip(FAMILIES, child_seeds):
        out = _GENERATORS[family](scene.objects, np.random.default_rng(int(child)), scene.size)
        if out is None:
            continue
        q, a, refs = out
        samples.append(Sample(scene.seed, scene.image, q, a, family, answer_choices(family), _union(refs, scene.size)))
    return samples


def scene_size(seed: int, resolution: str = "base") -> tuple[int, int]:
    """The canvas (width, height) of a scene seed: 336 x 336 at ``"base"``; at ``"high"`` one of
    ``HIGH_RES_SIZES`` drawn from the seed (LLaVA-NeXT grids 1x2, 2x1, 2x2 in equal shares)."""
    if resolution == "base":
        return (IMAGE_SIZE, IMAGE_SIZE)
    return HIGH_RES_SIZES[int(np.random.default_rng([seed, 11]).integers(len(HIGH_RES_SIZES)))]


def load_split(split: str, n: int, families: Sequence[str] | None = None, resolution: str = "base") -> list[Sample]:
    """`n` samples cycling round-robin over `families`; scenes may be shared across families.

    Family f's j-th sample comes from the j-th scene of the split that can pose f, so
    the result is deterministic and load_split(s, n) is a prefix of load_split(s, n + k).
    ``resolution="high"``: the high-resolution variant (canvases of ``HIGH_RES_SIZES``, its own scene seeds), for
    LLaVA-NeXT-style models; objects and glyphs keep their pixel sizes, so the small ones are legible only at the
    crops' full resolution, not in the downscaled whole-image view.
    """
    if split not in SPLIT_SEED_BASE:
        raise ValueError(f"split must be one of {tuple(SPLIT_SEED_BASE)}, got {split!r}")
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution!r}")
    fams = tuple(families) if families is not None else FAMILIES
    unknown = set(fams) - set(FAMILIES)
    if unknown or not fams:
        raise ValueError(f"unknown or empty families: {sorted(unknown)}")
    pending: dict[str, list[Sample]] = {f: [] for f in fams}
    seed = (SPLIT_SEED_BASE if resolution == "base" else HIGH_RES_SEED_BASE)[split]
    out: list[Sample] = []
    while len(out) < n:
        family = fams[len(out) % len(fams)]
        while not pending[family]:
            scene = generate_scene(seed, scene_size(seed, resolution))
            for s in questions_for_scene(scene, np.random.default_rng([seed, 7])):
                if s.family in pending:
                    pending[s.family].append(s)
            seed += 1
        out.append(pending[family].pop(0))
    return out


def answer_choices(family: str) -> tuple[str, ...]:
    return {"attribute": tuple(COLOURS) + SHAPES, "existence": ("yes", "no"),
            "counting": tuple(str(i) for i in range(9)), "spatial": SIDES,
            "localisation": REGIONS, "reading": LABELS}[family]


def chance_rate(family: str, resolution: str = "base") -> float:
    """Accuracy of always answering the generator's most frequent answer (see module docstring); the
    high-resolution variant differs only in counting (its larger canvases hold more objects)."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution!r}")
    return _CHANCE_HIGH[family] if resolution == "high" else _CHANCE[family]


def question_vocabulary() -> list[str]:
    words = ["what", "colour", "shape", "is", "the", "object", "objects", "there", "a", "an",
             "how", "many", "are", "which", "side", "of", "on", "where", "digit", "letter", "?"]
    words += list(COLOURS) + list(SHAPES) + list(SHAPE_PLURALS.values()) + list(SIZES)
    return list(dict.fromkeys(words))


def answer_vocabulary() -> list[str]:
    return list(dict.fromkeys(a for f in FAMILIES for a in answer_choices(f)))
