"""Live previews: the pipeline's preview decoder (a model folder's taesd/, or preview_vae=), saved
with the pipeline, and the CLI's --preview file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import latentdiff
from latentdiff.checkpoints.diffusers_folder import save_component
from latentdiff.cli import main
from latentdiff.models.taesd import TAESDConfig, TinyAutoencoder, preview

#: f = 2, as the conftest pipeline's VAE
TINY = TAESDConfig.tiny()


@pytest.fixture(scope="module")
def taesd_dir(tmp_path_factory) -> Path:
    torch.manual_seed(5)
    folder = tmp_path_factory.mktemp("taesd")
    save_component(TinyAutoencoder(TINY), folder, "vae")
    return folder


@pytest.fixture(scope="module")
def model_with_preview(diffusers_dir, taesd_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("with-preview") / "model"
    shutil.copytree(diffusers_dir, folder)
    shutil.copytree(taesd_dir, folder / "taesd")
    return folder


def x0_latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_a_model_folders_taesd_decodes_the_previews(model_with_preview, taesd_dir) -> None:
    pipe = latentdiff.load(model_with_preview, dtype=torch.float32)
    assert isinstance(pipe.preview_vae, TinyAutoencoder)
    own = latentdiff.load_component(taesd_dir, dtype=torch.float32)
    x0 = x0_latents()
    for ours, theirs in zip(pipe.preview(x0), preview(own, x0)):
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    assert not np.array_equal(np.asarray(pipe.preview(x0)[0]), np.asarray(preview(pipe.vae, x0)[0]))


def test_without_one_the_vae_decodes_them(diffusers_dir, taesd_dir) -> None:
    pipe = latentdiff.load(diffusers_dir, dtype=torch.float32)
    assert pipe.preview_vae is None
    x0 = x0_latents(1)
    assert np.array_equal(np.asarray(pipe.preview(x0)[1]), np.asarray(preview(pipe.vae, x0)[1]))
    named = latentdiff.load(diffusers_dir, dtype=torch.float32, preview_vae=taesd_dir)
    assert isinstance(named.preview_vae, TinyAutoencoder)
    with pytest.raises(latentdiff.CheckpointError, match="not a tiny autoencoder"):
        latentdiff.load(diffusers_dir, dtype=torch.float32, preview_vae=diffusers_dir / "vae")


def test_save_keeps_the_preview_decoder(model_with_preview, tmp_path) -> None:
    pipe = latentdiff.load(model_with_preview, dtype=torch.float32)
    pipe.save(tmp_path / "saved")
    again = latentdiff.load(tmp_path / "saved", dtype=torch.float32)
    for key, value in pipe.preview_vae.state_dict().items():
        assert torch.equal(again.preview_vae.state_dict()[key], value), key


def test_cli_writes_the_live_preview(model_with_preview, tmp_path) -> None:
    out, shown = tmp_path / "out.png", tmp_path / "preview.png"
    seen: list[str] = []
    original = Image.Image.save

    def spy(self, fp, *args, **kwargs):  # every preview written, in order
        if "preview" in str(fp):
            seen.append(kwargs["pnginfo"].chunks[-1][1].decode())
        return original(self, fp, *args, **kwargs)

    Image.Image.save = spy
    try:
        assert main(["generate", "a cat", "--model", str(model_with_preview), "--steps", "5", "--batch", "2",
                     "--preset", "full", "--out", str(out), "--preview", str(shown), "--preview-every", "2",
                     "--dtype", "float32"]) == 0
    finally:
        Image.Image.save = original
    assert seen == ["preview\x00step 2/5", "preview\x00step 4/5", "preview\x00step 5/5"]
    with Image.open(shown) as image:
        assert image.size == (32, 16)  # the batch side by side
        assert image.text["preview"] == "step 5/5"


def test_cli_rejects_a_bad_preview_setting(diffusers_dir, tmp_path, capsys) -> None:
    assert main(["generate", "a cat", "--model", str(diffusers_dir), "--preview", str(tmp_path / "p.png"),
                 "--preview-every", "0"]) == 2
    assert "--preview-every" in capsys.readouterr().err
