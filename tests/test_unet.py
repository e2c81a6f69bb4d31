"""UNet2DCondition against diffusers' UNet2DConditionModel (test-only oracle)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from latentdiff.models.config import ConfigError
from latentdiff.models.unet import UNet2DCondition, UNetConfig

diffusers = pytest.importorskip("diffusers")

# A two-level toy of SD 1.x, written as diffusers keyword arguments.
BASE = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
THREE_LEVELS = dict(
    BASE,
    block_out_channels=(16, 32, 32),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    attention_head_dim=4,
)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (diffusers zero-inits nothing here, but norms start at 1/0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _reference_and_ours(tmp_path, seed: int = 0, **kwargs):
    """Build a random diffusers UNet, save it, load it into ours from disk."""
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel(**kwargs).eval()
    _randomise(ref, seed)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    config = UNetConfig.load(tmp_path / "config.json")
    ours = UNet2DCondition(config).eval()
    ours.load_state_dict(load_file(tmp_path / "diffusion_pytorch_model.safetensors"), strict=True)
    return ref, ours


def _inputs(config_kwargs, batch=2, size=(16, 16), tokens=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, config_kwargs["in_channels"], *size, generator=g)
    context = torch.randn(batch, tokens, config_kwargs["cross_attention_dim"], generator=g)
    return sample, context


def _check(ref, ours, sample, timestep, context):
    with torch.no_grad():
        expected = ref(sample, timestep, context).sample
        got = ours(sample, timestep, context)
    assert isinstance(got, torch.Tensor)
    assert got.shape == expected.shape == (sample.shape[0], ref.config.out_channels, *sample.shape[2:])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name, kwargs, size",
    [
        ("4ch", BASE, (16, 16)),
        ("inpaint-9ch", dict(BASE, in_channels=9), (16, 16)),
        ("3-levels", THREE_LEVELS, (16, 16)),
        ("per-level-heads", dict(BASE, attention_head_dim=(4, 8)), (16, 16)),
        (
            "sd2-style",
            dict(BASE, use_linear_projection=True, upcast_attention=True, transformer_layers_per_block=2),
            (16, 16),
        ),
        ("non-square", BASE, (16, 24)),
        ("odd-size-3-levels", THREE_LEVELS, (10, 14)),
        ("odd-size-2-levels", BASE, (13, 7)),
        ("downsample-padding-0", dict(BASE, downsample_padding=0), (13, 16)),
        ("center-input", dict(BASE, center_input_sample=True), (8, 8)),
        ("per-level-layers", dict(BASE, layers_per_block=(1, 2)), (8, 8)),
    ],
)
def test_matches_diffusers(tmp_path, name, kwargs, size):
    ref, ours = _reference_and_ours(tmp_path, **kwargs)
    sample, context = _inputs(kwargs, size=size)
    _check(ref, ours, sample, torch.tensor([10, 900]), context)


def test_timestep_forms(tmp_path):
    ref, ours = _reference_and_ours(tmp_path, **BASE)
    sample, context = _inputs(BASE, size=(8, 8))
    for timestep in (torch.tensor(500), torch.tensor([500]), 500, 499.5, torch.tensor([1.5, 999.0])):
        _check(ref, ours, sample, timestep, context)
    with torch.no_grad():
        by_sample = ours(sample, torch.tensor([500, 500]), context)
        scalar = ours(sample, 500, context)
    torch.testing.assert_close(by_sample, scalar, rtol=0, atol=0)


def test_reverse_loads_into_diffusers(tmp_path):
    config = UNetConfig.tiny().replace(attention_head_dim=(4, 8), sample_size=8)
    torch.manual_seed(3)
    ours = UNet2DCondition(config).eval()
    _randomise(ours, 3)
    config.save(tmp_path / "config.json")
    ref = diffusers.UNet2DConditionModel.from_config(json.loads((tmp_path / "config.json").read_text())).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    sample, context = _inputs(config.to_dict(), size=(8, 8))
    _check(ref, ours, sample, torch.tensor([3, 700]), context)


def test_state_dict_keys_are_diffusers_keys():
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**THREE_LEVELS)
    ours = UNet2DCondition(UNetConfig.from_dict(dict(THREE_LEVELS)))
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    # Same keys and shapes (registration order differs only inside Transformer2DModel).
    assert {k: v.shape for k, v in our_sd.items()} == {k: v.shape for k, v in ref_sd.items()}


@pytest.mark.parametrize(
    "config, expected",
    [(UNetConfig.sd15(), 859_520_964), (UNetConfig.sd15_inpaint(), 859_535_364)],
)
def test_sd15_parameter_count(config, expected):
    with torch.device("meta"):
        ours = UNet2DCondition(config)
        ref = diffusers.UNet2DConditionModel(**{k: v for k, v in config.to_dict().items() if k != "_class_name"})
    count = sum(p.numel() for p in ours.parameters())
    assert count == expected == sum(p.numel() for p in ref.parameters())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_strict_loading_names_missing_keys():
    ours = UNet2DCondition(UNetConfig.tiny())
    sd = ours.state_dict()
    del sd["mid_block.attentions.0.proj_in.weight"]
    with pytest.raises(RuntimeError, match="mid_block.attentions.0.proj_in.weight"):
        ours.load_state_dict(sd, strict=True)


def test_config_round_trip(tmp_path):
    config = UNetConfig.tiny().replace(attention_head_dim=(4, 8), only_cross_attention=(False, False))
    config.save(tmp_path / "config.json")
    assert UNetConfig.load(tmp_path / "config.json") == config
    assert UNetConfig.sd15().heads_per_level() == (8, 8, 8, 8)
    assert UNetConfig.sd15().replace(attention_head_dim=(5, 10, 20, 20)).heads_per_level() == (5, 10, 20, 20)


@pytest.mark.parametrize(
    "changes, word",
    [
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        ({"addition_embed_type": "text_time"}, "addition_embed_type"),
        ({"down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]}, "SimpleCrossAttnDownBlock2D"),
        ({"up_block_types": ["UpBlock2D", "AttnUpBlock2D"]}, "AttnUpBlock2D"),
        ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type"),
        ({"mid_block_type": None}, "mid_block_type"),
        ({"flip_sin_to_cos": False}, "flip_sin_to_cos"),
        ({"freq_shift": 1}, "freq_shift"),
        ({"only_cross_attention": True}, "only_cross_attention"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
        ({"time_embedding_type": "fourier"}, "time_embedding_type"),
        ({"act_fn": "gelu"}, "act_fn"),
        ({"mid_block_scale_factor": 2}, "mid_block_scale_factor"),
        ({"num_class_embeds": 10}, "num_class_embeds"),
        ({"conv_in_kernel": 7}, "conv_in_kernel"),
        ({"time_cond_proj_dim": 0}, "time_cond_proj_dim"),  # supported (LCM-distilled UNets) when > 0
        ({"encoder_hid_dim": 1024}, "encoder_hid_dim"),
        ({"attention_head_dim": [8, 8, 8]}, "attention heads"),
        ({"attention_head_dim": 7}, "attention heads"),
        ({"norm_num_groups": 24}, "norm_num_groups"),
        ({"up_block_types": ["UpBlock2D"]}, "one down and one up block"),
    ],
)
def test_validation_errors(changes, word):
    data = dict(UNetConfig.tiny().to_dict(), **changes)
    with pytest.raises(ConfigError, match=word):
        UNetConfig.from_dict(data)


def test_validation_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="missing"):
        UNetConfig.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="corrupt"):
        UNetConfig.load(tmp_path / "bad.json")


def test_unused_diffusers_keys_at_default_are_accepted():
    data = dict(UNetConfig.tiny().to_dict(), dropout=0.0, dual_cross_attention=False, _diffusers_version="0.42.1")
    assert UNetConfig.from_dict(data) == UNetConfig.tiny()


def test_low_precision_weights_with_fp32_input():
    torch.manual_seed(0)
    ours = UNet2DCondition(UNetConfig.tiny()).eval()
    sample, context = _inputs(BASE, size=(8, 8))
    with torch.no_grad():
        expected = ours(sample, 10, context)
        ours.to(torch.bfloat16)
        got = ours(sample, torch.tensor([10, 10]), context)
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all()
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = UNet2DCondition(UNetConfig.tiny()).train()
    sample, context = _inputs(BASE, size=(8, 8))

    def grads():
        model.zero_grad()
        model(sample, torch.tensor([5, 50]), context).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    checkpointed = grads()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_bad_batch_sizes_raise():
    model = UNet2DCondition(UNetConfig.tiny()).eval()
    sample, context = _inputs(BASE, size=(8, 8))
    with pytest.raises(ValueError, match="timesteps"):
        model(sample, torch.tensor([1, 2, 3]), context)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(sample, 1, context[:1])
