"""Judge an image against a caption: read the image back into objects, compare attributes.

Reading (the Shapes World specification, "Judging"):

1. every pixel is classified to the nearest palette colour (squared RGB
   distance, object and background colours together; ties go to the earlier
   colour in :data:`~latentdiff.world.spec.PALETTE`);
2. the background is the most frequent class (ties: earlier in the palette);
3. objects are the 4-connected components of one *object* colour with at
   least 25 pixels (smaller ones are ignored as noise; pixels of background
   colours other than the background belong to nothing). Should an object
   colour be the most frequent class (a failed generation), its pixels are
   background, not one huge object;
4. per object: bounding box ``(x0, y0, x1, y1)`` (ends exclusive), size small
   when ``max(x1 - x0, y1 - y0) < 15``, fill ratio ``area / box area`` (square
   above 0.88, circle 0.66..0.88, triangle below 0.66), position the cell that
   holds the box centre ``((x0 + x1) / 2, (y0 + y1) / 2)`` (pixel ``i`` covers
   ``[i, i + 1)``, as in :mod:`~latentdiff.world.render`).

Judging: ``count`` is right when the image holds exactly as many objects as the
caption names. Each caption object is paired with one detected object (one to
one): one of the same (colour, shape) when there is one, as the spec matches
objects; otherwise the one agreeing in most attributes (colour and shape first),
so that a red square drawn for "a red circle" still scores its colour. An
attribute (colour, shape, size, position) is right when every caption object
that names it has a partner that agrees; a caption object without a partner
(too few objects in the image) fails every attribute it names. ``background``
is compared with the read background. Attributes the caption leaves out are
``None``. The caption is satisfied (``correct``) when every named attribute is
right; that is the spec's rule: count matches and each caption object's
(colour, shape) partner shows its named size and position.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import permutations

import numpy as np
from PIL import Image

from .captions import CaptionSpec, ObjectSpec, parse_caption
from .spec import (
    CANVAS,
    GRID,
    MIN_OBJECT_AREA,
    OBJECT_COLOURS,
    PALETTE,
    SMALL_MAX_SIDE,
    SQUARE_MIN_FILL,
    TRIANGLE_MAX_FILL,
    Cell,
)

ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "position", "background", "count")
"""The attributes a :class:`Judgement` scores, in report order."""

_NAMES = list(PALETTE)
_COLOURS = np.array(list(PALETTE.values()), dtype=np.int32)  # (K, 3)
_N_OBJECT = len(OBJECT_COLOURS)  # classes 0.._N_OBJECT-1 are object colours


@dataclass(frozen=True)
class DetectedObject:
    """An object read from an image. ``bbox`` is ``(x0, y0, x1, y1)`` with exclusive ends."""

    colour: str
    shape: str
    size: str
    cell: Cell
    bbox: tuple[int, int, int, int]
    area: int

    @property
    def fill(self) -> float:
        """Component area over bounding-box area."""
        x0, y0, x1, y1 = self.bbox
        return self.area / ((x1 - x0) * (y1 - y0))


@dataclass(frozen=True)
class Reading:
    """Everything the judge reads from an image: background colour and objects (raster order)."""

    background: str
    objects: tuple[DetectedObject, ...]


@dataclass(frozen=True)
class Judgement:
    """Per-attribute verdicts (``None``: the caption does not name it) and the whole-caption verdict."""

    colour: bool
    shape: bool
    size: bool | None
    position: bool | None
    background: bool | None
    count: bool
    correct: bool
    reading: Reading

    def attributes(self) -> dict[str, bool | None]:
        """``{attribute: verdict}`` in :data:`ATTRIBUTES` order."""
        return {a: getattr(self, a) for a in ATTRIBUTES}


def as_image_array(image: np.ndarray | Image.Image) -> np.ndarray:
    """Check and convert an image to a ``(64, 64, 3)`` uint8 array (PIL images are converted to RGB)."""
    if isinstance(image, Image.Image):
        if image.size != (CANVAS, CANVAS):
            raise ValueError(f"image is {image.size[0]}x{image.size[1]}; Shapes World images are {CANVAS}x{CANVAS}")
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a numpy array or PIL image, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image has shape {image.shape}; expected (height, width, 3) RGB")
    if image.shape[:2] != (CANVAS, CANVAS):
        raise ValueError(
            f"image is {image.shape[1]}x{image.shape[0]}; Shapes World images are {CANVAS}x{CANVAS}"
        )
    if image.dtype != np.uint8:
        raise ValueError(f"image dtype is {image.dtype}; expected uint8 (0..255)")
    return image


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """``(H, W)`` int array: index into :data:`PALETTE` of each pixel's nearest colour."""
    # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 is the same for every c. All terms are integers
    # below 2^24, so float32 arithmetic is exact and ties still go to the earlier colour.
    x = image.reshape(-1, 3).astype(np.float32)
    colours = _COLOURS.astype(np.float32)  # (K, 3)
    dist = (colours * colours).sum(axis=1) - 2.0 * (x @ colours.T)  # (H*W, K)
    return dist.argmin(axis=1).reshape(image.shape[:2])


def label_components(classes: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """4-connected components of equal class among ``foreground`` pixels.

    Returns ``(H, W)`` int labels: for a foreground pixel, the smallest flat index
    in its component; -1 elsewhere. Vectorised union-find: every edge hooks the
    larger root under the smaller one, then paths are compressed by pointer
    jumping, until every edge joins two pixels with one root.
    """
    h, w = classes.shape
    flat = np.arange(h * w).reshape(h, w)
    same_right = foreground[:, :-1] & foreground[:, 1:] & (classes[:, :-1] == classes[:, 1:])
    same_down = foreground[:-1, :] & foreground[1:, :] & (classes[:-1, :] == classes[1:, :])
    a = np.concatenate([flat[:, :-1][same_right], flat[:-1, :][same_down]])
    b = np.concatenate([flat[:, 1:][same_right], flat[1:, :][same_down]])
    parent = np.arange(h * w)
    while True:
        pa, pb = parent[a], parent[b]
        differ = pa != pb
        if not differ.any():
            break
        lo, hi = np.minimum(pa[differ], pb[differ]), np.maximum(pa[differ], pb[differ])
        np.minimum.at(parent, hi, lo)  # hook: roots only ever move to smaller indices
        while True:  # compress: point every pixel at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    labels = parent.reshape(h, w)
    return np.where(foreground, labels, -1)


def shape_from_fill(fill: float) -> str:
    """Shape name for a fill ratio: square above 0.88, circle 0.66..0.88, triangle below 0.66."""
    if fill > SQUARE_MIN_FILL:
        return "square"
    if fill >= TRIANGLE_MAX_FILL:
        return "circle"
    return "triangle"


def cell_of_box(bbox: tuple[int, int, int, int]) -> Cell:
    """The grid cell ``(row, col)`` holding the centre of box ``(x0, y0, x1, y1)``."""
    x0, y0, x1, y1 = bbox
    # centre / (CANVAS / GRID) = (x0 + x1) * GRID / (2 * CANVAS), floored exactly in integers.
    col = min(GRID - 1, (x0 + x1) * GRID // (2 * CANVAS))
    row = min(GRID - 1, (y0 + y1) * GRID // (2 * CANVAS))
    return row, col


def read_image(image: np.ndarray | Image.Image) -> Reading:
    """Read background colour and objects from a ``64 x 64`` RGB image."""
    classes = classify_pixels(as_image_array(image))
    counts = np.bincount(classes.ravel(), minlength=len(_NAMES))
    background = _NAMES[int(counts.argmax())]
    # Pixels of the background class are never object pixels, also when (in a generated image)
    # an object colour is the most frequent: a solid red image holds no "large red square".
    labels = label_components(classes, (classes < _N_OBJECT) & (classes != counts.argmax()))
    roots, areas = np.unique(labels[labels >= 0], return_counts=True)
    objects = []
    for root, area in zip(roots, areas):  # roots are smallest flat indices: raster order
        if area < MIN_OBJECT_AREA:
            continue
        ys, xs = np.nonzero(labels == root)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        side = max(bbox[2] - bbox[0], bbox[3] - bbox[1])
        fill = int(area) / ((bbox[2] - bbox[0]) * (bbox[3] - bbox[1]))
        objects.append(DetectedObject(
            colour=_NAMES[int(classes.flat[root])],
            shape=shape_from_fill(fill),
            size="small" if side < SMALL_MAX_SIDE else "large",
            cell=cell_of_box(bbox),
            bbox=bbox,
            area=int(area),
        ))
    return Reading(background, tuple(objects))


def read_objects(image: np.ndarray | Image.Image) -> list[DetectedObject]:
    """The objects the judge reads from an image, in raster order of their first pixel."""
    return list(read_image(image).objects)


def _agreement(spec: ObjectSpec, det: DetectedObject) -> tuple[int, ...]:
    colour = spec.colour == det.colour
    shape = spec.shape == det.shape
    return (
        int(colour and shape),
        int(colour) + int(shape),
        int(spec.size is not None and spec.size == det.size) + int(spec.cell is not None and spec.cell == det.cell),
    )


def _pair(spec: CaptionSpec, detected: tuple[DetectedObject, ...]) -> list[DetectedObject | None]:
    """One-to-one partners for the caption objects, maximising total agreement (first best wins)."""
    n, m = len(spec.objects), len(detected)
    k = min(n, m)
    scores = [[_agreement(o, d) for d in detected] for o in spec.objects]
    best: tuple[int, ...] | None = None
    best_partners: list[DetectedObject | None] = [None] * n
    for chosen in permutations(range(n), k):  # which caption objects get a partner (n <= 2)
        for dets in permutations(range(m), k):
            score = tuple(map(sum, zip(*(scores[i][j] for i, j in zip(chosen, dets))))) or (0, 0, 0)
            if best is None or score > best:
                best = score
                best_partners = [None] * n
                for i, j in zip(chosen, dets):
                    best_partners[i] = detected[j]
    return best_partners


def judge(image: np.ndarray | Image.Image, caption_or_spec: str | CaptionSpec) -> Judgement:
    """Judge ``image`` against a caption (string or :class:`CaptionSpec`)."""
    spec = parse_caption(caption_or_spec) if isinstance(caption_or_spec, str) else caption_or_spec
    if not isinstance(spec, CaptionSpec):
        raise TypeError(f"expected a caption str or CaptionSpec, got {type(spec).__name__}")
    reading = read_image(image)
    partners = _pair(spec, reading.objects)

    def verdict(named: bool | None, agrees) -> bool | None:
        checks = [p is not None and agrees(o, p) for o, p in zip(spec.objects, partners) if named(o)]
        return all(checks) if checks else None

    colour = verdict(lambda o: True, lambda o, p: o.colour == p.colour)
    shape = verdict(lambda o: True, lambda o, p: o.shape == p.shape)
    size = verdict(lambda o: o.size is not None, lambda o, p: o.size == p.size)
    position = verdict(lambda o: o.cell is not None, lambda o, p: o.cell == p.cell)
    background = None if spec.background is None else spec.background == reading.background
    count = len(reading.objects) == len(spec.objects)
    verdicts = (colour, shape, size, position, background, count)
    correct = all(v for v in verdicts if v is not None)
    return Judgement(colour, shape, size, position, background, count, correct, reading)


def accuracy_report(judgements: Iterable[Judgement]) -> dict[str, float | int | None]:
    """Per-attribute and whole-caption accuracy.

    Keys: ``n`` (judgements), ``caption`` (whole-caption accuracy), each attribute
    of :data:`ATTRIBUTES` (accuracy over the judgements whose caption names it;
    ``None`` when none does) and ``n_<attribute>`` (how many named it).
    """
    judgements = list(judgements)
    report: dict[str, float | int | None] = {
        "n": len(judgements),
        "caption": (sum(j.correct for j in judgements) / len(judgements)) if judgements else None,
    }
    for attr in ATTRIBUTES:
        named = [getattr(j, attr) for j in judgements if getattr(j, attr) is not None]
        report[attr] = sum(named) / len(named) if named else None
        report[f"n_{attr}"] = len(named)
    return report
