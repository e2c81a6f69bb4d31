"""Building blocks shared by the autoencoder and the UNet.

Submodule names mirror the diffusers state dict (``norm1``, ``conv1``,
``time_emb_proj``, ``to_q``, ``to_out.0``, ``ff.net.0.proj`` ...), so a diffusers
checkpoint loads by identity and the original single-file layout is a rename
table (see ``latentdiff.checkpoints.single_file``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-Conv twice, with an optional timestep bias and a 1x1 shortcut."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        groups: int = 32,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        """x (B, Cin, H, W), temb (B, T) -> (B, Cout, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, Cout, 1, 1)
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. ``padding=0`` pads right/bottom by one first (the VAE's asymmetric variant)."""

    def __init__(self, channels: int, padding: int = 1) -> None:
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x (or to ``output_size``) followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, output_size: tuple[int, int] | None = None) -> Tensor:
        dtype = x.dtype
        if dtype == torch.bfloat16:  # nearest upsampling of bf16 is slow or missing on some backends
            x = x.float()
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=output_size, mode="nearest")
        return self.conv(x.to(dtype))


class Attention(nn.Module):
    """Multi-head attention over tokens, with diffusers' parameter names.

    Used three ways: self-attention and cross-attention in the UNet's transformer
    blocks, and the single-head spatial self-attention of the VAE's mid block
    (``norm_num_groups`` set, ``residual=True``, 4-D input).
    """

    def __init__(
        self,
        query_dim: int,
        cross_attention_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        bias: bool = False,
        norm_num_groups: int | None = None,
        eps: float = 1e-6,
        residual: bool = False,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        context_dim = cross_attention_dim or query_dim
        self.heads = heads
        self.residual = residual
        self.group_norm = nn.GroupNorm(norm_num_groups, query_dim, eps=eps) if norm_num_groups else None
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(0.0)])

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x (B, N, C) or (B, C, H, W); context (B, M, Cctx) or None for self-attention."""
        residual = x
        spatial = x.ndim == 4
        if spatial:
            b, c, h, w = x.shape
            x = x.view(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        if self.group_norm is not None:
            x = self.group_norm(x.transpose(1, 2)).transpose(1, 2)
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        batch, n, inner = q.shape
        d = inner // self.heads
        q, k, v = (t.view(batch, -1, self.heads, d).transpose(1, 2) for t in (q, k, v))  # (B, heads, N, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        out = out.transpose(1, 2).reshape(batch, n, inner)  # (B, N, heads*d)
        out = self.to_out[1](self.to_out[0](out))
        if spatial:
            out = out.transpose(1, 2).reshape(b, c, h, w)
        return out + residual if self.residual else out


class GEGLU(nn.Module):
    """Linear projection to 2x width, gated by GELU of the second half."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward, ``net.0.proj`` / ``net.2`` as in diffusers."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, and GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, None, heads, dim_head)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, cross_attention_dim, heads, dim_head)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x (B, HW, C), context (B, M, Cctx) -> (B, HW, C)."""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """Spatial transformer: GroupNorm, project in, transformer blocks over HW tokens, project out, residual.

    ``use_linear_projection`` False (SD 1.x) projects with 1x1 convs before flattening;
    True (SD 2.x) with linear layers after flattening.
    """

    def __init__(
        self,
        heads: int,
        dim_head: int,
        in_channels: int,
        cross_attention_dim: int,
        num_layers: int = 1,
        norm_num_groups: int = 32,
        use_linear_projection: bool = False,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in: nn.Module = nn.Linear(in_channels, inner)
            self.proj_out: nn.Module = nn.Linear(inner, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, in_channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, cross_attention_dim) for _ in range(num_layers)
        )

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x (B, C, H, W), context (B, M, Cctx) -> (B, C, H, W)."""
        b, c, h, w = x.shape
        residual = x
        x = self.norm(x)
        if self.use_linear_projection:
            x = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C)
            x = self.proj_in(x)
        else:
            x = self.proj_in(x)
            x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)  # (B, HW, inner)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear_projection:
            x = self.proj_out(x)
            x = x.reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W)
        else:
            x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2)  # (B, inner, H, W)
            x = self.proj_out(x)
        return x + residual


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding, cosines first (diffusers' ``flip_sin_to_cos=True``, shift 0).

    timesteps (B,) -> (B, dim), float32.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    angles = timesteps[:, None].float() * torch.exp(exponent)[None, :]  # (B, half)
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def guidance_scale_embedding(w: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of guidance weights, sines first (diffusers'
    ``get_guidance_scale_embedding``, to the bit): ``w`` (B,) -> (B, dim) float32.  LCM-distilled
    UNets take it as ``timestep_cond`` with ``w = guidance_scale - 1``."""
    w = torch.as_tensor(w)
    if w.ndim != 1:
        raise ValueError(f"guidance weights must be a 1-D tensor, got shape {tuple(w.shape)}")
    if dim < 4:
        raise ValueError(f"guidance embedding dim must be >= 4, got {dim}")
    w = w * 1000.0
    half = dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step).to(w.device)
    angles = w.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """Two-layer SiLU MLP on the sinusoidal embedding (``linear_1``, ``linear_2``).  With
    ``cond_proj_dim`` (LCM-distilled UNets), a bias-free ``cond_proj`` of a condition vector
    is added to the input first."""

    def __init__(self, in_channels: int, time_embed_dim: int, cond_proj_dim: int | None = None) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.cond_proj = None if cond_proj_dim is None else nn.Linear(cond_proj_dim, in_channels, bias=False)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: Tensor, condition: Tensor | None = None) -> Tensor:
        if condition is not None:
            if self.cond_proj is None:
                raise ValueError("this timestep embedding takes no condition (its UNet has no time_cond_proj_dim)")
            x = x + self.cond_proj(condition.to(x.dtype))
        return self.linear_2(F.silu(self.linear_1(x)))
