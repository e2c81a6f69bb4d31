"""Original (CompVis) single-file layout <-> diffusers layout, against diffusers' own converters."""

from __future__ import annotations

import pytest
import torch

from latentdiff.checkpoints.errors import CheckpointError
from latentdiff.checkpoints.single_file import (
    TEXT_PREFIX,
    TEXT_PREFIX_SHORT,
    UNET_PREFIX,
    VAE_PREFIX,
    infer_configs,
    merge_to_single_file,
    split_single_file,
    text_from_original,
    text_to_original,
    unet_from_original,
    unet_to_original,
    vae_from_original,
    vae_to_original,
)

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)

UNET_CONFIGS = {
    "2level": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ),
    # Equal widths on levels 0 and 1: the first down ResBlock of level 1 has no shortcut conv.
    "3level": dict(
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ),
    "inpaint": dict(
        in_channels=9,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ),
}
VAE_CONFIGS = {
    "2level": dict(block_out_channels=(32, 64), layers_per_block=1),
    "3level": dict(block_out_channels=(32, 32, 64), layers_per_block=2),
}
# (unet, vae) pairs that make a whole single file.
FILES = [("2level", "2level"), ("3level", "3level"), ("inpaint", "2level")]


def _randomize(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A state dict with every tensor random, so a swapped key cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def unets():
    out = {}
    for seed, (name, kw) in enumerate(UNET_CONFIGS.items()):
        model = diffusers.UNet2DConditionModel(
            sample_size=8,
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
            **kw,
        )
        out[name] = (_randomize(model, seed), dict(model.config))
    return out


@pytest.fixture(scope="module")
def vaes():
    out = {}
    for seed, (name, kw) in enumerate(VAE_CONFIGS.items()):
        n = len(kw["block_out_channels"])
        model = diffusers.AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=16,
            **kw,
        )
        out[name] = (_randomize(model, 100 + seed), dict(model.config))
    return out


TEXT_CFG = dict(
    hidden_size=128,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=2,
    vocab_size=99,
    max_position_embeddings=16,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)


@pytest.fixture(scope="module")
def text():
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT_CFG))
    sd = _randomize(model, 200)
    # latentdiff keeps transformers-4's layout; transformers 5 drops the "text_model." prefix.
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# --- oracle: diffusers' converters undo our *_to_original ----------------------------------


@pytest.mark.parametrize("name", UNET_CONFIGS)
def test_unet_to_original_matches_diffusers(unets, name):
    sd, cfg = unets[name]
    orig = unet_to_original(sd, cfg)
    assert all(k.startswith(UNET_PREFIX) for k in orig)
    assert_same(convert_ldm_unet_checkpoint(orig, cfg), sd)


@pytest.mark.parametrize("name", VAE_CONFIGS)
def test_vae_to_original_matches_diffusers(vaes, name):
    sd, cfg = vaes[name]
    orig = vae_to_original(sd, cfg)
    assert all(k.startswith(VAE_PREFIX) for k in orig)
    for part in ("encoder", "decoder"):
        for proj in ("q", "k", "v", "proj_out"):
            assert orig[f"{VAE_PREFIX}{part}.mid.attn_1.{proj}.weight"].ndim == 4  # stored as 1x1 conv
    assert_same(convert_ldm_vae_checkpoint(orig, cfg), sd)  # diffusers squeezes them back to 2-D


def test_text_to_original_matches_diffusers(text):
    orig = text_to_original(text)
    assert all(k.startswith(TEXT_PREFIX) for k in orig)
    assert_same(convert_ldm_clip_checkpoint(orig), text)


# --- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("name", UNET_CONFIGS)
def test_unet_round_trip(unets, name):
    sd, cfg = unets[name]
    assert_same(unet_from_original(unet_to_original(sd, cfg), cfg), sd)


@pytest.mark.parametrize("name", VAE_CONFIGS)
def test_vae_round_trip_accepts_4d_and_2d(vaes, name):
    sd, cfg = vaes[name]
    orig = vae_to_original(sd, cfg)
    assert_same(vae_from_original(orig, cfg), sd)
    flat = {k: (v.reshape(v.shape[:2]) if ".mid.attn_1." in k and v.ndim == 4 else v) for k, v in orig.items()}
    assert_same(vae_from_original(flat, cfg), sd)


def test_text_round_trip_both_prefixes(text):
    orig = text_to_original(text, {"num_hidden_layers": 2})
    assert_same(text_from_original(orig), text)
    short = {TEXT_PREFIX_SHORT + k[len(TEXT_PREFIX):]: v for k, v in orig.items()}
    assert_same(text_from_original(short), text)


@pytest.mark.parametrize("unet_name,vae_name", FILES)
def test_split_recovers_merge(unets, vaes, text, unet_name, vae_name):
    (unet_sd, unet_cfg), (vae_sd, vae_cfg) = unets[unet_name], vaes[vae_name]
    merged = merge_to_single_file(unet_sd, vae_sd, text, unet_cfg, vae_cfg)
    u, v, t, ignored = split_single_file(merged)
    assert_same(u, unet_sd)
    assert_same(v, vae_sd)
    assert_same(t, text)
    assert ignored == []


def test_split_ignores_non_weights_and_short_text_prefix(unets, vaes, text, tmp_path):
    from safetensors.torch import load_file, save_file

    (unet_sd, unet_cfg), (vae_sd, vae_cfg) = unets["2level"], vaes["2level"]
    merged = merge_to_single_file(unet_sd, vae_sd, text, unet_cfg, vae_cfg)
    # Some files keep the text model one level up, without "text_model.".
    merged = {k.replace(TEXT_PREFIX, TEXT_PREFIX_SHORT, 1): v for k, v in merged.items()}
    extras = {
        "model_ema.decay": torch.tensor(0.999),
        "model_ema.diffusion_modelinput_blocks00weight": torch.zeros(1),
        "alphas_cumprod": torch.zeros(3),
        "alphas_cumprod_prev": torch.zeros(3),
        "betas": torch.zeros(3),
        "posterior_variance": torch.zeros(3),
        "log_one_minus_alphas_cumprod": torch.zeros(3),
        "sqrt_recipm1_alphas_cumprod": torch.zeros(3),
        "logvar": torch.zeros(3),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(16)[None],
    }
    path = tmp_path / "model.safetensors"
    save_file({**merged, **extras}, str(path))
    u, v, t, ignored = split_single_file(load_file(str(path)))
    assert_same(u, unet_sd)
    assert_same(v, vae_sd)
    assert_same(t, text)
    assert ignored == sorted(extras)
    # .ckpt files nest the weights under "state_dict".
    assert_same(split_single_file({"state_dict": merged, "global_step": 1})[0], unet_sd)


# --- infer_configs ------------------------------------------------------------------------

UNET_INFERRED = (
    "in_channels", "out_channels", "block_out_channels", "layers_per_block",
    "down_block_types", "up_block_types", "cross_attention_dim", "attention_head_dim",
)
VAE_INFERRED = (
    "in_channels", "out_channels", "latent_channels", "block_out_channels",
    "layers_per_block", "down_block_types", "up_block_types",
)


def _norm(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("unet_name,vae_name", FILES)
def test_infer_configs(unets, vaes, text, unet_name, vae_name):
    (unet_sd, unet_cfg), (vae_sd, vae_cfg) = unets[unet_name], vaes[vae_name]
    cfgs = infer_configs(merge_to_single_file(unet_sd, vae_sd, text, unet_cfg, vae_cfg))
    for key in UNET_INFERRED:
        assert _norm(cfgs["unet"][key]) == _norm(unet_cfg[key]), key
    assert cfgs["unet"]["use_linear_projection"] is False
    assert cfgs["unet"]["norm_num_groups"] == 32  # not in the shapes: SD 1.x default
    for key in VAE_INFERRED:
        assert _norm(cfgs["vae"][key]) == _norm(vae_cfg[key]), key
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "max_position_embeddings"):
        assert cfgs["text_encoder"][key] == TEXT_CFG[key], key
    assert cfgs["text_encoder"]["num_attention_heads"] == TEXT_CFG["hidden_size"] // 64


# --- errors -------------------------------------------------------------------------------


def test_dropped_and_extra_keys_are_named(unets, vaes, text):
    sd, cfg = unets["3level"]
    orig = unet_to_original(sd, cfg)
    dropped = f"{UNET_PREFIX}output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight"
    with pytest.raises(CheckpointError, match=r"missing keys 1: .*output_blocks\.5\.1\.transformer_blocks\.0\.attn2"):
        unet_from_original({k: v for k, v in orig.items() if k != dropped}, cfg)
    with pytest.raises(CheckpointError, match=r"unexpected keys 1: model\.diffusion_model\.extra\.weight"):
        unet_from_original({**orig, f"{UNET_PREFIX}extra.weight": torch.zeros(1)}, cfg)
    with pytest.raises(CheckpointError, match="missing keys 1: down_blocks.0.resnets.0.conv1.bias"):
        unet_to_original({k: v for k, v in sd.items() if k != "down_blocks.0.resnets.0.conv1.bias"}, cfg)

    vsd, vcfg = vaes["2level"]
    with pytest.raises(CheckpointError, match=r"unexpected keys 1: decoder\.up_blocks\.9\.resnets\.0\.conv1\.weight"):
        vae_to_original({**vsd, "decoder.up_blocks.9.resnets.0.conv1.weight": torch.zeros(1)}, vcfg)
    vorig = vae_to_original(vsd, vcfg)
    with pytest.raises(CheckpointError, match=r"first_stage_model\.encoder\.mid\.attn_1\.q\.bias"):
        vae_from_original({k: v for k, v in vorig.items() if not k.endswith("mid.attn_1.q.bias")}, vcfg)

    torig = text_to_original(text)
    with pytest.raises(CheckpointError, match=r"missing keys 1: .*encoder\.layers\.0\.mlp\.fc1\.bias"):
        text_from_original({k: v for k, v in torig.items() if not k.endswith("layers.0.mlp.fc1.bias")})

    # Through the whole file: an unknown top-level key, and a truncated UNet (count + "more").
    merged = merge_to_single_file(sd, *vaes["3level"][:1], text, cfg, vaes["3level"][1])
    with pytest.raises(CheckpointError, match=r"unexpected keys 1: some_adapter\.weight"):
        split_single_file({**merged, "some_adapter.weight": torch.zeros(1)})
    truncated = {k: v for k, v in merged.items() if not k.startswith(f"{UNET_PREFIX}output_blocks.5.1.")}
    with pytest.raises(CheckpointError, match=r"missing keys 26: .*\(16 more\)"):
        split_single_file(truncated)


def test_non_sd_file_is_rejected():
    with pytest.raises(CheckpointError, match="not an SD 1.x single-file checkpoint"):
        split_single_file({"encoder.conv_in.weight": torch.zeros(1), "lora_up.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="not an SD 1.x single-file checkpoint"):
        infer_configs({})
