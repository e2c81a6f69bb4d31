"""``latentdiff vae``: the three-panel autoencoder demo and its PSNR / SSIM."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import latentdiff
from latentdiff.cli import main
from latentdiff.eval import psnr, ssim
from latentdiff.eval.vae_demo import DIFF_GAIN, load_vae, panel_boxes, square_crop

SIZE = 32


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 48x40 image with gradients and a square: not square, so the crop matters."""
    y, x = np.mgrid[0:40, 0:48]
    image = np.stack([x * 5, y * 6, (x + y) * 2], axis=-1).astype(np.uint8)
    image[10:25, 15:30] = (250, 30, 30)
    path = tmp_path_factory.mktemp("vae-demo") / "photo.png"
    Image.fromarray(image).save(path)
    return path


def _printed(text: str) -> tuple[float, float]:
    match = re.search(r"PSNR (\S+) dB\s+SSIM (\S+)", text)
    assert match, text
    return float(match.group(1)), float(match.group(2))


def test_vae_demo_panels_and_numbers(diffusers_dir: Path, photo: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo.png"
    assert main(["vae", str(photo), "--model", str(diffusers_dir), "--size", str(SIZE), "--out", str(out)]) == 0
    printed_psnr, printed_ssim = _printed(capsys.readouterr().out)
    panel = np.asarray(Image.open(out).convert("RGB"))
    assert panel.shape[0] > SIZE and panel.shape[1] >= 3 * SIZE
    original, recon, diff = (panel[t:b, l:r] for l, t, r, b in panel_boxes(SIZE))

    # the panels are the cropped input, the VAE's reconstruction and the amplified difference
    assert np.array_equal(original, np.asarray(square_crop(Image.open(photo), SIZE)))
    vae = latentdiff.load(diffusers_dir).vae
    x = torch.from_numpy(original.astype(np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1
    with torch.no_grad():
        expected = vae.decode(vae.encode(x).mode())
    expected = ((expected[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.abs(recon.astype(int) - expected.astype(int)).max() <= 1
    amplified = np.minimum(255, DIFF_GAIN * np.abs(original.astype(int) - recon.astype(int)))
    assert np.array_equal(diff, amplified.astype(np.uint8))

    # the printed numbers are psnr / ssim of the saved reconstruction
    assert printed_psnr == pytest.approx(psnr(original.copy(), recon.copy()), abs=0.006)
    assert printed_ssim == pytest.approx(ssim(original.copy(), recon.copy()), abs=6e-5)


def test_load_vae_from_every_layout(diffusers_dir: Path, tmp_path: Path) -> None:
    reference = latentdiff.load(diffusers_dir).vae.state_dict()
    single = tmp_path / "model.safetensors"
    latentdiff.load(diffusers_dir).save(single)  # an original single-file checkpoint
    for source in (diffusers_dir, diffusers_dir / "vae", single):
        state = load_vae(source).state_dict()
        assert state.keys() == reference.keys(), source
        assert all(torch.equal(state[k], reference[k]) for k in reference), source


def test_default_output_name(diffusers_dir: Path, photo: Path, tmp_path: Path, capsys) -> None:
    copy = tmp_path / "pic.png"
    copy.write_bytes(photo.read_bytes())
    assert main(["vae", str(copy), "--model", str(diffusers_dir / "vae"), "--size", "16"]) == 0
    assert (tmp_path / "pic-vae.png").is_file()
    assert str(tmp_path / "pic-vae.png") in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "{model}", "--size", "15"], "size 15 is not a positive multiple of the VAE factor 2"),
        (["--model", "{model}", "--size", "8"], "--size must be an integer of at least 11"),
        (["--model", "{unet}"], "is a UNet2DCondition, not a VAE"),
        (["--model", "/nowhere"], "/nowhere"),
    ],
)
def test_bad_arguments_exit_2(diffusers_dir: Path, photo: Path, argv: list[str], message: str, capsys) -> None:
    argv = [a.replace("{unet}", str(diffusers_dir / "unet")).replace("{model}", str(diffusers_dir)) for a in argv]
    assert main(["vae", str(photo), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("latentdiff: error:") and message in err


def test_missing_image_exit_2(capsys) -> None:
    assert main(["vae", "/nowhere.png"]) == 2
    assert "image /nowhere.png does not exist" in capsys.readouterr().err
