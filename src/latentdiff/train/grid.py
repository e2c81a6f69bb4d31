"""Image grids written as PNG files (sample previews of the trainers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

from ..checkpoints.io import atomic_path


def image_grid(images: Tensor, nrow: int, padding: int = 2) -> Image.Image:
    """Images (N, 3, H, W) in [-1, 1] -> one RGB image, ``nrow`` images per row, white gaps."""
    images = images.detach().float().cpu().clamp(-1, 1)
    n, _, h, w = images.shape
    ncol = max(1, nrow)
    rows = (n + ncol - 1) // ncol
    canvas = torch.ones(3, rows * (h + padding) + padding, ncol * (w + padding) + padding)
    for i in range(n):
        r, c = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        canvas[:, top : top + h, left : left + w] = (images[i] + 1) / 2
    array = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # (H, W, 3)
    return Image.fromarray(array)


def save_grid(images: Tensor, path: str | Path, nrow: int, text: dict[str, str] | None = None) -> Path:
    """Write ``image_grid(images, nrow)`` to ``path`` atomically, with optional PNG text chunks."""
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    path = Path(path)
    with atomic_path(path) as tmp:
        image_grid(images, nrow).save(tmp, format="PNG", pnginfo=info)
    return path
