"""The autoencoder demo: encode and decode one image, show what the VAE keeps and what it loses.

    latentdiff vae photo.jpg [--model M] [--size 256] [--out photo-vae.png]

The image is resized (shortest side to ``size``, Lanczos) and centre-cropped to
``size`` x ``size`` (a multiple of the VAE factor), encoded to the posterior's mode
(no sampling: the demo is deterministic), decoded, and written as three panels side by
side::

    original | reconstruction | |original - reconstruction| x 4

The difference panel is the per-channel absolute error amplified :data:`DIFF_GAIN` (4)
times and clipped to 255, so an error of 1/64 of the range shows as a quarter-bright
pixel: black means perfect reconstruction. PSNR (dB) and SSIM are computed between the
8-bit original and the 8-bit reconstruction (as saved in the panels, data range 255)
with :func:`latentdiff.eval.psnr` and :func:`latentdiff.eval.ssim`, printed by the CLI
and written under the panels.

Only the VAE is loaded: the ``vae/`` folder of a diffusers pipeline, a lone VAE folder
or file (:func:`latentdiff.load_component`), or the VAE part of an original
single-file SD checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..errors import BadArgument
from ..loading import load_vae
from ..models.taesd import Autoencoder
from .metrics import psnr, ssim

DIFF_GAIN = 4
"""The |difference| panel shows ``min(255, DIFF_GAIN * |original - reconstruction|)``."""

PANEL_GAP = 4  # white pixels between panels
TEXT_STRIP = 40  # height of the caption strip under the panels (two lines)


def font(size: int = 14) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's built-in font at ``size`` px (FreeType when Pillow has it, else the fixed bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError, ImportError):  # old Pillow or no FreeType
        return ImageFont.load_default()


def square_crop(image: Image.Image, size: int) -> Image.Image:
    """RGB ``size`` x ``size``: shortest side resized to ``size`` (Lanczos), then centre-cropped."""
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), resample=Image.LANCZOS)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


@torch.no_grad()
def reconstruct(vae: Autoencoder, image: Image.Image) -> Image.Image:
    """Encode (posterior mode) and decode an RGB image whose sides are multiples of the VAE factor."""
    param = next(vae.parameters())
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    x = x.permute(2, 0, 1)[None] * 2.0 - 1.0  # (1, 3, H, W) in [-1, 1]
    out = vae.decode(vae.encode(x.to(param.device, param.dtype)).mode()).float()  # (1, 3, H, W)
    array = ((out[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def difference_image(a: Image.Image, b: Image.Image, gain: int = DIFF_GAIN) -> Image.Image:
    """``min(255, gain * |a - b|)`` per channel, uint8 RGB."""
    diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)) * gain
    return Image.fromarray(np.clip(diff, 0, 255).astype(np.uint8))


@dataclass
class VAEDemo:
    """The demo's images and numbers; ``panel`` is what gets saved."""

    original: Image.Image
    reconstruction: Image.Image
    difference: Image.Image
    psnr: float
    ssim: float
    panel: Image.Image

    def summary(self) -> str:
        return f"PSNR {self.psnr:.2f} dB  SSIM {self.ssim:.4f}"


def panel_boxes(size: int) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of the three panels in the saved image."""
    return [(i * (size + PANEL_GAP), 0, i * (size + PANEL_GAP) + size, size) for i in range(3)]


def compose(original: Image.Image, reconstruction: Image.Image, difference: Image.Image, caption: str) -> Image.Image:
    """The three panels side by side on white, with labels and ``caption`` in a strip below."""
    size = original.width
    text_font = font(12 if size < 200 else 14)
    labels = ["original", "reconstruction", f"|difference| x{DIFF_GAIN}"]
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max(draw_probe.textlength(t, font=text_font) for t in [caption, "  ".join(labels)])
    width = max(3 * size + 2 * PANEL_GAP, int(text_width) + 8)
    canvas = Image.new("RGB", (width, size + TEXT_STRIP), "white")
    for image, box in zip((original, reconstruction, difference), panel_boxes(size)):
        canvas.paste(image, box[:2])
    draw = ImageDraw.Draw(canvas)
    if size >= 120:  # labels fit under each panel
        for label, box in zip(labels, panel_boxes(size)):
            draw.text((box[0] + 2, size + 2), label, fill="black", font=text_font)
    else:
        draw.text((2, size + 2), " | ".join(labels), fill="black", font=text_font)
    draw.text((2, size + TEXT_STRIP // 2 + 1), caption, fill="black", font=text_font)
    return canvas


def vae_demo(vae: Autoencoder, image: Image.Image, size: int = 256) -> VAEDemo:
    """Crop ``image`` to ``size`` x ``size``, reconstruct it and measure PSNR / SSIM (8-bit, range 255)."""
    factor = vae.downsample_factor
    if not isinstance(size, int) or size <= 0 or size % factor:
        raise BadArgument(f"size {size} is not a positive multiple of the VAE factor {factor}")
    if size < 11:
        raise BadArgument(f"size {size} is smaller than the 11-pixel SSIM window")
    original = square_crop(image, size)
    recon = reconstruct(vae, original)
    a, b = np.array(original), np.array(recon)  # writable copies (torch warns on read-only arrays)
    p, s = float(psnr(a, b)), float(ssim(a, b))
    diff = difference_image(original, recon)
    demo = VAEDemo(original, recon, diff, p, s, original)
    demo.panel = compose(original, recon, diff, f"{demo.summary()}  ({size}x{size}, VAE factor {factor})")
    return demo


def run_vae_demo(image_path: str | Path, model: str | Path | None = None, size: int = 256,
                 out: str | Path | None = None, device: str = "cpu") -> tuple[VAEDemo, Path]:
    """Open the image, load the VAE, run :func:`vae_demo` and save the panel (default ``NAME-vae.png``)."""
    from PIL import UnidentifiedImageError

    from ..png import save_png

    image_path = Path(image_path)
    if not image_path.is_file():
        raise BadArgument(f"image {image_path} does not exist")
    try:
        image = Image.open(image_path)
        image.load()
    except (UnidentifiedImageError, OSError) as err:
        raise BadArgument(f"image {image_path} is not a readable image: {err}") from None
    if not isinstance(size, int) or size < 11:
        raise BadArgument(f"--size must be an integer of at least 11, got {size}")
    vae = load_vae(model, device=device)
    demo = vae_demo(vae, image, size)
    path = Path(out) if out is not None else image_path.with_name(f"{image_path.stem}-vae.png")
    if path.suffix.lower() != ".png":
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(demo.panel, path, f"VAE reconstruction of {image_path.name}: {demo.summary()}")
    return demo, path
