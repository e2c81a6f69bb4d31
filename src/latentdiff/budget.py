"""The memory budget: refuse work that would not fit before allocating any of it.

A generation's peak memory beyond the loaded weights is dominated by full-resolution
activations: the VAE decoder's widest full-resolution stage (SD 1.x: 256 channels at the
image size, right after the last upsampler) and, far below it, the UNet's first level at the
latent size.  :func:`generation_bytes` estimates it from width, height, batch and the
model's configs (attention goes through ``scaled_dot_product_attention``, whose memory grows
linearly with the tokens, so nothing here is quadratic).  :func:`check` compares the estimate
with the budget and raises :class:`~latentdiff.errors.OutOfBudget` naming both.

The budget is, in order: an explicit ``budget`` argument, the ``LATENTDIFF_MEMORY_BUDGET``
environment variable ("6G", "512M", bytes), else 80% of the memory available now (the
kernel's MemAvailable, capped by a cgroup limit when there is one).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import BadArgument, OutOfBudget

if TYPE_CHECKING:
    from .pipeline import Pipeline
    from .settings import Settings

__all__ = ["available_memory", "memory_budget", "parse_size", "generation_bytes", "check", "format_bytes",
           "max_image_pixels", "ENV_BUDGET"]

ENV_BUDGET = "LATENTDIFF_MEMORY_BUDGET"
AVAILABLE_FRACTION = 0.8
# Live full-resolution buffers at the decoder's peak (input, norm, activation, conv output,
# residual, upsampled copy, allocator slack): the built-in model measured 288-346 MiB at
# 512 x 512 (or 64 images of 64 x 64) against the 430 MiB this estimates; SD 1.x's decoder alone
# 1037 MiB at 512 x 512 against 2560 MiB (a cautious bound: refusing early beats the OOM killer).
VAE_BUFFERS = 10
UNET_BUFFERS = 24  # at the latent size: CFG doubles the batch, transformer feed-forward is 8x wide
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """"6G", "512M", "1.5G", "123456" -> bytes (binary units)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)I?B?\s*", str(text).upper())
    if not match:
        raise BadArgument(f"memory size {text!r} is not a number of bytes with an optional K/M/G/T unit")
    value = float(match.group(1)) * _UNITS[match.group(2)]
    if value < 1:
        raise BadArgument(f"memory size {text!r} must be positive")
    return int(value)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_headroom() -> int | None:
    """limit - usage of this process' cgroup (v2, then v1), when a limit is set."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit_text = Path(limit_file).read_text().strip()
            if limit_text == "max" or int(limit_text) >= 2**60:
                return None
            return max(int(limit_text) - int(Path(usage_file).read_text().strip()), 0)
        except (OSError, ValueError):
            continue
    return None


def available_memory() -> int | None:
    """Bytes this process could still allocate (None where the system does not say)."""
    values = [v for v in (_meminfo_available(), _cgroup_headroom()) if v is not None]
    return min(values) if values else None


def total_memory() -> int | None:
    """The machine's physical memory in bytes (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def process_memory() -> int | None:
    """This process' resident set size in bytes, now (None where /proc does not say)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def memory_budget(budget: int | str | None = None) -> int | None:
    """The budget in bytes (see the module docstring); None when nothing bounds it."""
    if budget is None:
        budget = os.environ.get(ENV_BUDGET) or None
    if budget is not None:
        return parse_size(budget) if isinstance(budget, str) else int(budget)
    available = available_memory()
    return None if available is None else int(available * AVAILABLE_FRACTION)


def max_image_pixels(budget: int | None) -> int:
    """The largest input image (width x height) worth decoding within ``budget`` bytes: decoding,
    RGB conversion and a float32 copy take about 24 bytes a pixel (no limit without a budget
    beyond PIL's own decompression-bomb guard, 2**31 pixels)."""
    return 2**31 if budget is None else max(budget // 24, 1)


def _dtype_bytes(module) -> int:
    return next(module.parameters()).element_size()


def generation_bytes(pipe: Pipeline, settings: Settings, *, extra_pixels: int = 0) -> int:
    """Estimated peak bytes of one call beyond the loaded weights.  ``extra_pixels``: RGB pixels
    the caller will hold besides (e.g. an enlarged copy for viewing), at 2 x 3 bytes each."""
    batch, pixels = settings.batch, settings.width * settings.height
    vae_config, unet_config = pipe.vae.config, pipe.unet.config
    latent_pixels = pixels // (pipe.vae_factor**2)
    # The decoder's widest stage at full resolution: the last upsampler's channels (the first
    # up block's input when there is no upsampler), then float32 copies of the output.
    channels = list(vae_config.block_out_channels)
    full_res_channels = channels[1] if len(channels) > 1 else channels[0]
    vae_bytes = _dtype_bytes(pipe.vae)
    decode_pixels = pixels
    if settings.vae_tiling:  # one tile at a time (plus the float32 output of the whole image)
        decode_pixels = min(pixels, (vae_config.sample_size * 2) ** 2)
    decode = VAE_BUFFERS * full_res_channels * decode_pixels * vae_bytes * (1 if settings.vae_tiling else batch)
    images = batch * pixels * 3 * (4 * 3 + 1)  # float32 image, its [0,1] copy, numpy copy, uint8 PIL
    unet = UNET_BUFFERS * unet_config.block_out_channels[0] * latent_pixels * batch * _dtype_bytes(pipe.unet)
    latents = 16 * vae_config.latent_channels * latent_pixels * batch * 4  # sampler state and history
    return int(decode + images + unet + latents + extra_pixels * 6)


def check(pipe: Pipeline, settings: Settings, *, budget: int | str | None = None, extra_pixels: int = 0) -> int:
    """Raise :class:`OutOfBudget` when the estimated peak exceeds the budget; return the estimate."""
    needed = generation_bytes(pipe, settings, extra_pixels=extra_pixels)
    limit = memory_budget(budget if budget is not None else getattr(pipe, "memory_budget", None))
    if limit is not None and needed > limit:
        raise OutOfBudget(
            f"{settings.width}x{settings.height} x {settings.batch} image(s) needs about {format_bytes(needed)} "
            f"of memory, over the budget of {format_bytes(limit)}; use a smaller size or batch "
            f"(or vae_tiling for large images), or set {ENV_BUDGET}")
    return needed
