"""Rasterise a :class:`~latentdiff.world.spec.Scene` into a 64 x 64 RGB uint8 image.

Rasterisation rules (hard edges, one flat colour per object, no anti-aliasing).
Pixel ``(i, j)`` (column ``i``, row ``j``) covers the unit square
``[i, i + 1) x [j, j + 1)``; its centre is ``(i + 0.5, j + 0.5)``. Each object
is drawn inside its ``S x S`` pixel box (see :attr:`WorldObject.box`), whose
centre ``(cx, cy)`` is a whole pixel corner because ``S`` is even:

* **square**: every pixel of the box (fill ratio 1.0).
* **circle**: the pixels whose *centre* lies in the closed disc of diameter
  ``S`` centred on the box centre. The disc touches all four box sides, so the
  drawn bounding box is exactly ``S x S``; fill ratio 0.80 (S = 10) and 0.79
  (S = 20), in the judge's circle band [0.66, 0.88].
* **triangle**: apex at the top middle of the box, base along its bottom; the
  pixels whose unit square *overlaps the interior* of the triangle. Row ``r``
  (0 at the top) is thus a centred run of ``2 * (r // 2 + 1)`` pixels: 2 at the
  apex, ``S`` at the base, so the drawn box is exactly ``S x S``; fill ratio 0.60
  (S = 10) and 0.55 (S = 20), under the judge's 0.66.

Why two rules: the centre rule would leave a triangle's top row empty (the apex
falls on a pixel corner, and no pixel centre of row 0 is inside the 0.5 px-wide
tip), making it ``S - 1`` tall; the overlap rule would grow a small disc to fill
ratio 0.88, on the circle/square threshold. Objects are drawn in scene order;
they never overlap (a :class:`Scene` keeps their boxes apart).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .spec import CANVAS, PALETTE, SHAPES, Scene


@lru_cache(maxsize=None)
def shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean ``(side, side)`` mask of a shape inside its box, per the rules above (read-only)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")
    if side <= 0 or side % 2:
        raise ValueError(f"side must be a positive even number of pixels, got {side}")
    k = np.arange(side)
    if shape == "square":
        mask = np.ones((side, side), dtype=bool)
    elif shape == "circle":
        # Doubled coordinates keep everything integral: pixel centre offset 2u = 2k + 1 - S.
        u = 2 * k + 1 - side
        mask = u[None, :] ** 2 + u[:, None] ** 2 <= side * side
    else:
        # Interior at depth y (from the apex): S/2 - y/2 < x < S/2 + y/2. The row r pixel square
        # [k, k+1] x [r, r+1] overlaps it when the run at y = r + 1 overlaps (k, k + 1);
        # doubled: 2k < S + r + 1 and 2k + 2 > S - r - 1.
        r = k[:, None]
        mask = (2 * k[None, :] < side + r + 1) & (2 * k[None, :] + 2 > side - r - 1)
    mask.setflags(write=False)
    return mask


def render(scene: Scene) -> np.ndarray:
    """Draw ``scene``: a ``(64, 64, 3)`` uint8 RGB array, row 0 at the top."""
    if not isinstance(scene, Scene):
        raise TypeError(f"render expects a Scene, got {type(scene).__name__}")
    image = np.empty((CANVAS, CANVAS, 3), dtype=np.uint8)
    image[:] = PALETTE[scene.background]
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        patch = image[y0:y1, x0:x1]
        patch[shape_mask(obj.shape, obj.side)] = PALETTE[obj.colour]
    return image
