"""Hires fix: exactly the two calls it is made of, its infotext, and img2img from latents."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import latentdiff
from latentdiff.png import read_parameters, save_png

PROMPTS = ["a red circle", "a photo of a cat"]


@pytest.fixture(scope="module")
def pipe(diffusers_dir: Path) -> latentdiff.Pipeline:
    return latentdiff.load(diffusers_dir)


@pytest.mark.parametrize("upscaler", ["latent", "latent-nearest"])
def test_latent_hires_fix_is_txt2img_then_img2img(pipe, upscaler) -> None:
    kw = dict(steps=6, seed=4, sampler="euler_a")
    hires = pipe.txt2img(PROMPTS, **kw, hires_scale=2.0, hires_steps=5, hires_strength=0.6, hires_upscaler=upscaler,
                         output_type="latent")
    first = pipe.txt2img(PROMPTS, **kw, output_type="latent")  # (2, 4, 8, 8)
    mode = {"latent": dict(mode="bilinear", align_corners=False), "latent-nearest": dict(mode="nearest")}[upscaler]
    upscaled = F.interpolate(first, size=(16, 16), **mode)
    second = pipe.img2img(PROMPTS, upscaled, steps=5, seed=4, sampler="euler_a", strength=0.6, output_type="latent")
    assert hires.shape == (2, 4, 16, 16) and torch.equal(hires, second)


def test_lanczos_hires_fix_is_txt2img_resize_img2img(pipe) -> None:
    hires = pipe.txt2img(PROMPTS, steps=4, seed=9, hires_scale=1.5, hires_upscaler="lanczos")
    first = pipe.txt2img(PROMPTS, steps=4, seed=9)
    resized = [im.resize((24, 24), Image.LANCZOS) for im in first]
    second = pipe.img2img(PROMPTS, resized, steps=4, seed=9, strength=0.7)
    assert [im.size for im in hires] == [(24, 24)] * 2
    for a, b in zip(hires, second):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_hires_infotext_is_read_back(pipe, tmp_path: Path) -> None:
    image = pipe.txt2img("a cat", steps=4, seed=2, hires_scale=2.0, hires_steps=3, hires_strength=0.5)[0]
    save_png(image, tmp_path / "hires.png")
    text = read_parameters(tmp_path / "hires.png")
    assert image.size == (32, 32)
    assert "Steps: 4, Sampler: DDIM" in text and "Size: 16x16" in text
    assert "Denoising strength: 0.5, Hires upscale: 2, Hires steps: 3, Hires upscaler: Latent" in text


def test_img2img_takes_latents_and_image_lists(pipe) -> None:
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = pipe.img2img(PROMPTS, latents, steps=4, seed=1, output_type="latent")
    assert out.shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"latents given as image must have shape"):
        pipe.img2img(PROMPTS, torch.zeros(3, 4, 8, 8), steps=4)
    with pytest.raises(ValueError, match="got 1 images for 2 images to make"):
        pipe.img2img(PROMPTS, [Image.new("RGB", (16, 16))], steps=4)
    with pytest.raises(ValueError, match="hires_scale must be in"):
        pipe.txt2img("x", hires_scale=0.5)
    with pytest.raises(ValueError, match="hires_scale applies to txt2img only"):
        pipe.inpaint("x", Image.new("RGB", (16, 16)), Image.new("L", (16, 16)), hires_scale=2.0)
    with pytest.raises(ValueError, match="hires_upscaler must be one of"):
        pipe.txt2img("x", hires_scale=2.0, hires_upscaler="esrgan")
