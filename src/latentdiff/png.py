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


def parse_parameters(text: str) -> tuple[str, str]:
    """(prompt, negative prompt) of an A1111 ``parameters`` text (its last line holds the settings)."""
    lines = text.split("\n")
    body = lines[:-1] if lines[-1].startswith("Steps: ") else lines
    for i, line in enumerate(body):
        if line.startswith("Negative prompt: "):
            return "\n".join(body[:i]), "\n".join([line.removeprefix("Negative prompt: "), *body[i + 1:]])
    return "\n".join(body), ""
