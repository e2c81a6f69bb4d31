"""DPM2 and DPM2 ancestral (Karras et al. 2022's DPM-Solver-2 variant; diffusers' KDPM2 schedulers)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..schedule import kdpm2_step_levels
from .base import Callback, Denoiser, Generator, PostStep, _finish_step, _prepare, randn_like


@torch.no_grad()
def sample_dpm2(denoise: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                callback: Callback = None, post_step: PostStep = None) -> Tensor:
    """DPM2 = diffusers' KDPM2DiscreteScheduler (k-diffusion's ``sample_dpm_2`` without churn).

    Each step takes an Euler step to ``sigma_mid``, the log-midpoint of sigma and sigma'
    (:func:`~latentdiff.schedule.kdpm2_step_levels`), calls the model there and redoes the whole
    step with that slope: ``x' = x + d_mid (s' - s)``.  A step to sigma 0 is a plain Euler step
    (it returns x0), so n steps make 2n - 1 model calls, as diffusers' 2n - 1 timesteps.  The
    plan ("kdpm2") lists the midpoints with diffusers' (interpolated, float32) timesteps.
    ``callback`` gets the first x0 of each step."""
    sigmas = _prepare(sigmas)  # (n + 1,)
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_mid = kdpm2_step_levels(sigma, sigma_next)[0]
        denoised = denoise(x, sigma)
        d = (x - denoised) / sigma  # dx/dsigma, shaped like x
        x_mid = x + d * (sigma_mid - sigma)
        if float(sigma_mid) == 0:
            x = x_mid
        else:
            d_mid = (x_mid - denoise(x_mid, sigma_mid)) / sigma_mid
            x = x + d_mid * (sigma_next - sigma)
        x = _finish_step(callback, post_step, i, n, x, denoised)
    return x


@torch.no_grad()
def sample_dpm2_ancestral(denoise: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                          callback: Callback = None, post_step: PostStep = None) -> Tensor:
    """DPM2 ancestral = diffusers' KDPM2AncestralDiscreteScheduler (k-diffusion's
    ``sample_dpm_2_ancestral``, eta 1).

    As :func:`sample_dpm2`, but the step lands at ``sigma_down`` and fresh noise of std
    ``sigma_up`` is added (the Euler a split of :func:`~latentdiff.schedule.kdpm2_step_levels`),
    and the midpoint is that of sigma and sigma_down.  Noise is drawn once per two-call step,
    after the second call, also where ``sigma_up`` is 0 (as diffusers, so the generators stay in
    step with it); the final step to sigma 0 is a plain Euler step with no noise."""
    sigmas = _prepare(sigmas)  # (n + 1,)
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_mid, sigma_up, sigma_down = kdpm2_step_levels(sigma, sigma_next, ancestral=True)
        denoised = denoise(x, sigma)
        d = (x - denoised) / sigma  # dx/dsigma, shaped like x
        x_mid = x + d * (sigma_mid - sigma)
        if float(sigma_mid) == 0:
            x = x_mid
        else:
            d_mid = (x_mid - denoise(x_mid, sigma_mid)) / sigma_mid
            x = x + d_mid * (sigma_down - sigma)
            x = x + randn_like(x, generator) * sigma_up
        x = _finish_step(callback, post_step, i, n, x, denoised)
    return x
