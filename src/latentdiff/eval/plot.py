"""Plots and image grids drawn with PIL (no matplotlib in the package).

:func:`line_plot` draws the seed paper's figure: FD against CLIP score as the guidance
scale sweeps, one line per sampler setting, each point labelled with its guidance
scale. :func:`image_grid` lays out generated images in rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from .vae_demo import font

# Tableau 10: distinct colours for up to ten lines, then they repeat.
COLOURS = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]


@dataclass
class Series:
    """One line: points (x, y) joined in the given order, each with an optional text label."""

    name: str
    x: Sequence[float]
    y: Sequence[float]
    labels: Sequence[str] = field(default_factory=list)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (steps of 1, 2 or 5 times a power of ten) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    k = 0
    while first + k * step <= hi + 1e-9 * step:
        ticks.append(round(first + k * step, 12))
        k += 1
    return ticks


def _format_tick(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 0
    return f"{value:.{decimals}f}"


def _range(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.08 if hi > lo else max(abs(lo) * 0.05, 0.5)
    return lo - pad, hi + pad


def line_plot(
    series: Sequence[Series],
    title: str,
    x_label: str,
    y_label: str,
    size: tuple[int, int] = (800, 560),
) -> Image.Image:
    """A line plot with axes, round ticks, a grid, point labels and a legend, as an RGB image.

    Points that are NaN or infinite are left out (the rest of their line is still drawn).
    """
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    small, normal = font(12), font(15)
    left, right, top, bottom = 80, 24, 48, 60
    plot_w, plot_h = width - left - right, height - top - bottom

    points = [[(float(x), float(y)) for x, y in zip(s.x, s.y) if math.isfinite(x) and math.isfinite(y)]
              for s in series]
    xs = [p[0] for line in points for p in line]
    ys = [p[1] for line in points for p in line]
    draw.text((width / 2, 14), title, fill="black", font=normal, anchor="mt")
    if not xs:
        draw.text((width / 2, height / 2), "no finite values to plot", fill="gray", font=normal, anchor="mm")
        return image
    x_lo, x_hi = _range(xs)
    y_lo, y_hi = _range(ys)

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_lo) / (x_hi - x_lo) * plot_w, top + (1 - (y - y_lo) / (y_hi - y_lo)) * plot_h)

    # grid, ticks and tick labels
    for axis, (lo, hi) in (("x", (x_lo, x_hi)), ("y", (y_lo, y_hi))):
        ticks = nice_ticks(lo, hi)
        step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
        for t in ticks:
            if axis == "x":
                px, _ = to_px(t, y_lo)
                draw.line([(px, top), (px, top + plot_h)], fill=(232, 232, 232))
                draw.line([(px, top + plot_h), (px, top + plot_h + 5)], fill="black")
                draw.text((px, top + plot_h + 8), _format_tick(t, step), fill="black", font=small, anchor="mt")
            else:
                _, py = to_px(x_lo, t)
                draw.line([(left, py), (left + plot_w, py)], fill=(232, 232, 232))
                draw.line([(left - 5, py), (left, py)], fill="black")
                draw.text((left - 8, py), _format_tick(t, step), fill="black", font=small, anchor="rm")
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    draw.text((left + plot_w / 2, height - 18), x_label, fill="black", font=normal, anchor="mm")
    label_box = Image.new("RGBA", (plot_h, 24), (255, 255, 255, 0))
    ImageDraw.Draw(label_box).text((plot_h / 2, 12), y_label, fill="black", font=normal, anchor="mm")
    rotated = label_box.rotate(90, expand=True)
    image.paste(rotated, (10, top), rotated)

    # lines, points, point labels
    for k, (s, line) in enumerate(zip(series, points)):
        colour = COLOURS[k % len(COLOURS)]
        pixels = [to_px(x, y) for x, y in line]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        finite_labels = [lab for lab, x, y in zip(list(s.labels) + [""] * len(s.x), s.x, s.y)
                         if math.isfinite(x) and math.isfinite(y)]
        for (px, py), label in zip(pixels, finite_labels):
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour, outline="black")
            if label:
                draw.text((px + 7, py - 7), label, fill=colour, font=small, anchor="lb")

    # legend: the inside corner that covers the fewest points (and their labels)
    names = [s.name for s in series]
    if names:
        line_h = 18
        text_w = max(draw.textlength(n, font=small) for n in names)
        box_w, box_h = text_w + 40, line_h * len(names) + 8
        corners = [(left + plot_w - box_w - 8, top + 8), (left + 8, top + 8),
                   (left + plot_w - box_w - 8, top + plot_h - box_h - 8), (left + 8, top + plot_h - box_h - 8)]
        placed = [to_px(x, y) for line in points for x, y in line]

        def covered(corner: tuple[float, float]) -> int:
            cx, cy = corner
            return sum(cx - 12 <= px <= cx + box_w + 12 and cy - 12 <= py <= cy + box_h + 20 for px, py in placed)

        x0, y0 = min(corners, key=covered)  # ties keep the earlier corner (top right first)
        draw.rectangle([x0, y0, x0 + box_w, y0 + box_h], fill="white", outline=(160, 160, 160))
        for k, name in enumerate(names):
            colour = COLOURS[k % len(COLOURS)]
            cy = y0 + 4 + line_h * k + line_h / 2
            draw.line([(x0 + 6, cy), (x0 + 26, cy)], fill=colour, width=2)
            draw.ellipse([x0 + 13, cy - 3, x0 + 19, cy + 3], fill=colour)
            draw.text((x0 + 32, cy), name, fill="black", font=small, anchor="lm")
    return image


def image_grid(
    rows: Sequence[Sequence[Image.Image | np.ndarray]],
    title: str = "",
    min_cell: int = 64,
    gap: int = 2,
) -> Image.Image:
    """Images in rows (a row per prompt), each cell at least ``min_cell`` px (nearest-neighbour
    upscaling by an integer factor for small images), ``title`` in a strip on top."""
    pictures = [[im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im)) for im in row] for row in rows]
    cells = [im for row in pictures for im in row]
    if not cells:
        raise ValueError("no images for the grid")
    cw = max(im.width for im in cells)
    ch = max(im.height for im in cells)
    scale = max(1, math.ceil(min_cell / max(1, min(cw, ch))))
    cw, ch = cw * scale, ch * scale
    columns = max(len(row) for row in pictures)
    strip = 22 if title else 0
    title_font = font(13)
    title_w = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title, font=title_font)) + 2 * gap + 4 if title else 0
    width = max(columns * cw + (columns + 1) * gap, title_w)
    grid = Image.new("RGB", (width, strip + len(pictures) * ch + (len(pictures) + 1) * gap), "white")
    if title:
        ImageDraw.Draw(grid).text((gap + 2, 4), title, fill="black", font=title_font)
    for r, row in enumerate(pictures):
        for c, im in enumerate(row):
            im = im.convert("RGB")
            if scale > 1:
                im = im.resize((im.width * scale, im.height * scale), resample=Image.NEAREST)
            grid.paste(im, (gap + c * (cw + gap), strip + gap + r * (ch + gap)))
    return grid
