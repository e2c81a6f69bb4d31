"""The caption language of Shapes World: write, parse, and sample captions and scenes.

Grammar (the Shapes World specification), words separated by single spaces::

    caption := object [" and " object] [" on a " BG " background"]
    object  := "a " [SIZE " "] COLOR " " SHAPE [" " POSITION]

``SIZE`` is ``small``/``large``, ``COLOR`` an object colour, ``SHAPE`` a shape,
``POSITION`` one of the nine cell phrases, ``BG`` a background colour. The
article is always ``a`` (``a orange circle``), as the grammar fixes it.
Size and position may be left out per object, the background per caption.
Captions are exactly the strings :func:`caption` writes: lower case, no
punctuation, no extra spaces. :func:`parse_caption` accepts every such string
that describes a possible scene (two objects never share a (colour, shape)
pair or a named cell) and raises ``ValueError`` naming the problem otherwise.
The grammar is unambiguous, so a caption string determines which attributes it
names.

Randomness is explicit: every sampler takes a ``numpy.random.Generator``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .spec import (
    BACKGROUND_COLOURS,
    CELL_PHRASES,
    CELLS,
    MAX_OBJECTS,
    OBJECT_COLOURS,
    SHAPES,
    SIZES,
    Cell,
    Scene,
    WorldObject,
    allowed_jitter,
    boxes_apart,
)

PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in OBJECT_COLOURS for s in SHAPES)
"""Every (colour, shape) pair, in palette then shape order."""

_PHRASE_WORDS: dict[tuple[str, ...], Cell] = {tuple(p.split(" ")): cell for cell, p in CELL_PHRASES.items()}

FULL_CAPTION_PROBABILITY: float = 0.5
""":func:`sample_caption` returns the full caption with this probability."""


@dataclass(frozen=True)
class ObjectSpec:
    """What a caption says about one object; ``None`` for an attribute it leaves out."""

    colour: str
    shape: str
    size: str | None = None
    cell: Cell | None = None

    def __post_init__(self) -> None:
        if self.colour not in OBJECT_COLOURS:
            raise ValueError(f"unknown object colour {self.colour!r}; expected one of {list(OBJECT_COLOURS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {list(SHAPES)}")
        if self.size is not None and self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {list(SIZES)} or None")
        if self.cell is not None:
            object.__setattr__(self, "cell", tuple(int(v) for v in self.cell))
            if self.cell not in CELL_PHRASES:
                raise ValueError(f"cell {self.cell} is not a (row, col) pair in 0..2")

    @property
    def text(self) -> str:
        """``a [SIZE] COLOR SHAPE [POSITION]``."""
        words = ["a"]
        if self.size is not None:
            words.append(self.size)
        words += [self.colour, self.shape]
        if self.cell is not None:
            words.append(CELL_PHRASES[self.cell])
        return " ".join(words)

    def describes(self, obj: WorldObject) -> bool:
        """True when every attribute this spec names agrees with ``obj``."""
        return (
            (self.colour, self.shape) == (obj.colour, obj.shape)
            and self.size in (None, obj.size)
            and self.cell in (None, obj.cell)
        )


@dataclass(frozen=True)
class CaptionSpec:
    """A parsed caption: its objects in caption order and the background (``None`` if unnamed)."""

    objects: tuple[ObjectSpec, ...]
    background: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"a caption names 1 to {MAX_OBJECTS} objects, got {len(self.objects)}")
        if self.background is not None and self.background not in BACKGROUND_COLOURS:
            raise ValueError(
                f"unknown background colour {self.background!r}; expected one of {list(BACKGROUND_COLOURS)} or None"
            )
        for i, a in enumerate(self.objects):
            if not isinstance(a, ObjectSpec):
                raise ValueError(f"caption object {i} is a {type(a).__name__}, not an ObjectSpec")
            for b in self.objects[:i]:
                if (a.colour, a.shape) == (b.colour, b.shape):
                    raise ValueError(f"two objects are both {a.colour} {a.shape}s; a scene never repeats a pair")
                if a.cell is not None and a.cell == b.cell:
                    raise ValueError(f"two objects are both {CELL_PHRASES[a.cell]}; a scene never shares a cell")

    @property
    def text(self) -> str:
        """The caption string."""
        text = " and ".join(o.text for o in self.objects)
        if self.background is not None:
            text += f" on a {self.background} background"
        return text

    def __str__(self) -> str:
        return self.text

    @property
    def is_full(self) -> bool:
        """True when every object's size and position and the background are named."""
        return self.background is not None and all(o.size is not None and o.cell is not None for o in self.objects)

    def describes(self, scene: Scene) -> bool:
        """True when ``scene`` has these objects, in this order, and every named attribute agrees."""
        return (
            len(scene.objects) == len(self.objects)
            and all(s.describes(o) for s, o in zip(self.objects, scene.objects))
            and self.background in (None, scene.background)
        )


def _per_object(flag: bool | Sequence[bool], n: int, name: str) -> list[bool]:
    if isinstance(flag, (bool, np.bool_)):
        return [bool(flag)] * n
    flags = [bool(f) for f in flag]
    if len(flags) != n:
        raise ValueError(f"{name} has {len(flags)} entries for a scene of {n} objects")
    return flags


def caption_spec(
    scene: Scene,
    show_size: bool | Sequence[bool] = True,
    show_position: bool | Sequence[bool] = True,
    show_background: bool = True,
) -> CaptionSpec:
    """The :class:`CaptionSpec` of ``scene`` naming the chosen attributes.

    ``show_size`` and ``show_position`` are one flag for all objects or one per object.
    """
    n = len(scene.objects)
    sizes = _per_object(show_size, n, "show_size")
    positions = _per_object(show_position, n, "show_position")
    objects = tuple(
        ObjectSpec(o.colour, o.shape, o.size if s else None, o.cell if p else None)
        for o, s, p in zip(scene.objects, sizes, positions)
    )
    return CaptionSpec(objects, scene.background if show_background else None)


def caption(
    scene: Scene,
    show_size: bool | Sequence[bool] = True,
    show_position: bool | Sequence[bool] = True,
    show_background: bool = True,
) -> str:
    """Caption of ``scene``; all flags true (the default) gives the full caption."""
    return caption_spec(scene, show_size, show_position, show_background).text


# ----------------------------------------------------------------------------- parsing


def parse_caption(text: str) -> CaptionSpec:
    """Parse a caption string into a :class:`CaptionSpec`; ``ValueError`` says what is wrong."""
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}")
    if not text:
        raise ValueError("empty caption")
    if text != text.strip() or "  " in text or any(c in text for c in "\t\n\r"):
        raise ValueError(f"caption {text!r} must be words separated by single spaces, no leading/trailing space")
    words = text.split(" ")
    hint = " (captions are lower case)" if text != text.lower() else ""

    def fail(i: int, expected: str) -> ValueError:
        got = f"got {words[i]!r}" if i < len(words) else "got the end of the caption"
        return ValueError(f"caption {text!r}: expected {expected} at word {i + 1}, {got}{hint}")

    def one_of(names: Sequence[str]) -> str:
        return "one of " + "/".join(names)

    objects: list[ObjectSpec] = []
    background: str | None = None
    i = 0
    while True:
        if i >= len(words) or words[i] != "a":
            raise fail(i, "'a'" + (" (the grammar always uses 'a', also before 'orange')" if i < len(words)
                                   and words[i] == "an" else ""))
        i += 1
        size = None
        if i < len(words) and words[i] in SIZES:
            size = words[i]
            i += 1
        if i >= len(words) or words[i] not in OBJECT_COLOURS:
            raise fail(i, ("a size or " if size is None else "") + "an object colour, " + one_of(list(OBJECT_COLOURS)))
        colour = words[i]
        i += 1
        if i >= len(words) or words[i] not in SHAPES:
            raise fail(i, "a shape, " + one_of(SHAPES))
        shape = words[i]
        i += 1
        cell = None
        for phrase, phrase_cell in _PHRASE_WORDS.items():
            if tuple(words[i : i + len(phrase)]) == phrase:
                cell = phrase_cell
                i += len(phrase)
                break
        objects.append(ObjectSpec(colour, shape, size, cell))
        if i == len(words):
            break
        if words[i] == "and":
            if len(objects) == MAX_OBJECTS:
                raise ValueError(f"caption {text!r}: a caption names at most {MAX_OBJECTS} objects")
            i += 1
            continue
        if words[i : i + 2] == ["on", "a"]:
            i += 2
            if i >= len(words) or words[i] not in BACKGROUND_COLOURS:
                raise fail(i, "a background colour, " + one_of(list(BACKGROUND_COLOURS)))
            background = words[i]
            i += 1
            if i >= len(words) or words[i] != "background":
                raise fail(i, "'background'")
            i += 1
            if i != len(words):
                raise fail(i, "the end of the caption after the background")
            break
        expected = "'and a', 'on a ... background' or the end"
        if cell is None:
            expected = "a position phrase, " + expected
        raise fail(i, expected)
    try:
        return CaptionSpec(tuple(objects), background)
    except ValueError as e:
        raise ValueError(f"caption {text!r}: {e}") from None


# ---------------------------------------------------------------------------- sampling


def _place(rng: np.random.Generator, parts: Sequence[tuple[str, str, str, Cell]], background: str) -> Scene:
    """Draw jitter for (colour, shape, size, cell) objects until their boxes are apart."""
    while True:
        objects = []
        for colour, shape, size, cell in parts:
            xs, ys = allowed_jitter(size, cell)
            dx = int(rng.integers(xs.start, xs.stop))
            dy = int(rng.integers(ys.start, ys.stop))
            objects.append(WorldObject(colour, shape, size, cell, (dx, dy)))
        if all(boxes_apart(a.box, b.box) for i, a in enumerate(objects) for b in objects[:i]):
            return Scene(tuple(objects), background)


def sample_scene(rng: np.random.Generator) -> Scene:
    """A uniformly random scene.

    1 or 2 objects (equally likely); distinct (colour, shape) pairs and distinct
    cells drawn uniformly without replacement; size, background uniform; jitter
    uniform over :func:`~latentdiff.world.spec.allowed_jitter`, redrawn (rarely)
    until the boxes are apart.
    """
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    pairs = rng.choice(len(PAIRS), size=n, replace=False)
    cells = rng.choice(len(CELLS), size=n, replace=False)
    sizes = rng.integers(0, len(SIZES), size=n)
    background = list(BACKGROUND_COLOURS)[int(rng.integers(0, len(BACKGROUND_COLOURS)))]
    size_names = list(SIZES)
    parts = [(*PAIRS[p], size_names[s], CELLS[c]) for p, s, c in zip(pairs, sizes, cells)]
    return _place(rng, parts, background)


def sample_caption_spec(scene: Scene, rng: np.random.Generator) -> CaptionSpec:
    """A full or partial caption of ``scene`` (see :func:`sample_caption`)."""
    if rng.random() < FULL_CAPTION_PROBABILITY:
        return caption_spec(scene)
    n = len(scene.objects)
    while True:  # slots: size and position of each object, then the background
        drop = rng.random(2 * n + 1) < 0.5
        if drop.any():
            break
    return caption_spec(scene, list(~drop[0 : 2 * n : 2]), list(~drop[1 : 2 * n : 2]), not drop[-1])


def sample_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A training caption of ``scene``.

    With probability 1/2 the full caption. Otherwise a partial one: each optional
    slot (every object's size, every object's position, the background) is left
    out independently with probability 1/2, redrawn if none was left out, so the
    left-out set is uniform over the non-empty subsets of slots.
    """
    return sample_caption_spec(scene, rng).text


def scene_from_caption(spec: CaptionSpec | str, rng: np.random.Generator) -> Scene:
    """A random scene that the caption describes: unnamed size, cell, background and jitter drawn uniformly.

    Objects keep the caption's order; an unnamed cell is drawn from the cells no
    other object names or has taken.
    """
    if isinstance(spec, str):
        spec = parse_caption(spec)
    taken = {o.cell for o in spec.objects if o.cell is not None}
    size_names = list(SIZES)
    parts = []
    for o in spec.objects:
        size = o.size if o.size is not None else size_names[int(rng.integers(0, len(size_names)))]
        cell = o.cell
        if cell is None:
            free = [c for c in CELLS if c not in taken]
            cell = free[int(rng.integers(0, len(free)))]
            taken.add(cell)
        parts.append((o.colour, o.shape, size, cell))
    background = spec.background
    if background is None:
        names = list(BACKGROUND_COLOURS)
        background = names[int(rng.integers(0, len(names)))]
    return _place(rng, parts, background)
