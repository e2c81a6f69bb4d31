"""TAESD, the tiny distilled autoencoder (diffusers' ``AutoencoderTiny``).

Two plain convolutional stacks of about 1.2 M parameters each, no normalisation and no
attention, that approximate the SD VAE's latent space:

- the encoder maps an image (B, 3, H, W) in [-1, 1] (shifted to [0, 1] inside) straight
  to latents (B, c, H/f, W/f): there is no posterior and no random draw;
- the decoder soft-clamps its input (``tanh(z / 3) * 3``) and returns (B, 3, H, W) in
  about [-1, 1] (computed in [0, 1] inside), unclamped.

The latents are used unscaled (``scaling_factor`` 1.0): ``scale_latents`` and
``unscale_latents`` only multiply and divide by it. (diffusers' own
``AutoencoderTiny.scale_latents`` means something else: the [0, 1] quantisation of its
``forward``, carried here only as the ``latent_magnitude`` / ``latent_shift`` config fields.)

Module names mirror diffusers' state dict (``encoder.layers.1.conv.0.weight``,
``decoder.layers.19.weight`` ...), so an ``AutoencoderTiny`` folder loads by identity. The
original madebyollin files (``taesd_encoder.pth`` / ``taesd_decoder.pth``, or
``.safetensors``) are ``nn.Sequential`` state dicts with the same layers: the encoder's
indices are the same, the decoder's are one higher (its index 0 is the parameterless clamp);
see :mod:`latentdiff.checkpoints.taesd_files`.

A model may hold only one half (a decoder file alone gives a decoder-only model, enough
for txt2img and previews); using the missing half raises :class:`MissingHalf`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ..errors import BadModel
from .config import ConfigError, ModelConfig
from .vae import AutoencoderKL, _tiled, check_images, check_latents

if TYPE_CHECKING:
    from .vq import VQModel  # vq.py imports this module (TinyLatents)

_ACTIVATIONS = {
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,  # diffusers treats "swish" as SiLU
    "gelu": F.gelu,
    "mish": F.mish,
}
_UPSAMPLE_MODES = ("nearest", "bilinear")


class MissingHalf(BadModel):
    """The encoder (or decoder) of a tiny autoencoder loaded without its file."""


@dataclasses.dataclass(frozen=True)
class TAESDConfig(ModelConfig):
    """``AutoencoderTiny`` config; field names are diffusers' ``config.json`` keys."""

    _class_name = "AutoencoderTiny"

    in_channels: int = 3
    out_channels: int = 3
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    act_fn: str = "relu"
    upsample_fn: str = "nearest"
    latent_channels: int = 4
    upsampling_scaling_factor: int = 2
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    # The [0, 1] quantisation of diffusers' AutoencoderTiny.forward; carried for round trips, unused here.
    latent_magnitude: float = 3
    latent_shift: float = 0.5
    force_upcast: bool = False
    scaling_factor: float = 1.0
    # Written by diffusers; SD 1.x pipelines do not apply it (neither does latentdiff).
    shift_factor: float = 0.0
    # diffusers registers the decoder's channels under this name too; None: the same as theirs.
    block_out_channels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.block_out_channels is None:
            object.__setattr__(self, "block_out_channels", self.decoder_block_out_channels)

    @classmethod
    def sd(cls) -> TAESDConfig:
        """TAESD for SD 1.x (madebyollin's ``taesd``): 4 latent channels, f = 8."""
        return cls()

    @classmethod
    def tiny(cls) -> TAESDConfig:
        """A two-level 16-channel TAESD (f = 2) for tests."""
        return cls(
            encoder_block_out_channels=(16, 16),
            decoder_block_out_channels=(16, 16),
            num_encoder_blocks=(1, 1),
            num_decoder_blocks=(1, 1),
        )

    @property
    def downsample_factor(self) -> int:
        """Spatial compression f = H / h (the decoder's upsampling; the encoder's stride-2 convs agree)."""
        return self.upsampling_scaling_factor ** (len(self.decoder_block_out_channels) - 1)

    @property
    def sample_size(self) -> int:
        """The tile side, in pixels, diffusers' AutoencoderTiny tiles with (for memory estimates)."""
        return 512

    def validate(self) -> None:
        for name in ("in_channels", "out_channels", "latent_channels", "upsampling_scaling_factor"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"TAESDConfig.{name} must be a positive integer, got {value!r}")
        for side in ("encoder", "decoder"):
            channels = getattr(self, f"{side}_block_out_channels")
            blocks = getattr(self, f"num_{side}_blocks")
            if not channels:
                raise ConfigError(f"TAESDConfig.{side}_block_out_channels must not be empty")
            if len(channels) != len(blocks):
                raise ConfigError(
                    f"TAESDConfig.{side}_block_out_channels has {len(channels)} entries but num_{side}_blocks "
                    f"has {len(blocks)}; they must match"
                )
            if any(c <= 0 for c in channels) or len(set(channels)) != 1:
                raise ConfigError(
                    f"TAESDConfig.{side}_block_out_channels must be one positive width repeated (diffusers' "
                    f"{side.capitalize()}Tiny keeps the width between levels), got {list(channels)}"
                )
            if any(n < 0 for n in blocks):
                raise ConfigError(f"TAESDConfig.num_{side}_blocks must be >= 0, got {list(blocks)}")
        encoder_factor = 2 ** (len(self.encoder_block_out_channels) - 1)
        if encoder_factor != self.downsample_factor:
            raise ConfigError(
                f"TAESDConfig: the encoder downsamples by {encoder_factor} but the decoder upsamples by "
                f"{self.downsample_factor}; they must agree"
            )
        if self.act_fn not in _ACTIVATIONS:
            raise ConfigError(f"TAESDConfig.act_fn={self.act_fn!r} is not supported; latentdiff implements "
                              f"{sorted(_ACTIVATIONS)}")
        if self.upsample_fn not in _UPSAMPLE_MODES:
            raise ConfigError(f"TAESDConfig.upsample_fn={self.upsample_fn!r} is not supported; latentdiff "
                              f"implements {list(_UPSAMPLE_MODES)}")
        if not self.scaling_factor or self.scaling_factor <= 0:
            raise ConfigError(f"TAESDConfig.scaling_factor must be positive, got {self.scaling_factor!r}")


class Activation(nn.Module):
    """A parameterless activation by diffusers' name (a module so layer indices match the state dict)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.fn = _ACTIVATIONS[name]

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


class Upsample(nn.Module):
    """Parameterless ``scale`` x upsampling (``nn.Upsample``'s interpolation)."""

    def __init__(self, scale: int, mode: str) -> None:
        super().__init__()
        self.scale, self.mode = scale, mode

    def forward(self, x: Tensor) -> Tensor:  # (B, C, h, w) -> (B, C, h * s, w * s)
        return F.interpolate(x, scale_factor=self.scale, mode=self.mode)


def _conv(n_in: int, n_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class TinyBlock(nn.Module):
    """``relu(conv(act(conv(act(conv(x))))) + skip(x))``: diffusers' ``AutoencoderTinyBlock``."""

    def __init__(self, n_in: int, n_out: int, act: str) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), Activation(act), _conv(n_out, n_out), Activation(act),
                                  _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:  # (B, n_in, h, w) -> (B, n_out, h, w)
        return self.fuse(self.conv(x) + self.skip(x))


class TinyEncoder(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] -> latents (B, c, H/f, W/f).

    ``layers``: per level a conv (the first from the image, the others stride 2 without bias)
    followed by its blocks; then a conv to the latent channels.
    """

    def __init__(self, cfg: TAESDConfig) -> None:
        super().__init__()
        ch = cfg.encoder_block_out_channels
        layers: list[nn.Module] = []
        for i, count in enumerate(cfg.num_encoder_blocks):
            layers.append(_conv(cfg.in_channels, ch[0]) if i == 0 else _conv(ch[i - 1], ch[i], stride=2, bias=False))
            layers.extend(TinyBlock(ch[i], ch[i], cfg.act_fn) for _ in range(count))
        layers.append(_conv(ch[-1], cfg.latent_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        return self.layers(images.add(1).div(2))  # TAESD works on [0, 1] images


class TinyDecoder(nn.Module):
    """Latents (B, c, h, w) -> image (B, 3, h*f, w*f) in about [-1, 1] (not clamped).

    ``layers``: a conv from the latents and an activation; per level its blocks, then (except
    at the last level) an upsample and a bias-free conv; the last level ends in a conv to RGB.
    """

    def __init__(self, cfg: TAESDConfig) -> None:
        super().__init__()
        ch, n = cfg.decoder_block_out_channels, len(cfg.decoder_block_out_channels)
        layers: list[nn.Module] = [_conv(cfg.latent_channels, ch[0]), Activation(cfg.act_fn)]
        for i, count in enumerate(cfg.num_decoder_blocks):
            last = i == n - 1
            layers.extend(TinyBlock(ch[i], ch[i], cfg.act_fn) for _ in range(count))
            if not last:
                layers.append(Upsample(cfg.upsampling_scaling_factor, cfg.upsample_fn))
            layers.append(_conv(ch[i], cfg.out_channels if last else ch[i], bias=last))
        self.layers = nn.Sequential(*layers)

    def forward(self, latents: Tensor) -> Tensor:
        z = torch.tanh(latents / 3) * 3  # soft clamp to (-3, 3)
        return self.layers(z).mul(2).sub(1)  # [0, 1] -> [-1, 1]


class TinyLatents:
    """What ``TinyAutoencoder.encode`` returns: the latents, shaped like a posterior's interface.

    ``sample`` and ``mode`` both return the latents and draw no random numbers (diffusers'
    ``retrieve_latents`` takes a tiny encoder's ``.latents``), so seeds stay in step with diffusers.
    """

    def __init__(self, latents: Tensor) -> None:
        self.latents = latents  # (B, c, h, w), unscaled

    def sample(self, generator: torch.Generator | Sequence[torch.Generator] | None = None) -> Tensor:
        """The latents; ``generator`` is accepted and not used."""
        return self.latents

    def mode(self) -> Tensor:
        return self.latents


class TinyAutoencoder(nn.Module):
    """TAESD with the interface the pipeline uses on :class:`~latentdiff.models.vae.AutoencoderKL`.

    ``encoder`` / ``decoder`` may be None (a model loaded from one original file); then
    ``missing`` names the file the absent half would come from, for the error.
    """

    def __init__(self, config: TAESDConfig, *, encoder: bool = True, decoder: bool = True) -> None:
        super().__init__()
        config.validate()
        if not (encoder or decoder):
            raise ValueError("a TinyAutoencoder needs an encoder, a decoder or both")
        self.config = config
        self.encoder = TinyEncoder(config) if encoder else None
        self.decoder = TinyDecoder(config) if decoder else None
        self.missing: dict[str, str] = {}  # "encoder"/"decoder" -> the file to put beside the loaded one

    # ---- config-derived facts -------------------------------------------------------------
    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    def scale_latents(self, z: Tensor) -> Tensor:
        """Autoencoder latents -> diffusion latents: z * scaling_factor (1.0 for TAESD)."""
        return z * self.scaling_factor

    def unscale_latents(self, z: Tensor) -> Tensor:
        """Diffusion latents -> autoencoder latents: z / scaling_factor."""
        return z / self.scaling_factor

    # ---- encode / decode -----------------------------------------------------------------
    def _half(self, name: str) -> nn.Module:
        module = getattr(self, name)
        if module is None:
            wanted = self.missing.get(name)
            hint = f": put {wanted} beside the file it was loaded from" if wanted else ""
            raise MissingHalf(f"this tiny autoencoder was loaded without its {name}{hint}")
        return module

    def _check_images(self, images: Tensor) -> None:
        check_images(images, self.config.in_channels, self.downsample_factor)

    def _check_latents(self, latents: Tensor) -> None:
        check_latents(latents, self.config.latent_channels)

    def encode(self, images: Tensor) -> TinyLatents:
        """images (B, 3, H, W) in [-1, 1], H and W multiples of f -> unscaled latents (B, c, H/f, W/f)."""
        encoder = self._half("encoder")
        self._check_images(images)
        return TinyLatents(encoder(images))

    def decode(self, latents: Tensor) -> Tensor:
        """Unscaled latents (B, c, h, w) -> images (B, 3, h*f, w*f) in about [-1, 1]; not clamped."""
        decoder = self._half("decoder")
        self._check_latents(latents)
        return decoder(latents)

    def forward(self, images: Tensor) -> Tensor:
        """Reconstruct ``images`` (B, 3, H, W) -> (B, 3, H, W), without diffusers' 8-bit quantisation."""
        return self.decode(self.encode(images).latents)

    # ---- tiled ---------------------------------------------------------------------------
    def encode_tiled(self, images: Tensor, tile: int = 512, overlap: int = 128) -> TinyLatents:
        """``encode`` in overlapping pixel tiles blended linearly (as ``AutoencoderKL.encode_tiled``).

        With no normalisation layers, the result differs from ``encode`` only near tile seams.
        """
        encoder = self._half("encoder")
        self._check_images(images)
        f = self.downsample_factor
        AutoencoderKL._check_tiling(tile, overlap, f, "pixels")
        return TinyLatents(_tiled(encoder, images, tile, overlap, 1 / f, f))

    def decode_tiled(self, latents: Tensor, tile: int = 64, overlap: int = 16) -> Tensor:
        """``decode`` in overlapping latent tiles blended linearly (as ``AutoencoderKL.decode_tiled``)."""
        decoder = self._half("decoder")
        self._check_latents(latents)
        AutoencoderKL._check_tiling(tile, overlap, 1, "latent pixels")
        return _tiled(decoder, latents, tile, overlap, self.downsample_factor, 1)


#: Any autoencoder a pipeline may hold as its ``vae`` (for annotations only).
Autoencoder: TypeAlias = "AutoencoderKL | TinyAutoencoder | VQModel"


@torch.no_grad()
def preview(decoder: Autoencoder, x0_latents: Tensor) -> list[Image.Image]:
    """Quick RGB previews of a step callback's x0 prediction (scaled latents (B, c, h, w)).

    Meant for a :class:`TinyAutoencoder` (decoding costs a few milliseconds); any autoencoder works.
    """
    param = next(decoder.parameters())
    z = decoder.unscale_latents(x0_latents.to(param.device, param.dtype))
    images = decoder.decode(z).float()  # (B, 3, H, W) in about [-1, 1]
    array = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]
