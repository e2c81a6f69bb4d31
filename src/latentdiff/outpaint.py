"""Outpainting: a larger canvas around an image, the new area painted to continue it.

1. The canvas: the image with ``left``/``right``/``top``/``bottom`` pixels added, the new area
   filled as A1111's fill modes: ``"edge"`` stretches the border pixels outward, ``"noise"``
   is uniform colour noise (drawn from the first image's seed).  The fill is what img2img
   starts from at ``strength < 1``; at the default strength 1 the new area starts from noise.
2. The mask: the new area, feathered ``feather`` pixels into the old edge (a linear ramp,
   weight ``(feather - d) / (feather + 1)`` for an old pixel ``d`` pixels from the new area),
   so that the seam is painted too.
3. Inpainting of the new area and the band (:func:`latentdiff.generate.inpaint`), then the
   result composited over the canvas with the feathered mask: every old pixel outside the
   band is kept exactly, the band blends into the painted pixels, the new area is painted.
   ``feather=0`` keeps every old pixel exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from . import generate
from .errors import BadArgument
from .settings import Settings

if TYPE_CHECKING:
    from .pipeline import Pipeline

FILL_MODES = ("edge", "noise")
MAX_EXTENSION = 8192  # pixels per side


@dataclass(frozen=True)
class Extension:
    """Pixels added on each side, how the new area is filled, and the feather width."""

    left: int = 0
    right: int = 0
    top: int = 0
    bottom: int = 0
    fill: str = "edge"
    feather: int = 8

    def canvas_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return size[0] + self.left + self.right, size[1] + self.top + self.bottom

    def infotext(self) -> str:
        return (f"Outpaint: \"left {self.left}, right {self.right}, top {self.top}, bottom {self.bottom}\", "
                f"Outpaint fill: {self.fill}, Outpaint feather: {self.feather}")


def check_extension(extension: Extension, size: tuple[int, int], factor: int) -> Extension:
    """Name the bad field: sides are whole pixels in [0, 8192] (one at least), the canvas a multiple
    of the VAE factor, the feather in [0, the old image's smaller side / 2]."""
    for name in ("left", "right", "top", "bottom", "feather"):
        value = getattr(extension, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_EXTENSION:
            raise BadArgument(f"{name} must be a whole number of pixels in [0, {MAX_EXTENSION}], got {value!r}")
    if not (extension.left or extension.right or extension.top or extension.bottom):
        raise BadArgument("outpainting needs at least one of left, right, top, bottom above 0")
    if extension.fill not in FILL_MODES:
        raise BadArgument(f"fill must be one of {', '.join(FILL_MODES)}, got {extension.fill!r}")
    width, height = extension.canvas_size(size)
    for side, total, a, b in (("width", width, "left", "right"), ("height", height, "top", "bottom")):
        if total % factor:
            short = factor - total % factor
            raise BadArgument(f"the outpainted {side} {total} is not a multiple of the VAE factor {factor}: "
                              f"add {short} more pixels to {a} or {b}")
    if extension.feather > min(size) // 2:
        raise BadArgument(f"feather {extension.feather} is over half the image's smaller side ({min(size)} px)")
    return extension


def extend_canvas(image: Image.Image, extension: Extension, seed: int) -> Image.Image:
    """The RGB canvas: ``image`` in place, the new area filled (edge-stretched or noise)."""
    old = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
    pad = ((extension.top, extension.bottom), (extension.left, extension.right), (0, 0))
    canvas = np.pad(old, pad, mode="edge")
    if extension.fill == "noise":
        noise = np.random.default_rng(seed).integers(0, 256, canvas.shape, dtype=np.uint8)
        new = np.ones(canvas.shape[:2], bool)
        new[extension.top:extension.top + old.shape[0], extension.left:extension.left + old.shape[1]] = False
        canvas[new] = noise[new]
    return Image.fromarray(canvas)


def _depth(coord: np.ndarray, before: int, length: int, after: int) -> np.ndarray:
    """Along one axis: how many old pixels lie between each position and the new area on an
    extended side (-1 on the new area; a large number when neither side is extended)."""
    inside = coord - before  # 0 .. length-1 over the old image
    depth = np.full(coord.shape, MAX_EXTENSION * 4, dtype=np.int64)
    if before:
        depth = np.minimum(depth, inside)
    if after:
        depth = np.minimum(depth, length - 1 - inside)
    return np.where((inside < 0) | (inside >= length), -1, depth)


def feathered_mask(size: tuple[int, int], extension: Extension) -> Image.Image:
    """L image of the canvas: 255 over the new area, a ramp over ``feather`` old pixels, 0 inside."""
    width, height = size  # the old image's
    canvas_w, canvas_h = extension.canvas_size(size)
    dx = _depth(np.arange(canvas_w), extension.left, width, extension.right)[None, :]  # (1, W')
    dy = _depth(np.arange(canvas_h), extension.top, height, extension.bottom)[:, None]  # (H', 1)
    depth = np.where((dx < 0) | (dy < 0), -1, np.minimum(dx, dy))  # (H', W')
    weight = np.where(depth < 0, 1.0, np.clip((extension.feather - depth) / (extension.feather + 1), 0.0, 1.0))
    return Image.fromarray(np.round(weight * 255).astype(np.uint8))


def outpaint(pipe: Pipeline, settings: Settings, image: Image.Image, extension: Extension,
             callback: generate.StepCallback | None = None) -> list[Image.Image]:
    """Extend, inpaint and composite (see the module's text); ``settings`` are for the canvas size."""
    canvas = extend_canvas(image, extension, settings.seeds[0])
    feather = feathered_mask(image.size, extension)
    repaint = feather.point(lambda v: 255 if v else 0)  # the new area and the band
    painted = generate.inpaint(pipe, dataclasses.replace(settings, output_type="pil"), canvas, repaint, callback,
                               paste_back=False)
    out = []
    for one in painted:
        merged = Image.composite(one, canvas, feather)  # mask 0: the canvas's pixel exactly
        merged.info["parameters"] = f"{one.info['parameters']}, {extension.infotext()}"
        out.append(merged)
    return out
