"""The conditional UNet of Stable Diffusion 1.x/2.x (diffusers' ``UNet2DConditionModel``).

Shape of the network (SD 1.5: channels 320/640/1280/1280)::

    conv_in -> down_blocks (each: resnets [+ transformers], then a 2x downsample
    except the last) -> mid_block (resnet, transformer, resnet) -> up_blocks
    (each: layers_per_block + 1 resnets fed the skip connections in reverse
    order [+ transformers], then a 2x upsample except the last) ->
    GroupNorm-SiLU-conv_out.

The timestep goes through a sinusoidal embedding (``time_proj``, no weights)
and a two-layer MLP (``time_embedding``); the result is added inside every
ResNet block. Text conditioning enters through cross-attention in the
transformer blocks.

Submodule names are diffusers' state-dict names, so a diffusers ``unet/``
folder loads with ``load_state_dict(strict=True)`` and no renaming.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from latentdiff.speed.deepcache import FeatureCache

from latentdiff.models.config import ConfigError, ModelConfig, config_error
from latentdiff.models.layers import (
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Transformer2DModel,
    Upsample2D,
    timestep_embedding,
)

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)

# diffusers config keys that are not fields here: latentdiff builds only the
# SD 1.x/2.x architecture, so each must be absent or hold diffusers' default.
_FIXED_KEYS: dict[str, Any] = {
    "dropout": 0.0,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}


def _per_level(value: Any, levels: int, name: str) -> tuple:
    """An int/bool/str for every level, or a per-level tuple checked for length."""
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ConfigError(f"UNet {name} has {len(value)} entries for {levels} levels: {tuple(value)}")
        return tuple(value)
    return (value,) * levels


@dataclasses.dataclass(frozen=True)
class UNetConfig(ModelConfig):
    """``UNet2DConditionModel`` config.json fields used by SD 1.x/2.x.

    Heads: diffusers' naming quirk is kept. When ``num_attention_heads`` is None
    (every released SD config), ``attention_head_dim`` is the number of heads
    per level (SD 1.5: 8; SD 2.x: (5, 10, 20, 20)), and each head has
    ``channels // heads`` dimensions. ``heads_per_level()`` resolves this.

    ``upcast_attention`` (SD 2.1) is accepted and has no effect: attention runs
    through ``scaled_dot_product_attention``, like diffusers' default processor,
    which also ignores it. Architecture keys diffusers knows but SD 1.x/2.x never
    changes (``num_class_embeds``, ``conv_in_kernel``, ...) are not fields; a
    config.json that sets one to a non-default value is rejected on load.
    """

    _class_name = "UNet2DConditionModel"

    sample_size: int | tuple[int, int] | None = 64
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 768
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    time_embedding_type: str = "positional"
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    #: LCM-distilled UNets: width of the guidance-scale embedding added to the time embedding's input
    time_cond_proj_dim: int | None = None

    # ---- presets -------------------------------------------------------------

    @classmethod
    def sd15(cls) -> UNetConfig:
        """Stable Diffusion 1.x (859,520,964 parameters)."""
        return cls()

    @classmethod
    def sd15_inpaint(cls) -> UNetConfig:
        """SD 1.x inpainting: 9 input channels (noisy latent 4, mask 1, masked-image latent 4)."""
        return cls(in_channels=9)

    @classmethod
    def tiny(cls) -> UNetConfig:
        """A two-level toy of the same architecture, for tests and the Shapes World."""
        return cls(
            sample_size=16,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=2,
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )

    # ---- loading -------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | Path | None = None) -> UNetConfig:
        """As ``ModelConfig.from_dict``, but diffusers keys that would change the
        architecture (class embeddings, extra kernels, ...) must hold their defaults."""
        for key, default in _FIXED_KEYS.items():
            if key in data and (data[key] != default or isinstance(data[key], bool) != isinstance(default, bool)):
                raise config_error(f"UNet config {key}={data[key]!r} is not supported (only {default!r})", source)
        return super().from_dict(data, source)

    # ---- derived values ------------------------------------------------------

    @property
    def levels(self) -> int:
        return len(self.block_out_channels)

    def heads_per_level(self) -> tuple[int, ...]:
        """Attention heads at each level (diffusers: num_attention_heads or attention_head_dim)."""
        heads = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return tuple(int(h) for h in _per_level(heads, self.levels, "attention heads"))

    def layers_per_level(self) -> tuple[int, ...]:
        return tuple(int(n) for n in _per_level(self.layers_per_block, self.levels, "layers_per_block"))

    def cross_dim_per_level(self) -> tuple[int, ...]:
        return tuple(int(d) for d in _per_level(self.cross_attention_dim, self.levels, "cross_attention_dim"))

    def transformer_layers_per_level(self) -> tuple[int, ...]:
        return tuple(
            int(n) for n in _per_level(self.transformer_layers_per_block, self.levels, "transformer_layers_per_block")
        )

    def validate(self) -> None:
        def bad(name: str, value: Any, allowed: str) -> ConfigError:
            return ConfigError(f"UNet config {name}={value!r} is not supported (supported: {allowed})")

        levels = self.levels
        if levels < 1 or any(not isinstance(c, int) or c <= 0 for c in self.block_out_channels):
            raise bad("block_out_channels", self.block_out_channels, "positive ints, at least one level")
        if len(self.down_block_types) != levels or len(self.up_block_types) != levels:
            raise ConfigError(
                f"UNet config needs one down and one up block per level ({levels}), got "
                f"{len(self.down_block_types)} down_block_types and {len(self.up_block_types)} up_block_types"
            )
        for name in self.down_block_types:
            if name not in DOWN_BLOCK_TYPES:
                raise bad("down_block_types", name, ", ".join(DOWN_BLOCK_TYPES))
        for name in self.up_block_types:
            if name not in UP_BLOCK_TYPES:
                raise bad("up_block_types", name, ", ".join(UP_BLOCK_TYPES))
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise bad("mid_block_type", self.mid_block_type, ", ".join(MID_BLOCK_TYPES))
        if not self.flip_sin_to_cos:
            raise bad("flip_sin_to_cos", self.flip_sin_to_cos, "True")
        if self.freq_shift != 0:
            raise bad("freq_shift", self.freq_shift, "0")
        if any(_per_level(self.only_cross_attention, levels, "only_cross_attention")):
            raise bad("only_cross_attention", self.only_cross_attention, "False")
        if self.mid_block_scale_factor != 1:
            raise bad("mid_block_scale_factor", self.mid_block_scale_factor, "1")
        if self.act_fn != "silu":
            raise bad("act_fn", self.act_fn, "'silu'")
        if self.resnet_time_scale_shift != "default":
            raise bad("resnet_time_scale_shift", self.resnet_time_scale_shift, "'default'")
        if self.time_embedding_type != "positional":
            raise bad("time_embedding_type", self.time_embedding_type, "'positional'")
        if self.class_embed_type is not None:
            raise bad("class_embed_type", self.class_embed_type, "None")
        if self.addition_embed_type is not None:
            raise bad("addition_embed_type", self.addition_embed_type, "None")
        dim = self.time_cond_proj_dim
        if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0):
            raise bad("time_cond_proj_dim", dim, "None or a positive int")
        if self.downsample_padding not in (0, 1):
            raise bad("downsample_padding", self.downsample_padding, "0 or 1")
        for name in ("in_channels", "out_channels"):
            if getattr(self, name) <= 0:
                raise bad(name, getattr(self, name), "a positive int")
        groups = self.norm_num_groups
        if not isinstance(groups, int) or groups <= 0:
            raise bad("norm_num_groups", groups, "a positive int")
        for channels in self.block_out_channels:
            if channels % groups:
                raise ConfigError(f"UNet norm_num_groups={groups} does not divide block_out_channels {channels}")
        if any(isinstance(t, (list, tuple)) for t in _per_level(self.transformer_layers_per_block, levels, "transformer_layers_per_block")):
            raise bad("transformer_layers_per_block", self.transformer_layers_per_block, "an int or one int per level")
        for name, values in (
            ("layers_per_block", self.layers_per_level()),
            ("cross_attention_dim", self.cross_dim_per_level()),
            ("transformer_layers_per_block", self.transformer_layers_per_level()),
        ):
            if any(v <= 0 for v in values):
                raise bad(name, values, "positive ints")
        for channels, heads in zip(self.block_out_channels, self.heads_per_level()):
            if heads <= 0 or channels % heads:
                raise ConfigError(f"UNet attention heads {heads} do not divide block_out_channels {channels}")


# ---- blocks ------------------------------------------------------------------


class CrossAttnDownBlock2D(nn.Module):
    """ResNet + spatial transformer pairs, then an optional stride-2 downsample.

    Returns the output and every intermediate state for the skip connections.
    """

    has_cross_attention = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int,
        add_downsample: bool,
        groups: int,
        eps: float,
        downsample_padding: int,
        heads: int,
        cross_attention_dim: int,
        transformer_layers: int,
        use_linear_projection: bool,
    ) -> None:
        super().__init__()
        # Registered attentions-first, as diffusers does, so state_dict order matches too.
        self.attentions = _transformers(
            out_channels, num_layers, heads, cross_attention_dim, transformer_layers, groups, use_linear_projection
        )
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, groups, eps)
            for i in range(num_layers)
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, downsample_padding)]) if add_downsample else None

    def forward(self, x: Tensor, temb: Tensor, context: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        skips = []
        for resnet, attn in zip(self.resnets, self.attentions):
            x = attn(resnet(x, temb), context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, tuple(skips)


class DownBlock2D(nn.Module):
    """ResNets only, then an optional stride-2 downsample."""

    has_cross_attention = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int,
        add_downsample: bool,
        groups: int,
        eps: float,
        downsample_padding: int,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, groups, eps)
            for i in range(num_layers)
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, downsample_padding)]) if add_downsample else None

    def forward(self, x: Tensor, temb: Tensor, context: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
        skips = []
        for resnet in self.resnets:
            x = resnet(x, temb)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, tuple(skips)


class UNetMidBlock2DCrossAttn(nn.Module):
    """ResNet, then (transformer, ResNet) pairs -- one pair in SD."""

    has_cross_attention = True

    def __init__(
        self,
        channels: int,
        temb_channels: int,
        groups: int,
        eps: float,
        heads: int,
        cross_attention_dim: int,
        transformer_layers: int,
        use_linear_projection: bool,
        num_layers: int = 1,
    ) -> None:
        super().__init__()
        self.attentions = _transformers(
            channels, num_layers, heads, cross_attention_dim, transformer_layers, groups, use_linear_projection
        )
        self.resnets = nn.ModuleList(
            ResnetBlock2D(channels, channels, temb_channels, groups, eps) for _ in range(num_layers + 1)
        )

    def forward(self, x: Tensor, temb: Tensor, context: Tensor) -> Tensor:
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x, context), temb)
        return x


def _transformers(
    channels: int,
    count: int,
    heads: int,
    cross_attention_dim: int,
    transformer_layers: int,
    groups: int,
    use_linear_projection: bool,
) -> nn.ModuleList:
    """``count`` spatial transformers of ``heads`` heads over ``channels`` channels (one per ResNet)."""
    return nn.ModuleList(
        Transformer2DModel(
            heads,
            channels // heads,
            channels,
            cross_attention_dim,
            num_layers=transformer_layers,
            norm_num_groups=groups,
            use_linear_projection=use_linear_projection,
        )
        for _ in range(count)
    )


def _up_resnets(
    in_channels: int,
    prev_output_channels: int,
    out_channels: int,
    temb_channels: int,
    num_layers: int,
    groups: int,
    eps: float,
) -> nn.ModuleList:
    """ResNets of an up block: each takes the running state concatenated with one skip.

    The skips are consumed last-first: all but the last come from this level
    (``out_channels``); the last is the previous level's downsampled output
    (``in_channels``). The first ResNet's running state comes from the block below
    (``prev_output_channels``).
    """
    resnets = []
    for i in range(num_layers):
        skip = in_channels if i == num_layers - 1 else out_channels
        running = prev_output_channels if i == 0 else out_channels
        resnets.append(ResnetBlock2D(running + skip, out_channels, temb_channels, groups, eps))
    return nn.ModuleList(resnets)


class UpBlock2D(nn.Module):
    """ResNets over (state ++ skip), then an optional nearest-2x upsample + conv."""

    has_cross_attention = False

    def __init__(
        self,
        in_channels: int,
        prev_output_channels: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int,
        add_upsample: bool,
        groups: int,
        eps: float,
    ) -> None:
        super().__init__()
        self.resnets = _up_resnets(
            in_channels, prev_output_channels, out_channels, temb_channels, num_layers, groups, eps
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(
        self,
        x: Tensor,
        skips: Sequence[Tensor],
        temb: Tensor,
        context: Tensor | None = None,
        upsample_size: tuple[int, int] | None = None,
    ) -> Tensor:
        for i, skip in enumerate(reversed(skips)):
            x = self.layer(i, x, skip, temb, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x

    def layer(self, i: int, x: Tensor, skip: Tensor, temb: Tensor, context: Tensor | None = None) -> Tensor:
        """ResNet ``i`` over (state ++ skip)."""
        return self.resnets[i](torch.cat([x, skip], dim=1), temb)  # (B, C + Cskip, H, W) -> (B, Cout, H, W)


class CrossAttnUpBlock2D(nn.Module):
    """(ResNet over state ++ skip, transformer) pairs, then an optional upsample."""

    has_cross_attention = True

    def __init__(
        self,
        in_channels: int,
        prev_output_channels: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int,
        add_upsample: bool,
        groups: int,
        eps: float,
        heads: int,
        cross_attention_dim: int,
        transformer_layers: int,
        use_linear_projection: bool,
    ) -> None:
        super().__init__()
        self.attentions = _transformers(
            out_channels, num_layers, heads, cross_attention_dim, transformer_layers, groups, use_linear_projection
        )
        self.resnets = _up_resnets(
            in_channels, prev_output_channels, out_channels, temb_channels, num_layers, groups, eps
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(
        self,
        x: Tensor,
        skips: Sequence[Tensor],
        temb: Tensor,
        context: Tensor | None = None,
        upsample_size: tuple[int, int] | None = None,
    ) -> Tensor:
        for i, skip in enumerate(reversed(skips)):
            x = self.layer(i, x, skip, temb, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x

    def layer(self, i: int, x: Tensor, skip: Tensor, temb: Tensor, context: Tensor | None = None) -> Tensor:
        """ResNet ``i`` over (state ++ skip), then transformer ``i``."""
        x = self.resnets[i](torch.cat([x, skip], dim=1), temb)  # (B, C + Cskip, H, W) -> (B, Cout, H, W)
        return self.attentions[i](x, context)


# ---- the model -----------------------------------------------------------------


class UNet2DCondition(nn.Module):
    """Noise (or v) prediction network: ``forward(sample, timestep, encoder_hidden_states)``."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        channels = config.block_out_channels
        levels = config.levels
        groups, eps = config.norm_num_groups, config.norm_eps
        heads = config.heads_per_level()
        layers = config.layers_per_level()
        cross = config.cross_dim_per_level()
        tlayers = config.transformer_layers_per_level()
        temb_channels = channels[0] * 4
        self.gradient_checkpointing = False

        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb_channels, config.time_cond_proj_dim)

        self.down_blocks = nn.ModuleList()
        out_ch = channels[0]
        for i, block_type in enumerate(config.down_block_types):
            in_ch, out_ch = out_ch, channels[i]
            common = dict(
                in_channels=in_ch,
                out_channels=out_ch,
                temb_channels=temb_channels,
                num_layers=layers[i],
                add_downsample=i < levels - 1,
                groups=groups,
                eps=eps,
                downsample_padding=config.downsample_padding,
            )
            if block_type == "CrossAttnDownBlock2D":
                block: nn.Module = CrossAttnDownBlock2D(
                    **common,
                    heads=heads[i],
                    cross_attention_dim=cross[i],
                    transformer_layers=tlayers[i],
                    use_linear_projection=config.use_linear_projection,
                )
            else:
                block = DownBlock2D(**common)
            self.down_blocks.append(block)

        self.up_blocks = nn.ModuleList()  # registered before mid_block, as in diffusers
        self.mid_block = UNetMidBlock2DCrossAttn(
            channels[-1],
            temb_channels,
            groups,
            eps,
            heads=heads[-1],
            cross_attention_dim=cross[-1],
            transformer_layers=tlayers[-1],
            use_linear_projection=config.use_linear_projection,
        )

        rev_channels = channels[::-1]
        out_ch = rev_channels[0]
        for i, block_type in enumerate(config.up_block_types):
            level = levels - 1 - i  # the encoder level this block mirrors
            prev_ch, out_ch = out_ch, rev_channels[i]
            common = dict(
                in_channels=rev_channels[min(i + 1, levels - 1)],
                prev_output_channels=prev_ch,
                out_channels=out_ch,
                temb_channels=temb_channels,
                num_layers=layers[level] + 1,
                add_upsample=i < levels - 1,
                groups=groups,
                eps=eps,
            )
            if block_type == "CrossAttnUpBlock2D":
                block = CrossAttnUpBlock2D(
                    **common,
                    heads=heads[level],
                    cross_attention_dim=cross[level],
                    transformer_layers=tlayers[level],
                    use_linear_projection=config.use_linear_projection,
                )
            else:
                block = UpBlock2D(**common)
            self.up_blocks.append(block)

        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, 3, padding=1)

    # ---- helpers -------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass (training only)."""
        self.gradient_checkpointing = enabled

    def _run(self, block: nn.Module, *args: Any) -> Any:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def time_embed(self, timestep: Tensor | float | int, batch: int, dtype: torch.dtype,
                   timestep_cond: Tensor | None = None) -> Tensor:
        """Timestep(s) (and the LCM guidance embedding ``timestep_cond``, (B, time_cond_proj_dim))
        -> (B, 4 * block_out_channels[0]) embedding in ``dtype``."""
        device = self.device
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=device)
        timestep = timestep.to(device).reshape(-1)
        timestep = timestep.expand(batch) if timestep.numel() == 1 else timestep
        if timestep.shape[0] != batch:
            raise ValueError(f"got {timestep.shape[0]} timesteps for a batch of {batch}")
        t_emb = timestep_embedding(timestep, self.config.block_out_channels[0])  # (B, C0), float32
        if timestep_cond is not None:
            timestep_cond = timestep_cond.to(device)
            if timestep_cond.shape != (batch, self.config.time_cond_proj_dim or 0):
                raise ValueError(f"timestep_cond must have shape ({batch}, {self.config.time_cond_proj_dim}), "
                                 f"got {tuple(timestep_cond.shape)}")
        return self.time_embedding(t_emb.to(dtype), timestep_cond)  # (B, 4 * C0)

    # ---- forward -------------------------------------------------------------

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | float | int,
        encoder_hidden_states: Tensor,
        *,
        timestep_cond: Tensor | None = None,
        feature_cache: FeatureCache | None = None,
    ) -> Tensor:
        """sample (B, in_channels, h, w), timestep (B,) or scalar, encoder_hidden_states (B, M, D)
        -> (B, out_channels, h, w).  ``timestep_cond`` (B, time_cond_proj_dim): the guidance
        embedding of an LCM-distilled UNet (:func:`~latentdiff.models.layers.guidance_scale_embedding`);
        without it such a UNet runs on the time embedding alone, as diffusers' does.
        ``feature_cache``: DeepCache's reuse of the deep features across calls
        (:class:`latentdiff.speed.deepcache.FeatureCache`); on a call it marks as cached only
        ``conv_in``, the last layer of the last up block and ``conv_out`` run.

        Inputs are cast to the weights' dtype (so fp32 latents can drive fp16
        weights) and the output is returned in ``sample``'s dtype. Any h, w works:
        when they are not multiples of 2**(levels - 1), each upsampler is told the
        size of the skip it must match, as diffusers does.
        """
        in_dtype = sample.dtype
        dtype = self.dtype
        x = sample.to(dtype)
        context = encoder_hidden_states.to(dtype)
        batch = x.shape[0]
        if context.shape[0] != batch:
            raise ValueError(f"encoder_hidden_states batch {context.shape[0]} != sample batch {batch}")

        factor = 2 ** (self.config.levels - 1)
        forward_upsample_size = any(s % factor for s in x.shape[-2:])

        temb = self.time_embed(timestep, batch, dtype, timestep_cond)
        if self.config.center_input_sample:
            x = 2 * x - 1.0
        x = self.conv_in(x)
        if feature_cache is not None and feature_cache.reuse(x.shape):
            last = self.up_blocks[-1]  # its last layer takes conv_in's output as its skip
            x = last.layer(len(last.resnets) - 1, feature_cache.features, x, temb, context)
            return self.conv_out(self.conv_act(self.conv_norm_out(x))).to(in_dtype)

        skips: list[Tensor] = [x]
        for block in self.down_blocks:
            x, block_skips = self._run(block, x, temb, context)
            skips.extend(block_skips)

        x = self._run(self.mid_block, x, temb, context)

        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            upsample_size = None
            if forward_upsample_size and i < len(self.up_blocks) - 1:
                upsample_size = tuple(skips[-1].shape[2:])
            if feature_cache is not None and i == len(self.up_blocks) - 1:
                for j, skip in enumerate(reversed(block_skips)):  # keep the last layer's input
                    if j == len(block_skips) - 1:
                        feature_cache.store(x)
                    x = block.layer(j, x, skip, temb, context)
            else:
                x = self._run(block, x, block_skips, temb, context, upsample_size)

        x = self.conv_out(self.conv_act(self.conv_norm_out(x)))
        return x.to(in_dtype)
