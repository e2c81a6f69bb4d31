"""load(compile=True): the compiled UNet gives the uncompiled results, and sees LoRAs merged later."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import latentdiff

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="torch.compile on CPU needs a C++ compiler")


def latents(pipe: latentdiff.Pipeline) -> torch.Tensor:
    return pipe.txt2img("a photo of a cat", steps=3, seed=1, width=16, height=16, output_type="latent")


def test_compiled_unet_equals_the_plain_one(diffusers_dir: Path, tmp_path: Path) -> None:
    from test_lora import kohya_file, random_lora

    plain = latentdiff.load(diffusers_dir)
    compiled = latentdiff.load(diffusers_dir, compile=True)
    assert compiled.unet.state_dict().keys() == plain.unet.state_dict().keys()
    a, b = latents(plain), latents(compiled)
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-5
    lora = kohya_file(random_lora(plain, seed=2), tmp_path / "l.safetensors")
    plain.load_lora(lora)
    compiled.load_lora(lora)
    a, b = latents(plain), latents(compiled)
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-5
