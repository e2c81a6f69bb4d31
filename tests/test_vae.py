"""AutoencoderKL against diffusers' implementation (a test-only oracle) on tiny random configs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from latentdiff.models.config import ConfigError
from latentdiff.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig, _tiled

diffusers = pytest.importorskip("diffusers")

TINY = dict(
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[32, 64],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)
THREE = dict(
    TINY,
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[16, 32, 32],
)


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    """Max error relative to the reference's scale, and elementwise closeness."""
    assert actual.shape == expected.shape
    scale = expected.abs().max().clamp(min=1.0)
    err = ((actual - expected).abs().max() / scale).item()
    assert err < tol, f"relative max error {err:.3g} >= {tol}"
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale.item())


def _make_reference(folder, kwargs, seed=0):
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKL(**kwargs).eval()
    # Random GroupNorm affine and biases too, so a wrong parameter mapping cannot hide behind 1/0 defaults.
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    ref.save_pretrained(folder, safe_serialization=True)
    return ref


def _load_ours(folder) -> AutoencoderKL:
    config = VAEConfig.load(folder / "config.json")
    model = AutoencoderKL(config).eval()
    model.load_state_dict(load_file(folder / "diffusion_pytorch_model.safetensors"), strict=True)
    return model


@pytest.fixture(scope="module", params=["tiny", "three"])
def pair(request, tmp_path_factory):
    kwargs = TINY if request.param == "tiny" else THREE
    folder = tmp_path_factory.mktemp(f"vae_{request.param}")
    ref = _make_reference(folder, kwargs)
    return ref, _load_ours(folder), folder


def _images(b=2, h=32, w=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


# ---- config ------------------------------------------------------------------------------


def test_config_reads_diffusers_json(pair):
    ref, ours, folder = pair
    data = json.loads((folder / "config.json").read_text())
    cfg = ours.config
    assert cfg.block_out_channels == tuple(data["block_out_channels"])
    assert cfg.down_block_types == tuple(data["down_block_types"])
    assert cfg.scaling_factor == data["scaling_factor"] == ref.config.scaling_factor
    assert ours.downsample_factor == 2 ** (len(data["block_out_channels"]) - 1)
    assert ours.scaling_factor == 0.18215
    for key, value in cfg.to_dict().items():
        if key != "_class_name":
            expected = data[key]
            assert (list(value) if isinstance(value, tuple) else value) == expected, key


def test_presets():
    sd = VAEConfig.sd15()
    assert sd.block_out_channels == (128, 256, 512, 512)
    assert sd.layers_per_block == 2 and sd.latent_channels == 4 and sd.norm_num_groups == 32
    assert sd.sample_size == 512 and sd.scaling_factor == 0.18215 and sd.shift_factor is None
    assert sd.downsample_factor == 8
    assert VAEConfig.tiny().downsample_factor == 2
    assert VAEConfig.from_dict(sd.to_dict()) == sd


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(down_block_types=("AttnDownEncoderBlock2D", "DownEncoderBlock2D")), "AttnDownEncoderBlock2D"),
        (dict(up_block_types=("UpDecoderBlock2D",)), "up_block_types"),
        (dict(act_fn="gelu"), "act_fn"),
        (dict(norm_num_groups=12), "norm_num_groups"),
    ],
)
def test_validate_rejects(change, match):
    with pytest.raises(ConfigError, match=match):
        VAEConfig.tiny().replace(**change).validate()


def test_sd15_parameter_count():
    with torch.device("meta"):
        ours = AutoencoderKL(VAEConfig.sd15())
        kwargs = {k: v for k, v in VAEConfig.sd15().to_dict().items() if not k.startswith("_")}
        ref = diffusers.AutoencoderKL(**kwargs)
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(p.numel() for p in ref.parameters()) == 83_653_863
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


# ---- numerics against diffusers --------------------------------------------------------------


@torch.no_grad()
def test_encode_matches(pair):
    ref, ours, _ = pair
    x = _images()
    post, ref_post = ours.encode(x), ref.encode(x).latent_dist
    assert isinstance(post, DiagonalGaussian)
    assert post.mean.shape == (2, 4, 32 // ours.downsample_factor, 32 // ours.downsample_factor)
    _close(post.mean, ref_post.mean)
    _close(post.logvar, ref_post.logvar)
    _close(post.std, ref_post.std)
    _close(post.var, ref_post.var)
    assert torch.equal(post.mode(), post.mean)
    _close(post.kl(), ref_post.kl())


@torch.no_grad()
def test_decode_matches(pair):
    ref, ours, _ = pair
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 4, 8, 8, generator=g)
    out = ours.decode(z)
    assert out.shape == (2, 3, 8 * ours.downsample_factor, 8 * ours.downsample_factor)
    _close(out, ref.decode(z).sample)


@torch.no_grad()
def test_posterior_sample_matches(pair):
    ref, ours, _ = pair
    x = _images(b=1)
    ours_z = ours.encode(x).sample(torch.Generator("cpu").manual_seed(0))
    ref_z = ref.encode(x).latent_dist.sample(generator=torch.Generator("cpu").manual_seed(0))
    _close(ours_z, ref_z)
    rec = ours(x, generator=torch.Generator("cpu").manual_seed(0), sample_posterior=True)
    ref_rec = ref(x, sample_posterior=True, generator=torch.Generator("cpu").manual_seed(0)).sample
    _close(rec.sample, ref_rec)
    _close(ours(x).sample, ref(x).sample)  # mode


@torch.no_grad()
def test_non_square(pair):
    ref, ours, _ = pair
    x = _images(b=1, h=48, w=32)
    post = ours.encode(x)
    f = ours.downsample_factor
    assert post.mean.shape == (1, 4, 48 // f, 32 // f)
    _close(post.mean, ref.encode(x).latent_dist.mean)
    _close(ours.decode(post.mean), ref.decode(post.mean).sample)


def test_bad_size_raises(pair):
    _, ours, _ = pair
    f = ours.downsample_factor
    with pytest.raises(ValueError, match=rf"{32 + f - 1}x32.*factor {f}"):
        ours.encode(_images(b=1, h=32 + f - 1, w=32))
    with pytest.raises(ValueError, match="shape"):
        ours.decode(torch.zeros(1, 3, 4, 4))


@torch.no_grad()
def test_our_folder_loads_into_diffusers(tmp_path):
    torch.manual_seed(3)
    ours = AutoencoderKL(VAEConfig.from_dict(THREE)).eval()
    ours.config.save(tmp_path / "config.json")
    save_file(ours.state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    ref = diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()
    x = _images(b=1, h=32, w=48)
    _close(ours.encode(x).mean, ref.encode(x).latent_dist.mean)
    _close(ours(x).sample, ref(x).sample)


@pytest.mark.parametrize(
    "change", [dict(mid_block_add_attention=False), dict(use_quant_conv=False, use_post_quant_conv=False)]
)
@torch.no_grad()
def test_variants(tmp_path, change):
    ref = _make_reference(tmp_path, dict(TINY, **change))
    ours = _load_ours(tmp_path)
    x = _images(b=1)
    _close(ours(x).sample, ref(x).sample)


def test_scale_latents_roundtrip():
    vae = AutoencoderKL(VAEConfig.tiny())
    z = torch.randn(1, 4, 4, 4)
    torch.testing.assert_close(vae.scale_latents(z), z * 0.18215)
    torch.testing.assert_close(vae.unscale_latents(vae.scale_latents(z)), z)


def test_gradient_checkpointing_same_grads():
    torch.manual_seed(4)
    vae = AutoencoderKL(VAEConfig.tiny())
    x = _images(b=1, h=16, w=16).requires_grad_()
    out = vae(x)
    (out.sample.square().mean() + out.posterior.kl().mean()).backward()
    expected = x.grad.clone()
    x.grad = None
    vae.set_gradient_checkpointing(True)
    out = vae(x)
    (out.sample.square().mean() + out.posterior.kl().mean()).backward()
    torch.testing.assert_close(x.grad, expected)


# ---- tiling ------------------------------------------------------------------------------


@pytest.mark.parametrize("length, tile, overlap", [(40, 16, 4), (64, 32, 16), (18, 16, 2), (16, 16, 4)])
def test_tile_blend_is_exact_for_local_maps(length, tile, overlap):
    """The blend weights sum to one and tiles land where they belong: a map without
    padding or global statistics (pooling, nearest upsampling) tiles exactly."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, length, length + 8, generator=g)
    down = lambda t: F.avg_pool2d(t, 2)  # noqa: E731
    up = lambda t: F.interpolate(t, scale_factor=4, mode="nearest")  # noqa: E731
    torch.testing.assert_close(_tiled(down, x, tile, overlap, 1 / 2, 2), down(x))
    torch.testing.assert_close(_tiled(up, x, tile // 2, overlap // 2, 4, 1), up(x))


@torch.no_grad()
def test_tiled_close_to_untiled():
    """On a random model with stationary input, tiling changes little (GroupNorm statistics and
    zero padding are per tile), and no more than diffusers' enable_tiling does with the same tiles."""
    torch.manual_seed(6)
    cfg = VAEConfig.tiny()
    vae = AutoencoderKL(cfg).eval()
    ref = diffusers.AutoencoderKL(**{k: v for k, v in cfg.to_dict().items() if not k.startswith("_")}).eval()
    ref.load_state_dict(vae.state_dict())
    ref.enable_tiling()
    ref.tile_overlap_factor = 0.5

    def rel(a, b):
        return ((a - b).abs().mean() / b.abs().mean()).item()

    x = _images(b=1, h=96, w=64)
    full = vae.encode(x).mean
    tiled = vae.encode_tiled(x, tile=48, overlap=24).mean
    assert tiled.shape == full.shape == (1, 4, 48, 32)
    ref.tile_sample_min_size, ref.tile_latent_min_size = 48, 24
    assert rel(tiled, full) < 0.1
    assert rel(tiled, full) <= rel(ref.encode(x).latent_dist.mean, full)

    z = torch.randn(1, 4, 40, 24, generator=torch.Generator().manual_seed(9))
    full = vae.decode(z)
    tiled = vae.decode_tiled(z, tile=24, overlap=12)
    assert tiled.shape == full.shape == (1, 3, 80, 48)
    ref.tile_sample_min_size, ref.tile_latent_min_size = 48, 24
    assert rel(tiled, full) < 0.15
    assert rel(tiled, full) <= rel(ref.decode(z).sample, full)


@torch.no_grad()
def test_tiled_single_tile_is_exact():
    torch.manual_seed(7)
    vae = AutoencoderKL(VAEConfig.tiny()).eval()
    x = _images(b=1, h=32, w=32)
    torch.testing.assert_close(vae.encode_tiled(x, tile=64, overlap=16).mean, vae.encode(x).mean)
    z = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(vae.decode_tiled(z, tile=8, overlap=2), vae.decode(z))


def test_tiled_rejects_bad_tiles():
    vae = AutoencoderKL(VAEConfig.tiny())
    with pytest.raises(ValueError, match="multiples of 2"):
        vae.encode_tiled(_images(b=1), tile=31, overlap=8)
    with pytest.raises(ValueError, match="overlap"):
        vae.decode_tiled(torch.zeros(1, 4, 8, 8), tile=4, overlap=4)
