"""Outpainting against diffusers' inpainting pipeline on a canvas built independently here.

The reference: the image padded with its border pixels (numpy ``edge`` padding), diffusers'
``StableDiffusionInpaintPipeline`` repainting the new area and the feather band, and the
result composited over the canvas with the feathered weights computed pixel by pixel below.
Ours must match within 1/255, and keep every old pixel outside the band exactly.
"""

from __future__ import annotations

from pathlib import Path

import diffusers
import numpy as np
import pytest
from PIL import Image
from test_generate import generators, with_scheduler

import latentdiff
from latentdiff.cli import main
from latentdiff.outpaint import Extension, extend_canvas, feathered_mask
from latentdiff.png import parse_parameters, read_parameters

PROMPT = "a photo of a cat"
SEED = 3


@pytest.fixture(scope="module")
def image() -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(np.kron(rng.integers(0, 255, (6, 5, 3)), np.ones((4, 4, 1))).astype(np.uint8))  # 20x24


def reference_weights(width: int, height: int, ext: Extension) -> np.ndarray:
    """(H', W') feather weights, pixel by pixel: 1 on the new area; an old pixel d pixels from it
    (counted over the extended sides only) gets max(0, (feather - d) / (feather + 1))."""
    out = np.ones((ext.top + height + ext.bottom, ext.left + width + ext.right))
    for y in range(height):
        for x in range(width):
            sides = [d for d, extended in ((x, ext.left), (width - 1 - x, ext.right), (y, ext.top),
                                            (height - 1 - y, ext.bottom)) if extended]
            out[ext.top + y, ext.left + x] = max(0.0, (ext.feather - min(sides)) / (ext.feather + 1))
    return out


@pytest.mark.parametrize("ext", [Extension(left=4, right=8, feather=3), Extension(top=2, bottom=6, left=6, feather=0),
                                 Extension(bottom=1, feather=10)])
def test_feathered_mask_is_the_ramp(ext: Extension) -> None:
    weights = reference_weights(20, 24, ext)
    assert np.array_equal(np.asarray(feathered_mask((20, 24), ext)), np.round(weights * 255).astype(np.uint8))


def test_canvas_fills(image: Image.Image) -> None:
    ext = Extension(left=4, right=8, top=2, bottom=6)
    old = np.asarray(image)
    edge = np.asarray(extend_canvas(image, ext, seed=0))
    assert np.array_equal(edge, np.pad(old, ((2, 6), (4, 8), (0, 0)), mode="edge"))
    noise = np.asarray(extend_canvas(image, Extension(left=4, right=8, top=2, bottom=6, fill="noise"), seed=0))
    assert np.array_equal(noise[2:26, 4:24], old)
    assert not np.array_equal(noise, edge) and noise[:2].std() > 50
    again = np.asarray(extend_canvas(image, Extension(left=4, right=8, top=2, bottom=6, fill="noise"), seed=0))
    other = np.asarray(extend_canvas(image, Extension(left=4, right=8, top=2, bottom=6, fill="noise"), seed=1))
    assert np.array_equal(noise, again) and not np.array_equal(noise, other)


def reference_outpaint(ref, image: Image.Image, ext: Extension, strength: float) -> np.ndarray:
    old = np.asarray(image).astype(np.float64)
    canvas = np.pad(np.asarray(image), ((ext.top, ext.bottom), (ext.left, ext.right), (0, 0)), mode="edge")
    weights = reference_weights(image.width, image.height, ext)
    repaint = Image.fromarray(((weights > 0) * 255).astype(np.uint8))
    h, w = weights.shape
    painted = ref(PROMPT, image=Image.fromarray(canvas), mask_image=repaint, strength=strength, num_inference_steps=6,
                  guidance_scale=7.5, generator=generators(1, SEED), width=w, height=h, output_type="np").images[0]
    alpha = np.round(weights * 255)[..., None] / 255
    out = alpha * np.round(painted * 255) + (1 - alpha) * canvas
    keep = weights == 0
    assert np.array_equal(np.round(out)[keep], np.pad(old, ((ext.top, ext.bottom), (ext.left, ext.right), (0, 0)))[keep])
    return out


def check_against(pipe: latentdiff.Pipeline, ref, image: Image.Image, ext: Extension, strength: float) -> None:
    ours = pipe.outpaint(PROMPT, image, left=ext.left, right=ext.right, top=ext.top, bottom=ext.bottom,
                         feather=ext.feather, steps=6, seed=SEED, strength=strength)[0]
    a = np.asarray(ours).astype(np.float64)
    b = reference_outpaint(ref, image, ext, strength)
    assert a.shape == b.shape and a.std() > 5
    assert np.abs(a - b).max() <= 1.0 + 1e-9, f"max pixel difference {np.abs(a - b).max()}"
    keep = reference_weights(image.width, image.height, ext) == 0
    canvas = np.pad(np.asarray(image), ((ext.top, ext.bottom), (ext.left, ext.right), (0, 0)))
    assert np.array_equal(np.asarray(ours)[keep], canvas[keep])  # old pixels outside the band: exact
    text = ours.info["parameters"]
    assert f'Outpaint: "left {ext.left}, right {ext.right}, top {ext.top}, bottom {ext.bottom}"' in text
    assert "Size: %dx%d" % ours.size in text


@pytest.mark.parametrize(("ext", "strength"), [(Extension(left=4, right=8, feather=3), 1.0),
                                               (Extension(top=8, feather=0), 0.8)])
def test_outpainting_matches_diffusers_blended(diffusers_dir: Path, image, ext: Extension, strength: float) -> None:
    pipe = latentdiff.load(diffusers_dir)
    ref = diffusers.StableDiffusionInpaintPipeline.from_pretrained(diffusers_dir)
    check_against(pipe, with_scheduler(ref, "ddim"), image, ext, strength)


def test_outpainting_matches_diffusers_nine_channel(diffusers_inpaint_dir: Path, image) -> None:
    pipe = latentdiff.load(diffusers_inpaint_dir)
    ref = diffusers.StableDiffusionInpaintPipeline.from_pretrained(diffusers_inpaint_dir)
    check_against(pipe, with_scheduler(ref, "ddim"), image, Extension(right=4, bottom=8, feather=2), 1.0)


def test_feather_zero_keeps_every_old_pixel(diffusers_dir: Path, image) -> None:
    pipe = latentdiff.load(diffusers_dir)
    out = pipe.outpaint(PROMPT, image, left=6, bottom=4, feather=0, fill="noise", strength=0.9, steps=3)
    assert out[0].size == (26, 28)
    assert np.array_equal(np.asarray(out[0])[:24, 6:], np.asarray(image))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "at least one of left, right, top, bottom"),
        ({"left": 3}, "outpainted width 23 is not a multiple of the VAE factor 2: add 1 more pixels to left or right"),
        ({"left": -2}, "left must be a whole number of pixels"),
        ({"top": 2.5}, "top must be a whole number"),
        ({"left": 2, "fill": "mirror"}, "fill must be one of edge, noise"),
        ({"left": 2, "feather": 11}, "feather 11 is over half the image's smaller side (20 px)"),
        ({"left": 2, "width": 24}, "leave width and height unset"),
        ({"left": 2, "output_type": "latent"}, "returns images"),
    ],
)
def test_bad_outpainting_arguments_are_named(diffusers_dir: Path, image, kwargs: dict, message: str) -> None:
    pipe = latentdiff.load(diffusers_dir)
    with pytest.raises(latentdiff.BadArgument) as err:
        pipe.outpaint(PROMPT, image, steps=1, **kwargs)
    assert message in str(err.value)


def test_parse_parameters() -> None:
    assert parse_parameters("a cat\nNegative prompt: blurry\nugly\nSteps: 2, Seed: 1") == ("a cat", "blurry\nugly")
    assert parse_parameters("two\nlines\nSteps: 2") == ("two\nlines", "")
    assert parse_parameters("just a caption") == ("just a caption", "")


def test_outpaint_command(diffusers_dir: Path, image, tmp_path: Path, capsys) -> None:
    """The prompt defaults to the one in the image's PNG parameters; bad sides are one line, exit 2."""
    from latentdiff.png import save_png

    source = tmp_path / "in.png"
    save_png(image, source, "a red circle\nNegative prompt: blurry\nSteps: 2, Seed: 1")
    out = tmp_path / "wide.png"
    assert main(["outpaint", str(source), "--model", str(diffusers_dir), "--right", "6", "--feather", "0",
                 "--steps", "2", "--seed", "4", "--out", str(out)]) == 0
    pipe = latentdiff.load(diffusers_dir)
    expected = pipe.outpaint("a red circle", image, negative_prompt="blurry", right=6, feather=0, steps=2, seed=4,
                             strength=1.0)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    assert read_parameters(out).startswith("a red circle\nNegative prompt: blurry\n")
    capsys.readouterr()
    assert main(["outpaint", str(source), "--model", str(diffusers_dir), "--right", "5",
                 "--out", str(tmp_path / "never.png")]) == 2
    err = capsys.readouterr().err
    assert "add 1 more pixels to left or right" in err and len(err.strip().splitlines()) == 1
