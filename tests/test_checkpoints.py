"""Loading and saving whole pipelines in every layout, checked against diffusers/transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_rel_close, tiny_diffusers_components

import latentdiff
from latentdiff import CheckpointError
from latentdiff.checkpoints import single_file
from latentdiff.checkpoints.io import read_state_dict, write_safetensors

PROMPTS = ["a red circle", "a photo of a cat, masterpiece!", ""]  # no weighting syntax: plain CLIP


def reference_outputs(unet, vae, text_encoder, tokenizer) -> dict[str, torch.Tensor]:
    """Outputs of the reference networks on fixed inputs."""
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, unet.config.in_channels, 8, 8, generator=g)
    images = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    latents = torch.randn(2, 4, 2, 2, generator=g)
    with torch.no_grad():
        emb = text_encoder(ids)[0]
        post = vae.encode(images).latent_dist
        return {
            "emb": emb,
            "eps": unet(x, torch.tensor([1, 500, 999]), emb).sample,
            "mean": post.mean,
            "std": post.std,
            "decoded": vae.decode(latents).sample,
        }


def our_outputs(pipe: latentdiff.Pipeline) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, pipe.unet.config.in_channels, 8, 8, generator=g)
    images = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    latents = torch.randn(2, 4, 2, 2, generator=g)
    with torch.no_grad():
        emb = pipe.encode_prompt(PROMPTS)
        post = pipe.vae.encode(images)
        return {
            "emb": emb,
            "eps": pipe.unet(x, torch.tensor([1, 500, 999]), emb),
            "mean": post.mean,
            "std": post.std,
            "decoded": pipe.vae.decode(latents),
        }


def assert_same_outputs(ours: dict, ref: dict, rtol: float = 1e-5) -> None:
    for key in ref:
        assert_rel_close(ours[key], ref[key], rtol)


@pytest.fixture(scope="module")
def reference(diffusers_dir: Path):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(diffusers_dir)
    return reference_outputs(ref.unet, ref.vae, ref.text_encoder, ref.tokenizer)


def test_diffusers_folder_matches_reference(diffusers_dir: Path, reference) -> None:
    pipe = latentdiff.load(diffusers_dir)
    assert pipe.encode_prompt(PROMPTS).shape == (3, 77, 128)
    assert_same_outputs(our_outputs(pipe), reference)


def test_saved_folder_loads_in_diffusers(diffusers_dir: Path, reference, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    latentdiff.load(diffusers_dir).save(tmp_path / "saved")
    ref = StableDiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert_same_outputs(reference_outputs(ref.unet, ref.vae, ref.text_encoder, ref.tokenizer), reference, rtol=0)
    assert_same_outputs(our_outputs(latentdiff.load(tmp_path / "saved")), reference)


def test_single_file_round_trip_is_lossless(diffusers_dir: Path, reference, tmp_path: Path) -> None:
    pipe = latentdiff.load(diffusers_dir)
    first = tmp_path / "model.safetensors"
    pipe.save(first)
    assert any(k.startswith("model.diffusion_model.") for k in read_state_dict(first))
    with pytest.raises(CheckpointError, match="tokenizer"):
        latentdiff.load(first)
    again = latentdiff.load(first, tokenizer=diffusers_dir / "tokenizer")
    assert_same_outputs(our_outputs(again), reference)
    second = tmp_path / "again.safetensors"
    again.save(second)
    a, b = read_state_dict(first), read_state_dict(second)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ckpt_with_extras_loads_safely(diffusers_dir: Path, reference, tmp_path: Path) -> None:
    pipe = latentdiff.load(diffusers_dir)
    pipe.save(tmp_path / "m.safetensors")
    sd = read_state_dict(tmp_path / "m.safetensors")
    sd["model_ema.decay"] = torch.tensor(0.999)
    sd["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    torch.save({"state_dict": sd, "global_step": 470000}, tmp_path / "m.ckpt")
    with pytest.warns(UserWarning, match="ignored 2"):
        pipe2 = latentdiff.load(tmp_path / "m.ckpt", tokenizer=diffusers_dir / "tokenizer")
    assert_same_outputs(our_outputs(pipe2), reference)


def test_bin_weights_and_fp16_variant(tokenizer_dir: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    parts = tiny_diffusers_components(tokenizer_dir)
    ref = reference_outputs(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"])
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "unet" / "diffusion_pytorch_model.bin").is_file()
    assert_same_outputs(our_outputs(latentdiff.load(tmp_path / "bin")), ref)

    pipe.to(torch.float16).save_pretrained(tmp_path / "fp16", variant="fp16")
    assert (tmp_path / "fp16" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded = latentdiff.load(tmp_path / "fp16", variant="fp16")  # cast up to float32 on load
    assert loaded.dtype == torch.float32
    assert_same_outputs(our_outputs(loaded), ref, rtol=2e-2)
    half = latentdiff.load(tmp_path / "fp16", dtype=torch.float16)
    assert half.dtype == torch.float16 and half.vae.decoder.conv_in.weight.dtype == torch.float16


def test_load_component_and_vae_swap(diffusers_dir: Path, tmp_path: Path, reference) -> None:
    unet = latentdiff.load_component(diffusers_dir / "unet")
    assert type(unet).__name__ == "UNet2DCondition"
    tok = latentdiff.load_component(diffusers_dir / "tokenizer")
    assert tok.model_max_length == 77
    vae_file = latentdiff.load_component(diffusers_dir / "vae" / "diffusion_pytorch_model.safetensors")
    assert type(vae_file).__name__ == "AutoencoderKL"

    # A stand-alone VAE in the original layout (as ft-mse VAEs are shipped), with its decoder perturbed.
    pipe = latentdiff.load(diffusers_dir)
    vae_sd = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    vae_sd["decoder.conv_out.bias"] += 0.5
    original = single_file.vae_to_original(vae_sd, pipe.vae.config)
    lone = {k.removeprefix("first_stage_model."): v for k, v in original.items()}
    write_safetensors(lone, tmp_path / "vae-ft.safetensors")
    swapped = latentdiff.load(diffusers_dir, vae=tmp_path / "vae-ft.safetensors")
    out = our_outputs(swapped)
    assert_rel_close(out["decoded"] - 0.5, reference["decoded"])
    assert_rel_close(out["eps"], reference["eps"])

    with pytest.raises(CheckpointError, match="whole pipeline"):
        pipe.save(tmp_path / "whole.safetensors")
        latentdiff.load_component(tmp_path / "whole.safetensors")


def test_errors_name_the_problem(diffusers_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such model"):
        latentdiff.load(tmp_path / "nowhere")

    bad = tmp_path / "bad"
    shutil.copytree(diffusers_dir, bad)
    weights = bad / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        latentdiff.load(bad)
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        latentdiff.load(bad)

    sd = read_state_dict(diffusers_dir / "unet" / "diffusion_pytorch_model.safetensors")
    sd.pop("conv_in.bias")
    sd["extra.weight"] = torch.zeros(1)
    write_safetensors(sd, weights)
    with pytest.raises(CheckpointError, match=r"missing key\(s\): conv_in.bias.*unexpected key\(s\): extra.weight"):
        latentdiff.load(bad)

    shutil.copy(diffusers_dir / "unet" / "diffusion_pytorch_model.safetensors", weights)
    config = json.loads((bad / "unet" / "config.json").read_text())
    config["cross_attention_dim"] = 48
    (bad / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        latentdiff.load(bad)

    (bad / "unet" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt JSON"):
        latentdiff.load(bad)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": {"x": Evil()}}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="weights_only"):
        latentdiff.load(tmp_path / "evil.ckpt", tokenizer=diffusers_dir / "tokenizer")

    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="unknown weight file type"):
        latentdiff.load(tmp_path / "notes.txt", tokenizer=diffusers_dir / "tokenizer")

    write_safetensors({"foo": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not an SD 1.x"):
        latentdiff.load(tmp_path / "other.safetensors", tokenizer=diffusers_dir / "tokenizer")


def test_inpainting_single_file_is_detected(diffusers_inpaint_dir: Path, tmp_path: Path) -> None:
    pipe = latentdiff.load(diffusers_inpaint_dir)
    assert pipe.unet.config.in_channels == 9
    pipe.save(tmp_path / "inpaint.safetensors")
    again = latentdiff.load(tmp_path / "inpaint.safetensors", tokenizer=diffusers_inpaint_dir / "tokenizer")
    assert again.unet.config.in_channels == 9
