"""Latent consistency model sampling (Luo et al. 2023) = diffusers' LCMScheduler, in sigma space."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..schedule import lcm_boundary_scalings
from .base import Callback, Denoiser, Generator, PostStep, _finish_step, _prepare, randn_like


@torch.no_grad()
def sample_lcm(denoise: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
               callback: Callback = None, post_step: PostStep = None, timesteps: Sequence[float] | None = None,
               timestep_scaling: float = 10.0, clip_sample: float | None = None) -> Tensor:
    """Multistep consistency sampling = diffusers' LCMScheduler.

    Each step predicts x0 (from eps or v, the denoiser's work), applies the consistency
    boundary conditions of its timestep ``timesteps[i]`` (:func:`~latentdiff.schedule.lcm_boundary_scalings`),
    ``denoised = c_out * x0 + c_skip * x_vp``, and re-noises that to the next level with fresh
    noise from ``generator``: in sigma space ``x' = denoised + sigmas[i + 1] * z``.  The last
    step returns ``denoised`` itself, with no draw (as diffusers), whatever ``sigmas[-1]`` is
    (the plan's is 0).  ``clip_sample`` clamps x0 before the boundary conditions.  Without
    ``timesteps`` (sigmas that are not an LCM plan's) the boundary conditions are c_skip = 0,
    c_out = 1 (their limit for a large ``timestep_scaling``)."""
    sigmas = _prepare(sigmas)
    n = len(sigmas) - 1
    if timesteps is not None and len(timesteps) != n:
        raise ValueError(f"timesteps must list one timestep per step ({n}), got {len(timesteps)}")
    for i in range(n):
        sigma = sigmas[i]
        x0 = denoise(x, sigma)
        if clip_sample is not None:
            x0 = x0.clamp(-clip_sample, clip_sample)
        if timesteps is None:
            denoised = x0
        else:
            c_skip, c_out = lcm_boundary_scalings(timesteps[i], timestep_scaling)
            s = float(sigma)
            sample_vp = x / math.sqrt(1.0 + s * s)
            denoised = c_out.to(x0.device) * x0 + c_skip.to(x0.device) * sample_vp
        x = denoised
        if i < n - 1:  # diffusers draws after every step but the last
            x = denoised + float(sigmas[i + 1]) * randn_like(denoised, generator)
        x = _finish_step(callback, post_step, i, n, x, denoised)
    return x
