"""The VQ-regularised autoencoder (diffusers' ``VQModel``, the VQ-GAN of Latent Diffusion).

    vq = VQModel(VQConfig(block_out_channels=(64, 128), latent_channels=3, num_vq_embeddings=8192))
    h = vq.encode(images).latents      # (B, e, H/f, W/f): pre-quantisation latents (what a UNet sees)
    images = vq.decode(h)              # quantised to the nearest codebook vectors, then decoded

The encoder is the KL autoencoder's with a single (not doubled) output, followed by
``quant_conv`` to the code dimension ``e`` (``vq_embed_dim``, default ``latent_channels``).
As in LDM, the diffusion model works on those continuous pre-quantisation latents and the
*decoder* quantises: each latent vector is replaced by its nearest codebook entry (Euclidean,
``num_vq_embeddings`` entries), then ``post_quant_conv`` and the decoder. ``encode`` returns
the latents as :class:`~latentdiff.models.taesd.TinyLatents` (``mode`` and ``sample`` both give
them and draw nothing, as diffusers' ``retrieve_latents`` takes a ``.latents``).

Module names and the codebook (``quantize.embedding.weight``) mirror diffusers' state dict, so a
diffusers ``VQModel`` folder loads with ``load_state_dict(strict=True)``. ``norm_type="spatial"``
(MoVQ's spatially conditioned decoder norm) is not implemented and is refused by name.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .config import ConfigError, ModelConfig
from .taesd import TinyLatents
from .vae import AutoencoderKL, Decoder, Encoder, VAEConfig, _tiled, check_images, check_latents


@dataclasses.dataclass(frozen=True)
class VQConfig(ModelConfig):
    """``VQModel`` config; field names are diffusers' ``config.json`` keys."""

    _class_name = "VQModel"

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 3
    sample_size: int | tuple[int, int] = 32
    num_vq_embeddings: int = 256
    norm_num_groups: int = 32
    vq_embed_dim: int | None = None
    scaling_factor: float = 0.18215
    norm_type: str = "group"
    mid_block_add_attention: bool = True
    lookup_from_codebook: bool = False
    force_upcast: bool = False

    @property
    def code_dim(self) -> int:
        """The codebook vectors' width e: the channels of the latents a UNet sees."""
        return self.vq_embed_dim if self.vq_embed_dim is not None else self.latent_channels

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def autoencoder_config(self) -> VAEConfig:
        """The encoder / decoder layout as a :class:`VAEConfig` (what the two share with the KL VAE)."""
        return VAEConfig(
            in_channels=self.in_channels, out_channels=self.out_channels, down_block_types=self.down_block_types,
            up_block_types=self.up_block_types, block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block, act_fn=self.act_fn, latent_channels=self.latent_channels,
            norm_num_groups=self.norm_num_groups, sample_size=self.sample_size, scaling_factor=self.scaling_factor,
            mid_block_add_attention=self.mid_block_add_attention,
        )

    def validate(self) -> None:
        self.autoencoder_config().validate()
        if self.norm_type != "group":
            raise ConfigError(f"VQConfig.norm_type={self.norm_type!r} is not supported; latentdiff implements 'group'")
        if not isinstance(self.num_vq_embeddings, int) or self.num_vq_embeddings < 1:
            raise ConfigError(f"VQConfig.num_vq_embeddings must be a positive integer, got {self.num_vq_embeddings!r}")
        if self.vq_embed_dim is not None and self.vq_embed_dim < 1:
            raise ConfigError(f"VQConfig.vq_embed_dim must be positive, got {self.vq_embed_dim!r}")


class Quantized(NamedTuple):
    """What :class:`VectorQuantizer` returns."""

    latents: Tensor  # (B, e, h, w) the codebook vectors, with a straight-through gradient to the input
    loss: Tensor  # () codebook + commitment loss
    indices: Tensor  # (B * h * w,) int64 codebook index of every position


class VectorQuantizer(nn.Module):
    """Nearest-codebook-vector quantisation (``quantize``; diffusers' VectorQuantizer, legacy loss).

    loss = mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2), beta 0.25, exactly as diffusers
    and taming's "legacy" quantiser weigh the two terms.
    """

    def __init__(self, num_embeddings: int, dim: int, beta: float = 0.25) -> None:
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(num_embeddings, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_embeddings, 1.0 / num_embeddings)

    def nearest(self, z: Tensor) -> Tensor:
        """Codebook index (N,) of each row of ``z`` (N, e)."""
        return torch.argmin(torch.cdist(z, self.embedding.weight), dim=1)

    def forward(self, z: Tensor) -> Quantized:
        channels_last = z.permute(0, 2, 3, 1).contiguous()  # (B, h, w, e)
        indices = self.nearest(channels_last.view(-1, channels_last.shape[-1]))  # (B*h*w,)
        z_q = self.embedding(indices).view(channels_last.shape)
        loss = torch.mean((z_q.detach() - channels_last) ** 2) + self.beta * torch.mean((z_q - channels_last.detach()) ** 2)
        z_q = channels_last + (z_q - channels_last).detach()  # straight-through estimator
        return Quantized(z_q.permute(0, 3, 1, 2).contiguous(), loss, indices)

    def codebook_entry(self, indices: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
        """Codebook vectors of ``indices`` as latents of ``shape`` (B, h, w, e) -> (B, e, h, w)."""
        return self.embedding(indices).view(shape).permute(0, 3, 1, 2).contiguous()


class VQOutput(NamedTuple):
    """What ``VQModel.forward`` returns: the reconstruction, the quantiser loss and the code indices."""

    sample: Tensor
    loss: Tensor
    indices: Tensor


class VQModel(nn.Module):
    """``encoder``, ``quant_conv``, ``quantize``, ``post_quant_conv``, ``decoder`` (diffusers' key layout),
    with the interface the pipeline uses on :class:`~latentdiff.models.vae.AutoencoderKL`."""

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        layout = config.autoencoder_config()
        self.encoder = Encoder(layout, double_z=False)
        self.quant_conv = nn.Conv2d(config.latent_channels, config.code_dim, 1)
        self.quantize = VectorQuantizer(config.num_vq_embeddings, config.code_dim)
        self.post_quant_conv = nn.Conv2d(config.code_dim, config.latent_channels, 1)
        self.decoder = Decoder(layout)

    # ---- config-derived facts -------------------------------------------------------------
    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def latent_channels(self) -> int:
        """Channels of the (pre-quantisation) latents: the code dimension."""
        return self.config.code_dim

    def scale_latents(self, z: Tensor) -> Tensor:
        """Autoencoder latents -> diffusion latents: z * scaling_factor."""
        return z * self.scaling_factor

    def unscale_latents(self, z: Tensor) -> Tensor:
        """Diffusion latents -> autoencoder latents: z / scaling_factor."""
        return z / self.scaling_factor

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.encoder.gradient_checkpointing = enabled
        self.decoder.gradient_checkpointing = enabled

    # ---- encode / decode -----------------------------------------------------------------
    def _latents(self, images: Tensor) -> Tensor:
        return self.quant_conv(self.encoder(images))

    def _decode(self, latents: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(self.quantize(latents).latents))

    def encode(self, images: Tensor) -> TinyLatents:
        """images (B, 3, H, W) in [-1, 1] -> pre-quantisation latents (B, e, H/f, W/f), unscaled."""
        check_images(images, self.config.in_channels, self.downsample_factor)
        return TinyLatents(self._latents(images))

    def decode(self, latents: Tensor, *, quantize: bool = True) -> Tensor:
        """Unscaled latents (B, e, h, w) -> images (B, 3, h*f, w*f), quantised first unless ``quantize`` is False."""
        check_latents(latents, self.latent_channels)
        if not quantize:
            return self.decoder(self.post_quant_conv(latents))
        return self._decode(latents)

    def decode_indices(self, indices: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
        """Images from codebook indices (B*h*w,) for latents of ``shape`` (B, h, w, e) (``lookup_from_codebook``)."""
        return self.decoder(self.post_quant_conv(self.quantize.codebook_entry(indices, shape)))

    def forward(self, images: Tensor) -> VQOutput:
        """Reconstruct ``images`` through the codebook; the loss and indices are the quantiser's."""
        check_images(images, self.config.in_channels, self.downsample_factor)
        quantized = self.quantize(self._latents(images))
        return VQOutput(self.decoder(self.post_quant_conv(quantized.latents)), quantized.loss, quantized.indices)

    def encode_tiled(self, images: Tensor, tile: int = 512, overlap: int = 128) -> TinyLatents:
        """``encode`` in overlapping pixel tiles blended linearly (as ``AutoencoderKL.encode_tiled``)."""
        check_images(images, self.config.in_channels, self.downsample_factor)
        f = self.downsample_factor
        AutoencoderKL._check_tiling(tile, overlap, f, "pixels")
        return TinyLatents(_tiled(self._latents, images, tile, overlap, 1 / f, f))

    def decode_tiled(self, latents: Tensor, tile: int = 64, overlap: int = 16) -> Tensor:
        """``decode`` in overlapping latent tiles blended linearly (as ``AutoencoderKL.decode_tiled``)."""
        check_latents(latents, self.latent_channels)
        AutoencoderKL._check_tiling(tile, overlap, 1, "latent pixels")
        return _tiled(self._decode, latents, tile, overlap, self.downsample_factor, 1)
