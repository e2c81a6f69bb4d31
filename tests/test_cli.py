"""The command line: outputs with A1111 metadata, and one clear line with exit status 2 for bad arguments."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentdiff.cli import main
from latentdiff.png import read_parameters


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli-inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / "image.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    Image.fromarray(mask[:8, :8]).save(folder / "small-mask.png")
    (folder / "not-an-image.png").write_text("hello")
    return {p.stem: p for p in folder.iterdir()}


def test_generate_writes_pngs_with_parameters(diffusers_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cat.png"
    status = main(["generate", "a cat", "--model", str(diffusers_dir), "--steps", "3", "--seed", "7",
                   "--negative", "blurry", "--sampler", "Euler a", "--batch", "2", "--out", str(out), "--upscale", "4"])
    assert status == 0
    first, second = tmp_path / "cat-0.png", tmp_path / "cat-1.png"
    assert Image.open(first).size == (16, 16) and Image.open(tmp_path / "cat-1.x4.png").size == (64, 64)
    text = read_parameters(second)
    assert text.startswith("a cat\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a, CFG scale: 7.5, Seed: 8, Size: 16x16")
    assert read_parameters(tmp_path / "cat-1.x4.png") == text
    assert str(first) in capsys.readouterr().out


def test_img2img_and_inpaint(diffusers_dir: Path, images: dict[str, Path], tmp_path: Path) -> None:
    assert main(["img2img", "a cat", "--model", str(diffusers_dir), "--image", str(images["image"]),
                 "--strength", "0.5", "--steps", "4", "--out", str(tmp_path / "i2i.png")]) == 0
    assert "Denoising strength: 0.5" in read_parameters(tmp_path / "i2i.png")
    assert main(["inpaint", "a cat", "--model", str(diffusers_dir), "--image", str(images["image"]),
                 "--mask", str(images["mask"]), "--steps", "3", "--out", str(tmp_path / "inp.png")]) == 0
    out = np.asarray(Image.open(tmp_path / "inp.png"))
    original = np.asarray(Image.open(images["image"]))
    assert np.array_equal(out[:4], original[:4])  # black mask rows come back unchanged


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "x", "--width", "15"], "width 15 is not a positive multiple of the VAE factor 2"),
        (["generate", "x", "--sampler", "nope"], "unknown sampler 'nope'"),
        (["img2img", "x", "--image", "{image}", "--strength", "1.5"], "strength must be in [0, 1], got 1.5"),
        (["inpaint", "x", "--image", "{image}", "--mask", "{small-mask}"], "mask size 8x8 differs from image size 16x16"),
        (["img2img", "x", "--image", "{not-an-image}"], "is not an image"),
        (["img2img", "x", "--image", "/nowhere.png"], "image /nowhere.png does not exist"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(diffusers_dir, images, argv, message, capsys) -> None:
    argv = [a.format(**{k: str(v) for k, v in images.items()}) for a in argv] + ["--model", str(diffusers_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("latentdiff: error:")


def test_missing_model_exits_2(tmp_path: Path, capsys) -> None:
    assert main(["generate", "x", "--model", str(tmp_path / "missing")]) == 2
    assert "no such model file or folder" in capsys.readouterr().err


def test_lora_and_embeddings_from_the_command_line(diffusers_dir: Path, tmp_path: Path) -> None:
    """--lora FILE:WEIGHT and --embeddings-dir give the images of the Python API, with A1111's
    "Lora hashes" and "TI hashes" in the infotext; a missing LoRA file is one line and exit 2."""
    import re

    import torch
    from safetensors.torch import save_file
    from test_lora import kohya_file, random_lora

    import latentdiff

    pipe = latentdiff.load(diffusers_dir)
    lora = kohya_file(random_lora(pipe, seed=3), tmp_path / "detail.safetensors")
    embeddings = tmp_path / "embeddings"
    embeddings.mkdir()
    save_file({"emb_params": torch.randn(2, 128, generator=torch.Generator().manual_seed(1))},
              embeddings / "zqxtri.safetensors")
    out = tmp_path / "lora.png"
    assert main(["generate", "a zqxtri cat", "--model", str(diffusers_dir), "--steps", "3", "--lora", f"{lora}:0.7",
                 "--embeddings-dir", str(embeddings), "--out", str(out)]) == 0
    text = read_parameters(out)
    assert re.search(r'Lora hashes: "detail: [0-9a-f]{12}"', text) and re.search(r'TI hashes: "zqxtri: [0-9a-f]{12}"', text)
    pipe.load_lora(lora, scale=0.7)
    pipe.load_textual_inversion(embeddings / "zqxtri.safetensors")
    expected = pipe.txt2img("a zqxtri cat", steps=3)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    assert main(["generate", "x", "--model", str(diffusers_dir), "--lora", str(tmp_path / "none.safetensors:0.5"),
                 "--out", str(tmp_path / "never.png")]) == 2
    assert not (tmp_path / "never.png").exists()


def test_presets(diffusers_dir: Path, tmp_path: Path, capsys) -> None:
    """A model folder with an lcm_lora.safetensors generates with it, LCM 8 steps, guidance 1, by
    default (--preset fast); --preset full is the model as trained at DDIM 20, guidance 7.5; fast
    without the file is one line and exit 2."""
    import shutil

    from test_lora import kohya_file, random_lora

    import latentdiff

    folder = tmp_path / "model"
    shutil.copytree(diffusers_dir, folder)
    plain = latentdiff.load(diffusers_dir)
    lora = kohya_file(random_lora(plain, seed=4), folder / "lcm_lora.safetensors")
    assert main(["generate", "a cat", "--model", str(folder), "--out", str(tmp_path / "fast.png")]) == 0
    text = read_parameters(tmp_path / "fast.png")
    assert "Steps: 8, Sampler: LCM, CFG scale: 1," in text and 'Lora hashes: "lcm_lora: ' in text
    assert main(["generate", "a cat", "--model", str(folder), "--preset", "full", "--out", str(tmp_path / "full.png")]) == 0
    assert "Steps: 20, Sampler: DDIM, CFG scale: 7.5," in read_parameters(tmp_path / "full.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "full.png")), np.asarray(plain.txt2img("a cat")[0]))
    plain.load_lora(lora, name="lcm_lora")
    expected = plain.txt2img("a cat", sampler="lcm", steps=8, guidance_scale=1.0)[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "fast.png")), np.asarray(expected))
    capsys.readouterr()
    assert main(["generate", "a cat", "--model", str(diffusers_dir), "--preset", "fast",
                 "--out", str(tmp_path / "never.png")]) == 2
    assert "needs an LCM-LoRA lcm_lora.safetensors" in capsys.readouterr().err
