"""TAESD (diffusers' AutoencoderTiny) against diffusers with random weights: the folder layout,
madebyollin's original integer-key files, whole pipelines with seeds, and the errors of bad files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

import latentdiff
from conftest import assert_rel_close
from latentdiff.models.taesd import TAESDConfig, TinyAutoencoder, TinyLatents, preview
from test_generate import (PROMPTS, SEED, SIZE, assert_images_match, assert_latents_match, generators,
                           with_scheduler)

RTOL = 1e-4
#: the conftest pipeline's VAE has two levels (f = 2): a TAESD of the same factor fits it
TINY = dict(encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
            num_encoder_blocks=(1, 2), num_decoder_blocks=(2, 1))


def reference(config: dict, seed: int = 0) -> diffusers.AutoencoderTiny:
    torch.manual_seed(seed)
    return diffusers.AutoencoderTiny(**config).eval()


@pytest.fixture(scope="module")
def refs() -> dict[str, diffusers.AutoencoderTiny]:
    return {"tiny": reference(TINY), "sd": reference({})}


@pytest.fixture(scope="module")
def folders(refs, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name, ref in refs.items():
        out[name] = tmp_path_factory.mktemp(f"taesd-{name}")
        ref.save_pretrained(out[name], safe_serialization=True)
    return out


class Clamp(nn.Module):  # the original decoder's parameterless first layer
    def forward(self, x):
        return torch.tanh(x / 3) * 3


def original_state_dicts(ref: diffusers.AutoencoderTiny) -> dict[str, dict[str, torch.Tensor]]:
    """The original files' contents, by rebuilding madebyollin's ``nn.Sequential`` from diffusers'
    layers in order (the decoder with its clamp in front) and taking its state dict."""
    encoder = nn.Sequential(*ref.encoder.layers)
    decoder = nn.Sequential(Clamp(), *ref.decoder.layers)
    return {half: {k: v.detach().clone().contiguous() for k, v in seq.state_dict().items()}
            for half, seq in (("encoder", encoder), ("decoder", decoder))}


@pytest.fixture(scope="module")
def original_dir(refs, tmp_path_factory) -> Path:
    """taesd_encoder.pth (pickled) + taesd_decoder.safetensors of the SD-config reference."""
    folder = tmp_path_factory.mktemp("taesd-original")
    sds = original_state_dicts(refs["sd"])
    torch.save(sds["encoder"], folder / "taesd_encoder.pth")
    save_file(sds["decoder"], str(folder / "taesd_decoder.safetensors"))
    return folder


def images(size: int, seed: int = 1) -> torch.Tensor:
    return torch.rand((2, 3, size, size), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def latents(size: int, seed: int = 2) -> torch.Tensor:
    return torch.randn((2, 4, size, size), generator=torch.Generator().manual_seed(seed)) * 3  # reaches the clamp


def assert_matches_reference(ours: TinyAutoencoder, ref: diffusers.AutoencoderTiny, image_size: int) -> None:
    f = ours.downsample_factor
    x, z = images(image_size), latents(image_size // f)
    with torch.no_grad():
        assert_rel_close(ours.encode(x).latents, ref.encode(x).latents, RTOL)
        assert_rel_close(ours.decode(z), ref.decode(z).sample, RTOL)


# ----------------------------------------------------------------------------- model and config
def test_config_and_parameter_counts_match_diffusers() -> None:
    ours = TAESDConfig.sd().to_dict()
    theirs = {k: list(v) if isinstance(v, tuple) else v for k, v in diffusers.AutoencoderTiny().config.items()
              if not k.startswith("_")}
    assert ours.pop("_class_name") == "AutoencoderTiny"
    assert ours == theirs
    model = TinyAutoencoder(TAESDConfig.sd())
    assert sum(p.numel() for p in model.encoder.parameters()) == 1_222_532
    assert sum(p.numel() for p in model.decoder.parameters()) == 1_222_531
    assert model.downsample_factor == 8 and not model.config.force_upcast and model.scaling_factor == 1.0


@pytest.mark.parametrize("name", ["tiny", "sd"])
def test_diffusers_folder_loads_by_identity_and_matches(refs, folders, name) -> None:
    vae = latentdiff.load_component(folders[name])
    assert isinstance(vae, TinyAutoencoder)
    assert list(vae.state_dict()) == list(refs[name].state_dict())
    assert vae.config == TAESDConfig(**TINY) if name == "tiny" else vae.config == TAESDConfig.sd()
    assert_matches_reference(vae, refs[name], 64 if name == "sd" else 16)
    # the weight file alone, its config.json beside it
    same = latentdiff.load_component(folders[name] / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), vae.state_dict().values()))


def test_encode_draws_no_random_numbers(folders) -> None:
    vae = latentdiff.load_component(folders["tiny"])
    with torch.no_grad():
        out = vae.encode(images(16))
    assert isinstance(out, TinyLatents)
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    assert torch.equal(out.sample(g), out.mode()) and torch.equal(out.mode(), out.latents)
    assert torch.equal(g.get_state(), state)
    assert torch.equal(vae.unscale_latents(vae.scale_latents(out.latents)), out.latents)


def test_tiled_paths(folders) -> None:
    vae = latentdiff.load_component(folders["sd"])
    x, z = images(64), latents(8)
    with torch.no_grad():
        assert torch.allclose(vae.encode_tiled(x, tile=64, overlap=16).latents, vae.encode(x).latents, atol=1e-6)
        assert torch.allclose(vae.decode_tiled(z, tile=8, overlap=2), vae.decode(z), atol=1e-6)
        assert vae.decode_tiled(latents(12), tile=8, overlap=4).shape == (2, 3, 96, 96)
        assert vae.encode_tiled(images(96), tile=64, overlap=32).latents.shape == (2, 4, 12, 12)


# ----------------------------------------------------------------------------- original files
def test_original_layout_facts(refs) -> None:
    """The SD taesd files' integer keys (madebyollin's Encoder / Decoder sequences)."""
    sds = original_state_dicts(refs["sd"])
    enc, dec = sds["encoder"], sds["decoder"]
    assert enc["0.weight"].shape == (64, 3, 3, 3) and enc["14.weight"].shape == (4, 64, 3, 3)
    assert "2.weight" in enc and "2.bias" not in enc and "1.conv.4.weight" in enc  # stride-2 convs have no bias
    assert "0.weight" not in dec and dec["1.weight"].shape == (64, 4, 3, 3)
    assert dec["19.weight"].shape == (3, 64, 3, 3) and "19.bias" in dec and "7.bias" not in dec
    assert "18.conv.0.weight" in dec and "6.weight" not in dec  # 6: nn.Upsample


@pytest.mark.parametrize("which", ["taesd_decoder.safetensors", "taesd_encoder.pth", "."])
def test_original_files_load_to_identical_outputs(refs, folders, original_dir, which) -> None:
    vae = latentdiff.load_component(original_dir / which)
    assert isinstance(vae, TinyAutoencoder) and vae.encoder is not None and vae.decoder is not None
    assert vae.config == TAESDConfig.sd()
    folder_vae = latentdiff.load_component(folders["sd"])
    for (ka, a), (kb, b) in zip(vae.state_dict().items(), folder_vae.state_dict().items()):
        assert ka == kb and torch.equal(a, b)
    assert_matches_reference(vae, refs["sd"], 64)


def test_tiny_original_files_infer_their_config(refs, tmp_path) -> None:
    sds = original_state_dicts(refs["tiny"])
    save_file(sds["encoder"], str(tmp_path / "taesd_encoder.safetensors"))
    save_file(sds["decoder"], str(tmp_path / "taesd_decoder.safetensors"))
    vae = latentdiff.load_component(tmp_path)
    assert vae.config == TAESDConfig(**TINY)
    assert_matches_reference(vae, refs["tiny"], 16)


def test_decoder_alone_is_decoder_only(refs, original_dir, tmp_path) -> None:
    shutil.copy(original_dir / "taesd_decoder.safetensors", tmp_path)
    vae = latentdiff.load_component(tmp_path / "taesd_decoder.safetensors")
    assert vae.encoder is None
    z = latents(4)
    with torch.no_grad():
        assert_rel_close(vae.decode(z), refs["sd"].decode(z).sample, RTOL)
    with pytest.raises(latentdiff.BadModel, match=r"without its encoder: put taesd_encoder\.safetensors"):
        vae.encode(images(32))
    assert isinstance(latentdiff.load_component(tmp_path), TinyAutoencoder)  # the folder of one file too


# ----------------------------------------------------------------------------- bad files
def write_decoder(tmp_path: Path, sd: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "taesd_decoder.safetensors"
    save_file(sd, str(path))
    return path


def test_bad_original_files_are_named(refs, tmp_path) -> None:
    good = original_state_dicts(refs["sd"])["decoder"]
    missing = {k: v for k, v in good.items() if k != "3.conv.2.bias"}
    with pytest.raises(latentdiff.CheckpointError, match=r"taesd_decoder.safetensors.*1 missing key.*3\.conv\.2\.bias"):
        latentdiff.load_component(write_decoder(tmp_path, missing))
    extra = {**good, "3.foo.weight": torch.zeros(3)}
    with pytest.raises(latentdiff.CheckpointError, match=r"1 unexpected key.*3\.foo\.weight"):
        latentdiff.load_component(write_decoder(tmp_path, extra))
    wrong = {**good, "3.conv.2.weight": torch.zeros(64, 64, 1, 1)}
    with pytest.raises(latentdiff.CheckpointError, match=r"shape mismatch.*3\.conv\.2\.weight: file \(64, 64, 1, 1\)"):
        latentdiff.load_component(write_decoder(tmp_path, wrong))
    gap = {k: v for k, v in good.items() if not k.startswith("4.")}  # a whole block gone shifts the layout
    with pytest.raises(latentdiff.CheckpointError, match="do not fit the layout"):
        latentdiff.load_component(write_decoder(tmp_path, gap))
    enc = original_state_dicts(refs["tiny"])["encoder"]  # 4 latent channels, but two levels
    save_file({k: v for k, v in enc.items()}, str(tmp_path / "taesd_encoder.safetensors"))
    with pytest.raises(latentdiff.BadModel, match="the encoder downsamples by 2 but the decoder upsamples by 8"):
        latentdiff.load_component(write_decoder(tmp_path, good))


def test_bad_diffusers_folders_are_named(folders, tmp_path) -> None:
    folder = tmp_path / "vae"
    shutil.copytree(folders["tiny"], folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(weights))
    save_file({**sd, "decoder.layers.0.weight": torch.zeros(16, 4, 1, 1)}, str(weights))
    with pytest.raises(latentdiff.CheckpointError, match=r"shape mismatch.*decoder\.layers\.0\.weight"):
        latentdiff.load_component(folder)
    save_file({**sd, "decoder.extra.weight": torch.zeros(1)}, str(weights))
    with pytest.raises(latentdiff.CheckpointError, match=r"unexpected key.*decoder\.extra\.weight"):
        latentdiff.load_component(folder)
    save_file({k: v for k, v in sd.items() if k != "encoder.layers.0.bias"}, str(weights))
    with pytest.raises(latentdiff.CheckpointError, match=r"missing key.*encoder\.layers\.0\.bias"):
        latentdiff.load_component(folder)
    save_file(sd, str(weights))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "act_fn": "tanh"}))
    with pytest.raises(latentdiff.BadModel, match=r"config\.json.*act_fn='tanh' is not supported"):
        latentdiff.load_component(folder)
    lone = tmp_path / "lone.safetensors"
    shutil.copy(weights, lone)
    with pytest.raises(latentdiff.CheckpointError, match="needs its config.json beside it"):
        latentdiff.load_component(lone)


# ----------------------------------------------------------------------------- whole pipelines
@pytest.fixture(scope="module")
def pipe(diffusers_dir, folders) -> latentdiff.Pipeline:
    return latentdiff.load(diffusers_dir, dtype=torch.float32, vae=folders["tiny"])


@pytest.fixture(scope="module")
def ref(diffusers_dir, folders):
    tiny = diffusers.AutoencoderTiny.from_pretrained(folders["tiny"])
    return diffusers.StableDiffusionPipeline.from_pretrained(diffusers_dir, vae=tiny)


@pytest.fixture(scope="module")
def init_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(np.kron(rng.integers(0, 255, (8, 8, 3)), np.ones((4, 4, 1))).astype(np.uint8))


def compare(ours_call, theirs_call) -> None:
    """Final latents within 1e-5 relative, images within 1/255 (one denoising run each side)."""
    ours, theirs = ours_call(output_type="latent"), theirs_call(output_type="latent").images
    assert_latents_match(ours, theirs)
    assert_images_match(ours_call(), theirs_call(output_type="np").images)


def test_pipeline_vae_is_the_tiny_autoencoder(pipe) -> None:
    assert isinstance(pipe.vae, TinyAutoencoder) and pipe.vae_factor == 2


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m"])
def test_txt2img_matches_diffusers(pipe, ref, sampler) -> None:
    reference = with_scheduler(ref, sampler)
    compare(
        lambda **kw: pipe.txt2img(PROMPTS, steps=6, seed=SEED, sampler=sampler, width=SIZE, height=SIZE, **kw),
        lambda **kw: reference(PROMPTS, num_inference_steps=6, guidance_scale=7.5, generator=generators(2),
                               width=SIZE, height=SIZE, **kw),
    )


def test_img2img_matches_diffusers(pipe, ref, init_image) -> None:
    """The tiny encoder draws nothing: the noise that follows comes from the same generator state."""
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
    img2img._original_scheduler_config = with_scheduler(ref, "ddim")._original_scheduler_config
    with_scheduler(img2img, "euler_a")
    compare(
        lambda **kw: pipe.img2img(PROMPTS, image=init_image, strength=0.6, steps=10, seed=SEED, sampler="euler_a",
                                  **kw),
        lambda **kw: img2img(PROMPTS, image=init_image, strength=0.6, num_inference_steps=10, guidance_scale=7.5,
                             generator=generators(2), **kw),
    )


def test_blended_inpainting_matches_diffusers(pipe, ref, init_image) -> None:
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 12:32] = 255
    mask = Image.fromarray(mask)
    inpaint = diffusers.StableDiffusionInpaintPipeline(**ref.components)
    inpaint._original_scheduler_config = with_scheduler(ref, "ddim")._original_scheduler_config
    with_scheduler(inpaint, "euler_a")
    compare(
        lambda **kw: pipe.inpaint(PROMPTS[1], image=init_image, mask=mask, steps=6, seed=SEED, sampler="euler_a",
                                  paste_back=False, **kw),
        lambda **kw: inpaint(PROMPTS[1], image=init_image, mask_image=mask, num_inference_steps=6, guidance_scale=7.5,
                             generator=generators(1), width=SIZE, height=SIZE, **kw),
    )


def test_preview_decodes_the_callback_x0(pipe) -> None:
    seen = []
    final = pipe.txt2img("a cat", steps=3, seed=0, output_type="latent", callback=lambda i, n, x0: seen.append(x0))
    shown = preview(pipe.vae, seen[0])
    assert len(shown) == 1 and shown[0].size == (16, 16) and shown[0].mode == "RGB"
    decoded = pipe.txt2img("a cat", steps=3, seed=0)[0]
    assert np.array_equal(np.asarray(preview(pipe.vae, final)[0]), np.asarray(decoded))


def test_decoder_only_pipeline(diffusers_dir, original_dir, tmp_path, init_image) -> None:
    # a decoder of 4 latent channels and f = 8 does not fit the f = 2 test model; use the tiny one
    sds = original_state_dicts(reference(TINY))
    save_file(sds["decoder"], str(tmp_path / "taesd_decoder.safetensors"))
    pipe = latentdiff.load(diffusers_dir, dtype=torch.float32, vae=tmp_path / "taesd_decoder.safetensors")
    assert pipe.txt2img("a cat", steps=2, seed=0, vae_tiling=True)[0].size == (16, 16)
    with pytest.raises(latentdiff.BadModel, match="without its encoder.*taesd_encoder"):
        pipe.img2img("a cat", image=init_image, steps=2)


def test_save_and_eval_with_a_tiny_autoencoder(pipe, tmp_path) -> None:
    from latentdiff.eval.autoencoder import autoencoder_metrics

    pipe.save(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderTiny"]
    assert isinstance(diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "saved").vae,
                      diffusers.AutoencoderTiny)
    again = latentdiff.load(tmp_path / "saved", dtype=torch.float32)
    assert isinstance(again.vae, TinyAutoencoder)
    with pytest.raises(latentdiff.BadArgument, match="save to a folder"):
        pipe.save(tmp_path / "one.safetensors")
    metrics = autoencoder_metrics(pipe.vae, images(16))
    assert np.isfinite(metrics["psnr_db"]) and metrics["n"] == 2
