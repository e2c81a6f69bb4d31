"""Training data and evaluation prompts of Shapes World.

* :class:`WorldDataset`: a deterministic, endless-in-principle captioned image
  set; item ``i`` depends only on ``(seed, i)``, drawn with
  ``numpy.random.default_rng([seed, i])``.
* :func:`held_out_prompts`: a fixed set of 200 one-object and 200 two-object
  full captions that training never shows.
* :func:`zero_shot_candidates`: a caption and 8 one-attribute variants, for
  "is the right caption ranked first among 9".

**Why no training caption equals a held-out prompt.** The training sampler
rejects every scene whose *content* (its set of (colour, shape, size, cell)
objects and its background) is that of a held-out prompt, in either object
order. Such a scene's full caption is a held-out prompt or its objects swapped,
so no full training caption is held out. A partial training caption leaves out
at least one size, position or background; the grammar is unambiguous (a
caption string fixes which attributes it names, :func:`parse_caption` being a
function), so a partial caption never equals a full one, and every held-out
prompt is full. Hence no training caption, full or partial, equals a held-out
prompt, and the model never even sees a held-out scene.

The held-out set is chosen by SHA-256 hashes of fixed strings, not by a
numpy generator, so it cannot change with the numpy version; a test pins
its digest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch

from .captions import (
    PAIRS,
    CaptionSpec,
    ObjectSpec,
    caption,
    parse_caption,
    sample_caption,
    sample_scene,
)
from .render import render
from .spec import BACKGROUND_COLOURS, CELLS, OBJECT_COLOURS, SHAPES, SIZES, Scene

HELD_OUT_PER_COUNT: int = 200
"""Held-out prompts with one object, and again with two objects."""

ZERO_SHOT_VARIANTS: int = 8

ContentKey = tuple[frozenset, str]


def content_key(scene_or_spec: Scene | CaptionSpec) -> ContentKey:
    """Order-free identity of a scene (or full caption): its set of objects and its background."""
    objects = frozenset((o.colour, o.shape, o.size, o.cell) for o in scene_or_spec.objects)
    return objects, scene_or_spec.background


def _digest(text: str) -> bytes:
    return hashlib.sha256(("shapes-world-v1 held-out: " + text).encode()).digest()


@lru_cache(maxsize=1)
def _held_out() -> tuple[tuple[str, ...], tuple[str, ...], frozenset]:
    """(one-object prompts, two-object prompts, their content keys)."""
    singles = [
        ObjectSpec(colour, shape, size, cell)
        for colour in OBJECT_COLOURS for shape in SHAPES for size in SIZES for cell in CELLS
    ]
    single_specs = [CaptionSpec((o,), bg) for o in singles for bg in BACKGROUND_COLOURS]
    single_specs.sort(key=lambda s: _digest(s.text))
    single_specs = single_specs[:HELD_OUT_PER_COUNT]

    sizes, backgrounds = list(SIZES), list(BACKGROUND_COLOURS)
    double_specs: list[CaptionSpec] = []
    keys = {content_key(s) for s in single_specs}
    k = 0
    while len(double_specs) < HELD_OUT_PER_COUNT:
        d = _digest(f"two objects #{k}")
        k += 1
        p = [PAIRS[int.from_bytes(d[j : j + 4], "big") % len(PAIRS)] for j in (0, 4)]
        c = [CELLS[int.from_bytes(d[j : j + 4], "big") % len(CELLS)] for j in (8, 12)]
        s = [sizes[d[j] % len(sizes)] for j in (16, 17)]
        bg = backgrounds[int.from_bytes(d[18:22], "big") % len(backgrounds)]
        if p[0] == p[1] or c[0] == c[1]:
            continue
        spec = CaptionSpec(tuple(ObjectSpec(*p[i], s[i], c[i]) for i in range(2)), bg)
        if content_key(spec) in keys:
            continue
        keys.add(content_key(spec))
        double_specs.append(spec)
    return tuple(s.text for s in single_specs), tuple(s.text for s in double_specs), frozenset(keys)


def held_out_prompts(n: int | None = None, num_objects: int | None = None) -> list[str]:
    """The fixed held-out full captions, in a stable order.

    The order alternates one-object and two-object prompts, so the first ``n``
    are a balanced subset. ``num_objects`` (1 or 2) keeps only those with that
    many objects. 200 of each exist.
    """
    singles, doubles, _ = _held_out()
    if num_objects == 1:
        prompts = list(singles)
    elif num_objects == 2:
        prompts = list(doubles)
    elif num_objects is None:
        prompts = [p for pair in zip(singles, doubles) for p in pair]
    else:
        raise ValueError(f"num_objects must be 1, 2 or None, got {num_objects!r}")
    if n is not None:
        if n < 0 or n > len(prompts):
            raise ValueError(f"n must be in 0..{len(prompts)}, got {n}")
        prompts = prompts[:n]
    return prompts


def is_held_out(scene: Scene) -> bool:
    """True when ``scene`` has the content of a held-out prompt (in either object order)."""
    return content_key(scene) in _held_out()[2]


def sample_training_scene(rng: np.random.Generator) -> Scene:
    """:func:`sample_scene`, redrawn while the scene is held out."""
    while True:
        scene = sample_scene(rng)
        if not is_held_out(scene):
            return scene


# ------------------------------------------------------------------------------ zero-shot


def zero_shot_candidates(text: str) -> list[str]:
    """``[text]`` followed by 8 valid captions that each differ from it in exactly one attribute.

    Variants change one named attribute of one object (colour, shape, size,
    position) or the background, never the count, and stay valid captions (no
    repeated (colour, shape) pair or cell). They are taken round-robin over the
    attribute kinds colour, shape, size, position, background, alternating
    objects within a kind; the order within a kind is fixed by hashes of the
    strings. Deterministic. ``ValueError`` when the caption names too little
    to have 8 variants (e.g. ``"a red circle"`` has 7).
    """
    spec = parse_caption(text)
    objects = spec.objects

    def with_object(i: int, **change) -> CaptionSpec | None:
        new = list(objects)
        fields = {"colour": objects[i].colour, "shape": objects[i].shape, "size": objects[i].size,
                  "cell": objects[i].cell, **change}
        new[i] = ObjectSpec(**fields)
        try:
            return CaptionSpec(tuple(new), spec.background)
        except ValueError:  # repeats the other object's pair or cell
            return None

    def alternatives(values: Sequence, current) -> list:
        return [v for v in values if v != current]

    def order(variants: list[CaptionSpec | None]) -> list[str]:
        texts = [v.text for v in variants if v is not None]
        return sorted(texts, key=lambda t: _digest(text + " -> " + t))

    per_kind: list[list[list[str]]] = [[] for _ in range(5)]  # kind -> per object/background -> texts
    for i, o in enumerate(objects):
        per_kind[0].append(order([with_object(i, colour=c) for c in alternatives(list(OBJECT_COLOURS), o.colour)]))
        per_kind[1].append(order([with_object(i, shape=s) for s in alternatives(SHAPES, o.shape)]))
        if o.size is not None:
            per_kind[2].append(order([with_object(i, size=s) for s in alternatives(list(SIZES), o.size)]))
        if o.cell is not None:
            per_kind[3].append(order([with_object(i, cell=c) for c in alternatives(CELLS, o.cell)]))
    if spec.background is not None:
        per_kind[4].append(order([CaptionSpec(objects, b) for b in alternatives(list(BACKGROUND_COLOURS), spec.background)]))

    # Within a kind, alternate between objects: obj0's first, obj1's first, obj0's second, ...
    queues = []
    for lists in per_kind:
        merged = []
        for depth in range(max(map(len, lists), default=0)):
            merged += [lst[depth] for lst in lists if depth < len(lst)]
        queues.append(merged)
    available = sum(map(len, queues))
    if available < ZERO_SHOT_VARIANTS:
        raise ValueError(
            f"caption {text!r} names too few attributes for {ZERO_SHOT_VARIANTS} one-attribute variants "
            f"(it has {available}); name the size, position or background"
        )
    chosen: list[str] = []
    depth = 0
    while len(chosen) < ZERO_SHOT_VARIANTS:
        for queue in queues:
            if depth < len(queue) and len(chosen) < ZERO_SHOT_VARIANTS:
                chosen.append(queue[depth])
        depth += 1
    return [text, *chosen]


# -------------------------------------------------------------------------------- dataset


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> ``(3, H, W)`` float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1.0


def tensor_to_image(tensor: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` float in [-1, 1] -> ``(H, W, 3)`` uint8 (rounded, clamped); the judge's input."""
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(tensor.shape)}")
    x = ((tensor.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(1, 2, 0).numpy()


class WorldSample(NamedTuple):
    """One item: image (uint8 HWC array, or float CHW tensor in [-1, 1]), caption, scene."""

    image: np.ndarray | torch.Tensor
    caption: str
    scene: Scene


class WorldDataset(torch.utils.data.Dataset):
    """``length`` captioned images; item ``i`` depends only on ``(seed, i)``.

    Item ``i`` draws, from ``numpy.random.default_rng([seed, i])``, a training
    scene (:func:`sample_training_scene`, never a held-out one) and then its
    caption: :func:`sample_caption` (full or partial) when ``partial_captions``,
    else the full caption. ``as_tensor`` makes ``__getitem__`` return the image
    as a float ``(3, 64, 64)`` tensor in [-1, 1] instead of uint8 ``(64, 64, 3)``.
    Use :func:`collate` as a DataLoader's ``collate_fn``.
    """

    def __init__(self, seed: int, length: int, partial_captions: bool = True, as_tensor: bool = False) -> None:
        if int(seed) < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        if int(length) < 0:
            raise ValueError(f"length must be non-negative, got {length}")
        self.seed, self.length = int(seed), int(length)
        self.partial_captions, self.as_tensor = partial_captions, as_tensor

    def __len__(self) -> int:
        return self.length

    def scene_and_caption(self, i: int) -> tuple[Scene, str]:
        """Item ``i``'s scene and caption, without rendering."""
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} out of range for a dataset of {self.length}")
        i %= self.length
        rng = np.random.default_rng([self.seed, i])
        scene = sample_training_scene(rng)
        text = sample_caption(scene, rng) if self.partial_captions else caption(scene)
        return scene, text

    def sample(self, i: int) -> WorldSample:
        """Item ``i`` with a uint8 ``(64, 64, 3)`` image, whatever ``as_tensor`` says."""
        scene, text = self.scene_and_caption(i)
        return WorldSample(render(scene), text, scene)

    def __getitem__(self, i: int) -> WorldSample:
        item = self.sample(i)
        return item._replace(image=image_to_tensor(item.image)) if self.as_tensor else item

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, list[str]]:
        """Images ``(B, 3, 64, 64)`` float in [-1, 1] and captions for ``indices``."""
        return collate([self.sample(i) for i in indices])


def collate(samples: Sequence[WorldSample]) -> tuple[torch.Tensor, list[str]]:
    """Stack samples into ``(B, 3, 64, 64)`` float images in [-1, 1] and a caption list (scenes dropped)."""
    images = [s.image if isinstance(s.image, torch.Tensor) else image_to_tensor(s.image) for s in samples]
    return torch.stack(images), [s.caption for s in samples]
