"""Prepacked convolutions: the same results as nn.Conv2d, rebuilt when weights change, plain for training."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import latentdiff
from latentdiff.speed import PrepackedConv2d, is_prepacked, prepack_convolutions, unpack_convolutions
from latentdiff.speed.prepack import packed_dtypes

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")


def packed_layers(module: nn.Module) -> list[PrepackedConv2d]:
    return [m for m in module.modules() if isinstance(m, PrepackedConv2d) and m._packed is not None]


def unet_inputs(pipe: latentdiff.Pipeline):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, pipe.text_encoder.config.hidden_size, generator=g)
    return x, torch.tensor([500.0, 20.0]), ctx


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_prepacked_unet_equals_plain(diffusers_dir: Path, dtype: torch.dtype, rtol: float) -> None:
    pipe = latentdiff.load(diffusers_dir, dtype=dtype)
    assert is_prepacked(pipe.unet) and is_prepacked(pipe.vae)
    x, t, ctx = unet_inputs(pipe)
    with torch.no_grad():
        packed = pipe.unet(x, t, ctx)
        # bfloat16 is packed only where oneDNN runs it (AVX512-BW/VL/DQ); elsewhere every layer falls back
        assert bool(packed_layers(pipe.unet)) == (dtype in packed_dtypes()), "packed path taken or missed wrongly"
        plain = unpack_convolutions(copy.deepcopy(pipe.unet))(x, t, ctx)
    assert not is_prepacked(unpack_convolutions(copy.deepcopy(pipe.unet)))
    err = ((packed.float() - plain.float()).norm() / plain.float().norm()).item()
    assert err <= rtol, err


def test_the_cache_follows_weight_changes(diffusers_dir: Path, tmp_path: Path) -> None:
    """A LoRA merged into the weights in place (LoCon convs included) is seen at once."""
    from test_lora import kohya_file, random_lora

    pipe = latentdiff.load(diffusers_dir)
    x, t, ctx = unet_inputs(pipe)
    with torch.no_grad():
        before = pipe.unet(x, t, ctx)
        pipe.load_lora(kohya_file(random_lora(pipe, seed=1), tmp_path / "l.safetensors"))
        merged = pipe.unet(x, t, ctx)
        reference = unpack_convolutions(copy.deepcopy(pipe.unet))(x, t, ctx)
        pipe.unload_lora()
        after = pipe.unet(x, t, ctx)
    assert ((merged - reference).norm() / reference.norm()).item() <= 1e-5
    assert torch.equal(before, after)


def test_training_takes_the_plain_path() -> None:
    conv = prepack_convolutions(nn.Sequential(nn.Conv2d(64, 64, 3, padding=1)))[0]
    x = torch.randn(1, 64, 4, 4, requires_grad=True)
    conv(x).sum().backward()
    assert conv._packed is None and conv.weight.grad is not None and x.grad is not None
    with torch.no_grad():
        y = conv(x)
    assert conv._packed is not None
    assert torch.allclose(y, nn.functional.conv2d(x, conv.weight, conv.bias, padding=1), rtol=1e-5, atol=1e-5)
    conv.to(torch.bfloat16)
    assert conv._packed is None
