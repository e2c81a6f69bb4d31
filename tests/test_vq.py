"""The VQ autoencoder against diffusers' VQModel on random weights: encode, quantise, decode, the
quantiser loss and indices, codebook lookup; loading a diffusers folder; a pipeline using it."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import pytest
import torch
from conftest import assert_rel_close

import latentdiff
from latentdiff.loading import load_component
from latentdiff.models.config import ConfigError
from latentdiff.models.vq import VQConfig, VQModel

SETTINGS = dict(
    block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1, latent_channels=4, norm_num_groups=8, num_vq_embeddings=64, vq_embed_dim=3, sample_size=32,
    scaling_factor=0.5,
)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[diffusers.VQModel, VQModel, Path]:
    """diffusers' VQModel with random weights (a spread-out codebook), saved and loaded by latentdiff."""
    torch.manual_seed(0)
    ref = diffusers.VQModel(**SETTINGS).eval()
    with torch.no_grad():
        ref.quantize.embedding.weight.normal_()  # codes as spread as the latents, so many are used
    folder = tmp_path_factory.mktemp("vq")
    ref.save_pretrained(folder)
    ours = load_component(folder)
    assert isinstance(ours, VQModel)
    return ref, ours.eval(), folder


def images(seed: int = 1) -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_config_round_trip_and_state_dict_keys(pair) -> None:
    ref, ours, folder = pair
    assert set(ours.state_dict()) == set(ref.state_dict())
    config = json.loads((folder / "config.json").read_text())
    assert VQConfig.from_dict(config) == ours.config and ours.config.code_dim == 3 and ours.latent_channels == 3
    assert ours.downsample_factor == 2


def test_encode_quantise_decode_match_diffusers(pair) -> None:
    ref, ours, _ = pair
    x = images()
    with torch.no_grad():
        theirs_h = ref.encode(x).latents
        ours_h = ours.encode(x).mode()
        assert_rel_close(ours_h, theirs_h, 1e-5)
        q_theirs, loss_theirs, (_, _, idx_theirs) = ref.quantize(theirs_h)
        q_ours = ours.quantize(theirs_h)
        assert torch.equal(q_ours.indices, idx_theirs.reshape(-1))
        assert len(q_ours.indices.unique()) > 5  # several codes in use: a real test of the nearest-code search
        assert_rel_close(q_ours.latents, q_theirs, 1e-6)
        assert q_ours.loss.item() == pytest.approx(loss_theirs.item(), rel=1e-5)
        assert_rel_close(ours.decode(theirs_h), ref.decode(theirs_h).sample, 1e-5)
        assert_rel_close(ours.decode(theirs_h, quantize=False), ref.decode(theirs_h, force_not_quantize=True).sample,
                         1e-5)
        out = ours(x)
        assert_rel_close(out.sample, ref(x).sample, 1e-5)


def test_codebook_lookup_matches_diffusers(pair) -> None:
    ref, ours, _ = pair
    indices = torch.randint(0, 64, (2 * 16 * 16,), generator=torch.Generator().manual_seed(2))
    shape = (2, 16, 16, 3)
    with torch.no_grad():
        expected = ref.decoder(ref.post_quant_conv(ref.quantize.get_codebook_entry(indices, shape)))
        assert_rel_close(ours.decode_indices(indices, shape), expected, 1e-5)


def test_straight_through_gradient_and_loss_terms() -> None:
    torch.manual_seed(3)
    vq = VQModel(VQConfig(**SETTINGS))
    z = torch.randn(1, 3, 4, 4, requires_grad=True)
    q = vq.quantize(z)
    q.latents.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # straight through: d z_q / d z = I
    codes = vq.quantize.embedding.weight[q.indices].view(1, 4, 4, 3).permute(0, 3, 1, 2)
    expected = (1 + 0.25) * ((codes - z) ** 2).mean()
    assert q.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_pipeline_generates_with_a_vq_autoencoder(pair, diffusers_dir: Path) -> None:
    """The LDM convention: the UNet works on the pre-quantisation latents, the decoder quantises.
    A UNet with the code dimension's channels generates through the VQ autoencoder, as diffusers'
    StableDiffusionPipeline does with the same VQModel."""
    ref_vq, ours_vq, _ = pair
    pipe = latentdiff.load(diffusers_dir)
    unet_config = pipe.unet.config.replace(in_channels=3, out_channels=3)
    from latentdiff.models.unet import UNet2DCondition

    torch.manual_seed(4)
    pipe.unet = UNet2DCondition(unet_config).eval()
    pipe.vae = ours_vq
    ours = pipe.txt2img("a red circle", steps=3, seed=5, sampler="ddim", width=32, height=32, output_type="latent")
    assert ours.shape == (1, 3, 16, 16)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(diffusers_dir, safety_checker=None)
    ref.unet = diffusers.UNet2DConditionModel(**{**dict(ref.unet.config), "in_channels": 3, "out_channels": 3})
    ref.unet.load_state_dict(pipe.unet.state_dict())
    ref.vae = ref_vq
    ref.set_progress_bar_config(disable=True)
    theirs = ref("a red circle", num_inference_steps=3, guidance_scale=7.5, generator=torch.Generator().manual_seed(5),
                 width=32, height=32, output_type="latent").images
    assert_rel_close(ours, theirs, 1e-5)
    image = pipe.txt2img("a red circle", steps=3, seed=5, sampler="ddim", width=32, height=32)[0]
    assert image.size == (32, 32)


def test_unsupported_configs_are_named() -> None:
    with pytest.raises(ConfigError, match="norm_type"):
        VQConfig(**{**SETTINGS, "norm_type": "spatial"}).validate()
    with pytest.raises(ConfigError, match="num_vq_embeddings"):
        VQConfig(**{**SETTINGS, "num_vq_embeddings": 0}).validate()
