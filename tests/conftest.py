"""Shared fixtures: tiny random Stable Diffusion pipelines built with the reference libraries.

Nothing is downloaded: the tokenizer is a small CLIP-style BPE trained on a
handful of captions, and the networks are tiny random diffusers/transformers
models saved in the layouts people have on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the reference libraries must never reach for a hub
# The parity tests compare float32 networks with the reference libraries' float32: pin the default
# dtype (bfloat16 on a CPU with native bf16); test_speed_dtype checks the automatic choice itself.
os.environ["LATENTDIFF_DTYPE"] = "float32"
torch.set_num_threads(min(2, torch.get_num_threads()))


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """max |actual - expected| <= rtol * max |expected|: relative error over the whole tensor."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.detach().abs().max().clamp_min(1e-12)
    err = (actual.detach().float() - expected.detach().float()).abs().max() / scale
    assert err <= rtol, f"relative error {err.item():.3g} > {rtol}"

CORPUS = [
    "a large red circle in the top left on a white background",
    "a small blue square in the center and a large yellow triangle at the bottom on a black background",
    "a photo of a cat sitting on a sofa, highly detailed, 4k",
    "an astronaut riding a horse on the moon (masterpiece:1.2) [blurry]",
    "portrait of a woman, oil painting, by rembrandt; dramatic lighting!",
    "Café au lait, naïve façade — 東京 skyline at night 🌃",
    "green purple orange gray circles squares triangles",
] * 4


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from latentdiff.models.tokenizer import train_clip_bpe

    folder = tmp_path_factory.mktemp("tokenizer")
    train_clip_bpe(CORPUS, vocab_size=800).save(folder)
    return folder


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny models gain nothing from more, and on a shared 2-core machine two spinning OpenMP threads
    per process slow training runs down tenfold."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_diffusers_components(tokenizer_dir: Path, unet_in_channels: int = 4) -> dict:
    """Random tiny diffusers/transformers components with SD 1.x's structure."""
    import transformers
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=unet_in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=16,
    )
    text_config = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,  # CLIP's 64-wide heads, so a single file's head count can be inferred
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = transformers.CLIPTextModel(text_config)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    return {
        "unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer, "scheduler": scheduler,
    }


def tiny_diffusers_pipeline(tokenizer_dir: Path, unet_in_channels: int = 4):
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    cls = StableDiffusionInpaintPipeline if unet_in_channels == 9 else StableDiffusionPipeline
    parts = tiny_diffusers_components(tokenizer_dir, unet_in_channels)
    return cls(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def save_with_sd15_scheduler(pipe, folder: Path) -> Path:
    """save_pretrained, then SD 1.5's own scheduler_config.json verbatim (a PNDMScheduler config
    naming no timestep_spacing), as real SD 1.5 folders carry it."""
    import json

    from latentdiff.schedule import SD15_SCHEDULER_CONFIG

    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER_CONFIG, indent=2))
    return folder


@pytest.fixture(scope="session")
def diffusers_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A tiny SD pipeline saved by diffusers' own save_pretrained (safetensors), SD 1.5's scheduler config."""
    return save_with_sd15_scheduler(tiny_diffusers_pipeline(tokenizer_dir), tmp_path_factory.mktemp("sd-tiny"))


@pytest.fixture(scope="module")
def pipe(diffusers_dir: Path):
    """latentdiff on the tiny diffusers pipeline (module-scoped; shared by the pipeline tests)."""
    import latentdiff

    return latentdiff.load(diffusers_dir)


@pytest.fixture(scope="module")
def ref(diffusers_dir: Path):
    """diffusers' own StableDiffusionPipeline on the same folder."""
    import diffusers

    return diffusers.StableDiffusionPipeline.from_pretrained(diffusers_dir)


@pytest.fixture(scope="module")
def init_image():
    """A blocky 32x32 RGB image (PIL) for img2img and inpainting."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    base = np.kron(rng.integers(0, 255, (8, 8, 3)), np.ones((4, 4, 1))).astype(np.uint8)  # blocky 32x32
    return Image.fromarray(base)


@pytest.fixture(scope="session")
def diffusers_inpaint_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A tiny 9-channel inpainting pipeline saved by diffusers, SD 1.5's scheduler config."""
    return save_with_sd15_scheduler(tiny_diffusers_pipeline(tokenizer_dir, unet_in_channels=9),
                                    tmp_path_factory.mktemp("sd-tiny-inpaint"))
