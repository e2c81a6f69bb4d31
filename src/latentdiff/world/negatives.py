"""Hard-negative captions for the built-in world: one-attribute variants, and whether a caption fits a scene.

    spec = parse_caption("a red circle and a blue square")
    hard_negatives(spec, scene, 4, np.random.default_rng(0))   # 4 captions, each one attribute off, none true of scene
    attribute_difference(spec, parse_caption("a blue circle and a red square"))  # "swap"

A variant changes one *named* attribute (:data:`ATTRIBUTE_KINDS`): one object's colour, shape,
size or position, the background, or a swap of one attribute between the two objects. Every
caption has at least :data:`MIN_VARIANTS` of them. :func:`world_words` is the caption grammar's
vocabulary.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

from .captions import CaptionSpec, ObjectSpec
from .spec import BACKGROUND_COLOURS, CELL_PHRASES, CELLS, OBJECT_COLOURS, SHAPES, SIZES, Scene

ATTRIBUTE_KINDS: tuple[str, ...] = ("colour", "shape", "size", "position", "background", "swap")
"""Kinds of hard negatives: one object's attribute, the background, or a swap between the objects."""
MIN_VARIANTS = 7  # the fewest one-attribute variants a caption has ("a red circle": 5 colours + 2 shapes)
_FIELDS = {"colour": "colour", "shape": "shape", "size": "size", "cell": "position"}


def world_words() -> list[str]:
    """Every word the caption grammar can write."""
    words = {"a", "and", "on", "background", *SIZES, *OBJECT_COLOURS, *SHAPES, *BACKGROUND_COLOURS}
    for phrase in CELL_PHRASES.values():
        words.update(phrase.split(" "))
    return sorted(words)


def describes(spec: CaptionSpec, scene: Scene) -> bool:
    """True when the caption is true of the scene, objects matched in any order (as the judge matches them)."""
    if len(spec.objects) != len(scene.objects) or spec.background not in (None, scene.background):
        return False
    return any(
        all(s.describes(o) for s, o in zip(spec.objects, objects))
        for objects in itertools.permutations(scene.objects)
    )


def _valid(objects: Sequence[ObjectSpec], background: str | None) -> CaptionSpec | None:
    try:
        return CaptionSpec(tuple(objects), background)
    except ValueError:  # two objects with one (colour, shape) pair or one named cell
        return None


def one_attribute_variants(spec: CaptionSpec) -> dict[str, list[CaptionSpec]]:
    """Valid captions that differ from ``spec`` in one named attribute, by kind (:data:`ATTRIBUTE_KINDS`).

    colour/shape/size/position: one object's attribute changed (only attributes the caption
    names); background: changed when named; swap: one attribute (colour, shape, or size /
    position when both objects name it) exchanged between two objects that differ in it.
    A variant may still describe some scene of the original (filter with :func:`describes`).
    """
    objects = spec.objects
    out: dict[str, list[CaptionSpec]] = {kind: [] for kind in ATTRIBUTE_KINDS}
    choices = {"colour": list(OBJECT_COLOURS), "shape": list(SHAPES), "size": list(SIZES), "cell": list(CELLS)}
    for i, o in enumerate(objects):
        for field, values in choices.items():
            current = getattr(o, field)
            if current is None:
                continue
            for value in values:
                if value != current:
                    new = list(objects)
                    new[i] = dataclasses.replace(o, **{field: value})
                    variant = _valid(new, spec.background)
                    if variant is not None:
                        out[_FIELDS[field]].append(variant)
    if spec.background is not None:
        out["background"] = [CaptionSpec(objects, b) for b in BACKGROUND_COLOURS if b != spec.background]
    if len(objects) == 2:
        a, b = objects
        for field in choices:
            va, vb = getattr(a, field), getattr(b, field)
            if va is None or vb is None or va == vb:
                continue
            variant = _valid([dataclasses.replace(a, **{field: vb}), dataclasses.replace(b, **{field: va})],
                             spec.background)
            if variant is not None:
                out["swap"].append(variant)
    return out


def attribute_difference(a: CaptionSpec, b: CaptionSpec) -> str | None:
    """The one attribute kind in which ``b`` differs from ``a``, or None (none, several, or counts differ)."""
    if len(a.objects) != len(b.objects):
        return None
    diffs: list[tuple[str, int]] = []
    if a.background != b.background:
        diffs.append(("background", -1))
    for i, (x, y) in enumerate(zip(a.objects, b.objects)):
        diffs += [(f, i) for f in _FIELDS if getattr(x, f) != getattr(y, f)]
    if len(diffs) == 1:
        field = diffs[0][0]
        return "background" if field == "background" else _FIELDS[field]
    if len(diffs) == 2 and diffs[0][0] == diffs[1][0] != "background":
        f = diffs[0][0]
        (x0, x1), (y0, y1) = a.objects, b.objects
        if getattr(x0, f) == getattr(y1, f) and getattr(x1, f) == getattr(y0, f) and None not in (
            getattr(x0, f), getattr(x1, f)
        ):
            return "swap"
    return None


def hard_negatives(spec: CaptionSpec, scene: Scene, k: int, rng: np.random.Generator) -> list[str]:
    """``k`` distinct captions differing from ``spec`` in one named attribute, none true of ``scene``.

    Kinds are shuffled, then one random variant is taken per kind in turn (round-robin), so
    the ``k`` negatives spread over the kinds.
    """
    pools = {kind: [v.text for v in variants if not describes(v, scene)]
             for kind, variants in one_attribute_variants(spec).items()}
    kinds = [ATTRIBUTE_KINDS[i] for i in rng.permutation(len(ATTRIBUTE_KINDS))]
    chosen: list[str] = []
    while len(chosen) < k:
        progress = False
        for kind in kinds:
            pool = [t for t in pools[kind] if t not in chosen]
            if pool and len(chosen) < k:
                chosen.append(pool[int(rng.integers(len(pool)))])
                progress = True
        if not progress:
            raise ValueError(f"caption {spec.text!r} has only {len(chosen)} hard negatives, {k} asked")
    return chosen

