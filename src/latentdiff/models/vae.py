"""The KL-regularised autoencoder (diffusers' ``AutoencoderKL``, the SD 1.x VAE).

An image (B, 3, H, W) in [-1, 1] is encoded to a diagonal Gaussian over latents
(B, c, H/f, W/f), f = 2 ** (number of blocks - 1) read from the config (8 for SD).
Latents are *unscaled* here: the diffusion model sees ``scale_latents(z)``
(``z * scaling_factor``) and the decoder gets ``unscale_latents(z)``.

Module names mirror diffusers' state dict exactly (``encoder.down_blocks.0.resnets.0.conv1``,
``encoder.mid_block.attentions.0.to_q``, ``decoder.up_blocks.0.upsamplers.0.conv`` ...),
so a diffusers ``vae/diffusion_pytorch_model.safetensors`` loads with
``load_state_dict(strict=True)``.

Tiled encode/decode (``encode_tiled`` / ``decode_tiled``) split large inputs into
overlapping tiles of equal size and blend them with linear weight ramps. Unlike
diffusers' ``enable_tiling`` (which crops the last tile short and blends pairwise),
tiles here are spread evenly so every tile has full size and the blend is a
normalised weighted sum, so uneven overlaps and any multiple of f are handled
the same way.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import ConfigError, ModelConfig
from .layers import Attention, Downsample2D, ResnetBlock2D, Upsample2D

_DOWN_BLOCKS = ("DownEncoderBlock2D",)
_UP_BLOCKS = ("UpDecoderBlock2D",)
_ACTIVATIONS = ("silu", "swish")  # diffusers treats "swish" as SiLU
_EPS = 1e-6  # GroupNorm eps used throughout the VAE


@dataclasses.dataclass(frozen=True)
class VAEConfig(ModelConfig):
    """``AutoencoderKL`` config; field names are diffusers' ``config.json`` keys."""

    _class_name = "AutoencoderKL"

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    # Per-channel latent statistics some VAEs publish (SDXL-era); carried for round trips, unused here.
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def sd15(cls) -> VAEConfig:
        """The Stable Diffusion 1.x VAE (83,653,863 parameters)."""
        return cls(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=512,
            scaling_factor=0.18215,
        )

    @classmethod
    def tiny(cls) -> VAEConfig:
        """A small two-level VAE (f = 2) for tests and the toy world."""
        return cls(
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(32, 64),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=32,
        )

    @property
    def downsample_factor(self) -> int:
        """Spatial compression f = H / h."""
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self) -> None:
        n = len(self.block_out_channels)
        if n == 0:
            raise ConfigError("VAEConfig.block_out_channels must not be empty")
        for name, types, known in (
            ("down_block_types", self.down_block_types, _DOWN_BLOCKS),
            ("up_block_types", self.up_block_types, _UP_BLOCKS),
        ):
            bad = [t for t in types if t not in known]
            if bad:
                raise ConfigError(f"VAEConfig.{name}: unsupported block type(s) {bad}; latentdiff implements {list(known)}")
            if len(types) != n:
                raise ConfigError(
                    f"VAEConfig.{name} has {len(types)} entries but block_out_channels has {n}; they must match"
                )
        if self.act_fn not in _ACTIVATIONS:
            raise ConfigError(f"VAEConfig.act_fn={self.act_fn!r} is not supported; latentdiff implements 'silu'")
        for name in ("in_channels", "out_channels", "latent_channels", "norm_num_groups"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"VAEConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.layers_per_block, int) or self.layers_per_block < 1:
            raise ConfigError(f"VAEConfig.layers_per_block must be >= 1, got {self.layers_per_block!r}")
        for ch in self.block_out_channels:
            if ch <= 0 or ch % self.norm_num_groups:
                raise ConfigError(
                    f"VAEConfig.block_out_channels entry {ch} is not a positive multiple of "
                    f"norm_num_groups={self.norm_num_groups}"
                )
        if not self.scaling_factor or self.scaling_factor <= 0:
            raise ConfigError(f"VAEConfig.scaling_factor must be positive, got {self.scaling_factor!r}")


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)), from moments (B, 2c, h, w) = [mean, logvar]."""

    def __init__(self, moments: Tensor) -> None:
        self.moments = moments
        mean, logvar = torch.chunk(moments, 2, dim=1)  # each (B, c, h, w)
        self.mean = mean
        self.logvar = torch.clamp(logvar, -30.0, 20.0)

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | Sequence[torch.Generator] | None = None) -> Tensor:
        """mean + std * eps.

        eps is drawn on the generator's device in the latents' dtype, then moved to the
        latents' device, so a CPU generator gives the same draw as diffusers on any device.
        A list of generators draws one (1, c, h, w) slice per batch item.
        """
        shape = tuple(self.mean.shape)
        dtype, device = self.mean.dtype, self.mean.device
        if isinstance(generator, (list, tuple)):
            if len(generator) != shape[0]:
                raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
            eps = torch.cat(
                [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype).to(device) for g in generator]
            )
        else:
            rand_device = generator.device if generator is not None else device
            eps = torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> Tensor:
        """KL(self || other), other defaulting to N(0, I); summed over (c, h, w) -> (B,)."""
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=[1, 2, 3],
        )

    def nll(self, sample: Tensor) -> Tensor:
        """Negative log-likelihood of ``sample``, summed over (c, h, w) -> (B,)."""
        return 0.5 * torch.sum(
            math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var, dim=[1, 2, 3]
        )


class VAEOutput(NamedTuple):
    """What ``AutoencoderKL.forward`` returns: the reconstruction and the posterior (for the KL term)."""

    sample: Tensor
    posterior: DiagonalGaussian


class DownEncoderBlock2D(nn.Module):
    """``layers_per_block`` ResNets, then (except at the last level) a stride-2 asymmetric-pad downsample."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, add_downsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, groups=groups, eps=_EPS) for i in range(layers)
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch, padding=0)]) if add_downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    """``layers_per_block + 1`` ResNets, then (except at the last level) a nearest 2x upsample + conv."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, add_upsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, groups=groups, eps=_EPS) for i in range(layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if add_upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock2D(nn.Module):
    """ResNet, [single-head spatial self-attention with residual], ResNet."""

    def __init__(self, channels: int, groups: int, add_attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, None, groups=groups, eps=_EPS) for _ in range(2))
        self.attentions = nn.ModuleList(
            [
                Attention(
                    channels, heads=1, dim_head=channels, bias=True, norm_num_groups=groups, eps=_EPS, residual=True
                )
            ]
            if add_attention
            else []
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


def _run(module: nn.Module, x: Tensor, use_checkpoint: bool) -> Tensor:
    if use_checkpoint and torch.is_grad_enabled() and x.requires_grad:
        return checkpoint(module, x, use_reentrant=False)
    return module(x)


class Encoder(nn.Module):
    """Image (B, in, H, W) -> moments (B, 2 * latent, H/f, W/f) (``double_z``), or latents (B, latent, H/f, W/f)."""

    def __init__(self, cfg: VAEConfig, double_z: bool = True) -> None:
        super().__init__()
        ch, groups, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.gradient_checkpointing = False
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups, add_downsample=i < n - 1)
            for i in range(n)
        )
        self.mid_block = MidBlock2D(ch[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(ch[-1], (2 if double_z else 1) * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = _run(block, x, self.gradient_checkpointing)
        x = _run(self.mid_block, x, self.gradient_checkpointing)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latents (B, latent, h, w) -> image (B, out, h*f, w*f)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        rev, groups, n = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups, len(cfg.block_out_channels)
        self.gradient_checkpointing = False
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock2D(rev[0], groups, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, groups, add_upsample=i < n - 1)
            for i in range(n)
        )
        self.conv_norm_out = nn.GroupNorm(groups, rev[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(rev[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.conv_in(z)
        x = _run(self.mid_block, x, self.gradient_checkpointing)
        for block in self.up_blocks:
            x = _run(block, x, self.gradient_checkpointing)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Evenly spread start offsets of full-size tiles covering [0, length) with at least ``overlap`` overlap."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def _blend_weights(size: int, i: int, starts: list[int], tile: int, scale: float, like: Tensor) -> Tensor:
    """1-D weights (size,) of tile ``i`` in output units: linear ramps across its overlaps with its neighbours.

    ``starts`` and ``tile`` are in input units; the output is ``scale`` times the input.
    Ramps of two neighbours across the same overlap sum to one; the caller normalises anyway.
    """
    w = torch.ones(size, device=like.device, dtype=like.dtype)
    pos = torch.arange(size, device=like.device, dtype=like.dtype) + 0.5  # pixel centres
    low = (starts[i - 1] + tile - starts[i]) * scale if i > 0 else 0  # overlap with the previous tile
    high = (starts[i] + tile - starts[i + 1]) * scale if i < len(starts) - 1 else 0  # ... with the next one
    if low > 0:
        w = torch.minimum(w, (pos / low).clamp(max=1.0))
    if high > 0:
        w = torch.minimum(w, ((size - pos) / high).clamp(max=1.0))
    return w


def _tiled(fn, x: Tensor, tile: int, overlap: int, scale: float, unit: int) -> Tensor:
    """Apply ``fn`` (spatial size s -> s * scale) to overlapping tiles of ``x`` (B, C, H, W) and blend.

    ``tile``/``overlap`` are in input units and multiples of ``unit``, the grid every cut lands on.
    """
    _, _, height, width = x.shape
    tile_h, tile_w = min(tile, height), min(tile, width)
    rows = [s * unit for s in _tile_starts(height // unit, tile_h // unit, overlap // unit)]
    cols = [s * unit for s in _tile_starts(width // unit, tile_w // unit, overlap // unit)]
    out = weight = None
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            y = fn(x[:, :, r : r + tile_h, c : c + tile_w])  # (B, C', oh, ow)
            oh, ow = y.shape[-2:]
            if out is None:
                out = y.new_zeros(*y.shape[:2], round(height * scale), round(width * scale))
                weight = y.new_zeros(1, 1, *out.shape[-2:])
            wy = _blend_weights(oh, i, rows, tile_h, scale, y)
            wx = _blend_weights(ow, j, cols, tile_w, scale, y)
            w = wy[:, None] * wx[None, :]  # (oh, ow)
            r0, c0 = round(r * scale), round(c * scale)
            out[:, :, r0 : r0 + oh, c0 : c0 + ow] += y * w
            weight[:, :, r0 : r0 + oh, c0 : c0 + ow] += w
    return out / weight


def check_images(images: Tensor, channels: int, factor: int) -> None:
    """ValueError unless ``images`` is (B, channels, H, W) with H and W multiples of ``factor``."""
    if images.ndim != 4 or images.shape[1] != channels:
        raise ValueError(f"expected images of shape (B, {channels}, H, W), got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(
            f"image size {h}x{w} (HxW) is not a multiple of the VAE downsample factor {factor}; "
            f"use e.g. {max(factor, h // factor * factor)}x{max(factor, w // factor * factor)}"
        )


def check_latents(latents: Tensor, channels: int) -> None:
    """ValueError unless ``latents`` is (B, channels, h, w)."""
    if latents.ndim != 4 or latents.shape[1] != channels:
        raise ValueError(f"expected latents of shape (B, {channels}, h, w), got {tuple(latents.shape)}")


class AutoencoderKL(nn.Module):
    """The SD VAE: ``encoder``, ``quant_conv``, ``post_quant_conv``, ``decoder`` (diffusers' key layout)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        lat = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * lat, 2 * lat, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(lat, lat, 1) if config.use_post_quant_conv else None

    # ---- config-derived facts -------------------------------------------------------------
    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> float:
        return self.config.shift_factor or 0.0

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    def scale_latents(self, z: Tensor) -> Tensor:
        """VAE latents -> diffusion latents: (z - shift) * scaling_factor."""
        return (z - self.shift_factor) * self.scaling_factor

    def unscale_latents(self, z: Tensor) -> Tensor:
        """Diffusion latents -> VAE latents: z / scaling_factor + shift."""
        return z / self.scaling_factor + self.shift_factor

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each encoder/decoder block in the backward pass to save activation memory."""
        self.encoder.gradient_checkpointing = enabled
        self.decoder.gradient_checkpointing = enabled

    # ---- encode / decode -----------------------------------------------------------------
    def _check_images(self, images: Tensor) -> None:
        check_images(images, self.config.in_channels, self.downsample_factor)

    def _check_latents(self, latents: Tensor) -> None:
        check_latents(latents, self.config.latent_channels)

    def _moments(self, images: Tensor) -> Tensor:
        m = self.encoder(images)
        return self.quant_conv(m) if self.quant_conv is not None else m

    def _decode(self, latents: Tensor) -> Tensor:
        z = self.post_quant_conv(latents) if self.post_quant_conv is not None else latents
        return self.decoder(z)

    def encode(self, images: Tensor) -> DiagonalGaussian:
        """images (B, 3, H, W) in [-1, 1], H and W multiples of f -> posterior over unscaled latents (B, c, H/f, W/f)."""
        self._check_images(images)
        return DiagonalGaussian(self._moments(images))

    def decode(self, latents: Tensor) -> Tensor:
        """Unscaled latents (B, c, h, w) -> images (B, 3, h*f, w*f); raw output, not clamped."""
        self._check_latents(latents)
        return self._decode(latents)

    def forward(
        self, images: Tensor, generator: torch.Generator | None = None, sample_posterior: bool = False
    ) -> VAEOutput:
        """Reconstruct ``images`` via the posterior's mode (or a sample of it)."""
        posterior = self.encode(images)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return VAEOutput(self._decode(z), posterior)

    # ---- tiled ---------------------------------------------------------------------------
    def encode_tiled(self, images: Tensor, tile: int = 512, overlap: int = 128) -> DiagonalGaussian:
        """``encode`` in overlapping ``tile`` x ``tile`` pixel tiles, moments blended linearly across overlaps.

        ``tile`` and ``overlap`` are in pixels and must be multiples of the downsample factor.
        Memory stays bounded by the tile size; the result differs slightly from ``encode``
        because GroupNorm statistics are per tile.
        """
        self._check_images(images)
        f = self.downsample_factor
        self._check_tiling(tile, overlap, f, "pixels")
        return DiagonalGaussian(_tiled(self._moments, images, tile, overlap, 1 / f, f))

    def decode_tiled(self, latents: Tensor, tile: int = 64, overlap: int = 16) -> Tensor:
        """``decode`` in overlapping ``tile`` x ``tile`` latent tiles, blended linearly across overlaps."""
        self._check_latents(latents)
        self._check_tiling(tile, overlap, 1, "latent pixels")
        return _tiled(self._decode, latents, tile, overlap, self.downsample_factor, 1)

    @staticmethod
    def _check_tiling(tile: int, overlap: int, unit: int, what: str) -> None:
        if tile <= 0 or tile % unit or overlap % unit:
            raise ValueError(f"tile={tile} and overlap={overlap} ({what}) must be positive multiples of {unit}")
        if not 0 <= overlap < tile:
            raise ValueError(f"overlap={overlap} must be in [0, tile={tile})")
