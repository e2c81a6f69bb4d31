"""The networks' default dtype: what the hardware runs fastest without losing the image.

- CUDA: float16 (every CUDA GPU runs it natively; a VAE whose config sets ``force_upcast``
  still decodes in float32);
- a CPU that runs bfloat16 natively (AVX512-BF16 or AMX-BF16, detected, not guessed):
  bfloat16 (about 2.5x float32's speed on an AVX512-BF16 CPU; latents and sampler state stay float32);
- any other CPU: float32 (bfloat16 there is emulated and slower than float32).

``LATENTDIFF_DTYPE`` (``float32``, ``float16``, ``bfloat16``) overrides the choice for a
process; an explicit ``dtype=`` / ``--dtype`` overrides both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import BadArgument

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ENV = "LATENTDIFF_DTYPE"


@dataclass(frozen=True)
class DtypeChoice:
    """A dtype and why it was chosen (printed once by the CLI, kept on the pipeline)."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


@lru_cache(maxsize=1)
def native_bf16() -> str | None:
    """The CPU feature that runs bfloat16 natively ("AMX-BF16", "AVX512-BF16"), or None."""
    try:
        if torch.cpu._is_amx_tile_supported():
            return "AMX-BF16"
        if torch.cpu._is_avx512_bf16_supported():
            return "AVX512-BF16"
        return None
    except AttributeError:  # a torch without the probes: read the kernel's CPU flags
        pass
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return None
    if "amx_bf16" in flags:
        return "AMX-BF16"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return None


def choose_dtype(device: torch.device | str = "cpu") -> DtypeChoice:
    """The default dtype of networks on ``device`` (see the module's text)."""
    forced = os.environ.get(ENV)
    if forced:
        if forced not in DTYPES:
            raise BadArgument(f"{ENV}={forced!r} is not one of {', '.join(DTYPES)}")
        return DtypeChoice(DTYPES[forced], f"{forced} ({ENV})")
    device = torch.device(device)
    if device.type == "cuda":
        return DtypeChoice(torch.float16, "float16 (CUDA)")
    if device.type == "cpu":
        feature = native_bf16()
        if feature:
            return DtypeChoice(torch.bfloat16, f"bfloat16 (the CPU runs it natively: {feature})")
        return DtypeChoice(torch.float32, "float32 (the CPU has no native bfloat16)")
    return DtypeChoice(torch.float32, f"float32 ({device.type})")
