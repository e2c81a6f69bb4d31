"""Shapes World v1: the constants of the world and the scene it draws.

This module is the single source of truth for everything that
the Shapes World specification fixes: canvas, palette, shapes, sizes, the
3 x 3 grid and its phrases, the judge's thresholds. Renderer, captions, judge
and dataset all read them from here.

Where the specification is silent, the choices are:

* **Bounding box.** An object of size ``S`` (even) whose cell centre rounds to
  pixel ``(cx, cy)`` and whose jitter is ``(dx, dy)`` occupies the pixel box
  ``x0 = cx + dx - S/2 .. x1 = x0 + S`` (``x1`` exclusive), likewise in y. Pixel
  ``i`` covers the continuous interval ``[i, i + 1)``, so the box's centre is
  exactly ``(cx + dx, cy + dy)``.
* **Inside the canvas.** Jitter is at most 2 px in x and in y, and further
  limited so that the box stays inside the canvas: a large object in an edge
  cell may move only 1 px towards that edge (a clipped shape would no longer
  be the shape the caption names). :func:`allowed_jitter` gives the range.
* **Apart.** The bounding boxes of two objects are at least one pixel apart.
  Two large objects in neighbouring cells could otherwise overlap by up to
  3 px with jitter, hiding part of one shape, and two touching objects of one
  colour would merge into a single 4-connected component.

:class:`Scene` enforces all of these, so every ``Scene`` can be rendered and
judged back.
"""

from __future__ import annotations

from dataclasses import dataclass

RGB = tuple[int, int, int]
Cell = tuple[int, int]

CANVAS: int = 64
"""Image side in pixels (images are CANVAS x CANVAS RGB uint8)."""

GRID: int = 3
"""Cells per side of the position grid; a cell is CANVAS / GRID px wide."""

OBJECT_COLOURS: dict[str, RGB] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
}
BACKGROUND_COLOURS: dict[str, RGB] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
PALETTE: dict[str, RGB] = {**OBJECT_COLOURS, **BACKGROUND_COLOURS}
"""Every colour the judge classifies pixels into, object colours first."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, int] = {"small": 10, "large": 20}
"""Size name -> side ``S`` of the object's bounding box in pixels."""

CELLS: tuple[Cell, ...] = tuple((row, col) for row in range(GRID) for col in range(GRID))
CELL_PHRASES: dict[Cell, str] = {
    (0, 0): "in the top left",
    (0, 1): "at the top",
    (0, 2): "in the top right",
    (1, 0): "on the left",
    (1, 1): "in the center",
    (1, 2): "on the right",
    (2, 0): "in the bottom left",
    (2, 1): "at the bottom",
    (2, 2): "in the bottom right",
}
MAX_OBJECTS: int = 2
MAX_JITTER: int = 2

# Judging rules.
MIN_OBJECT_AREA: int = 25
"""A component of one object colour is an object when it has at least this many pixels."""
SMALL_MAX_SIDE: int = 15
"""An object is small when the larger side of its bounding box is under this many pixels."""
SQUARE_MIN_FILL: float = 0.88
"""Fill ratio above this: square."""
TRIANGLE_MAX_FILL: float = 0.66
"""Fill ratio below this: triangle; from TRIANGLE_MAX_FILL to SQUARE_MIN_FILL: circle."""


def cell_centre(cell: Cell) -> tuple[int, int]:
    """Pixel ``(x, y)`` of a cell's centre ``((col + 0.5) * 64/3, (row + 0.5) * 64/3)``, rounded."""
    row, col = cell
    # (2k + 1) * CANVAS / (2 * GRID), rounded half up in exact integer arithmetic (no ties occur).
    def centre(k: int) -> int:
        return ((2 * k + 1) * CANVAS + GRID) // (2 * GRID)

    return centre(col), centre(row)


def allowed_jitter(size: str, cell: Cell) -> tuple[range, range]:
    """Jitter values ``(dx range, dy range)`` that keep the object's box inside the canvas."""
    half = SIZES[size] // 2
    cx, cy = cell_centre(cell)

    def span(c: int) -> range:
        lo = max(-MAX_JITTER, half - c)
        hi = min(MAX_JITTER, CANVAS - half - c)
        return range(lo, hi + 1)

    return span(cx), span(cy)


@dataclass(frozen=True)
class WorldObject:
    """One object: colour name, shape name, size name, cell ``(row, col)``, jitter ``(dx, dy)`` px."""

    colour: str
    shape: str
    size: str
    cell: Cell
    jitter: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cell", tuple(int(v) for v in self.cell))
        object.__setattr__(self, "jitter", tuple(int(v) for v in self.jitter))
        if self.colour not in OBJECT_COLOURS:
            raise ValueError(f"unknown object colour {self.colour!r}; expected one of {list(OBJECT_COLOURS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {list(SHAPES)}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {list(SIZES)}")
        if self.cell not in CELL_PHRASES:
            raise ValueError(f"cell {self.cell} is not a (row, col) pair in 0..{GRID - 1}")
        if len(self.jitter) != 2:
            raise ValueError(f"jitter {self.jitter} is not a (dx, dy) pair")
        xs, ys = allowed_jitter(self.size, self.cell)
        if self.jitter[0] not in xs or self.jitter[1] not in ys:
            raise ValueError(
                f"jitter {self.jitter} of a {self.size} object in cell {self.cell} must lie in "
                f"dx {xs.start}..{xs.stop - 1}, dy {ys.start}..{ys.stop - 1} "
                f"(at most {MAX_JITTER} px, box inside the canvas)"
            )

    @property
    def side(self) -> int:
        """Side ``S`` of the bounding box in pixels."""
        return SIZES[self.size]

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Pixel bounding box ``(x0, y0, x1, y1)``, ``x1``/``y1`` exclusive."""
        cx, cy = cell_centre(self.cell)
        x0 = cx + self.jitter[0] - self.side // 2
        y0 = cy + self.jitter[1] - self.side // 2
        return x0, y0, x0 + self.side, y0 + self.side


def boxes_apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """True when boxes ``(x0, y0, x1, y1)`` (exclusive ends) have at least one pixel between them."""
    return a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]


@dataclass(frozen=True)
class Scene:
    """A world image: 1 or 2 objects (listed in caption order) on a background colour."""

    objects: tuple[WorldObject, ...]
    background: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"a scene holds 1 to {MAX_OBJECTS} objects, got {len(self.objects)}")
        if self.background not in BACKGROUND_COLOURS:
            raise ValueError(
                f"unknown background colour {self.background!r}; expected one of {list(BACKGROUND_COLOURS)}"
            )
        for i, a in enumerate(self.objects):
            if not isinstance(a, WorldObject):
                raise ValueError(f"scene object {i} is a {type(a).__name__}, not a WorldObject")
            for b in self.objects[:i]:
                if a.cell == b.cell:
                    raise ValueError(f"two objects share cell {a.cell}")
                if (a.colour, a.shape) == (b.colour, b.shape):
                    raise ValueError(f"two objects are both {a.colour} {a.shape}s")
                if not boxes_apart(a.box, b.box):
                    raise ValueError(f"boxes {b.box} and {a.box} touch or overlap; change the jitter")
