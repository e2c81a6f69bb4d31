"""PNG files that remember how they were made (AUTOMATIC1111's ``parameters`` text chunk).

    a photo of a cat
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x512, Model: v1-5

Web UIs and image viewers that understand A1111 metadata read it back from the file.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .checkpoints.io import atomic_path


def save_png(image: Image.Image, path: str | Path, parameters: str | None = None) -> None:
    """Write ``image`` as PNG with a ``parameters`` text chunk (from the argument or ``image.info``), atomically."""
    text = parameters if parameters is not None else image.info.get("parameters")
    info = PngInfo()
    if text:
        info.add_text("parameters", text)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def read_parameters(path: str | Path) -> str | None:
    """The ``parameters`` text of a PNG file, or None."""
    with Image.open(path) as image:
        return image.info.get("parameters")
