"""Samplers of diffusers' discrete VP schedulers: DDIM, DDPM, PLMS (in their exact sigma-space forms)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import (Callback, Denoiser, Generator, PostStep, _finish_step, _prepare, _prepare_prev, _reinterpret,
                   randn_like)

def _ddim_update(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_prev: Tensor, eta: float,
                 generator: Generator, clip_sample: float | None, draw: bool) -> Tensor:
    """One DDIM step from ``sigma`` to ``sigma_prev`` in sigma space.

    VP DDIM ``x' = sqrt(a') x0 + sqrt(1 - a' - std^2) eps + std z`` divided by sqrt(a') gives
    ``x' = x0 + sqrt(s'^2 - su^2) eps + su z`` with ``su = eta * s' sqrt(s^2 - s'^2) / s``.
    ``clip_sample`` clamps x0 but, as diffusers (``use_clipped_model_output=False``), keeps the
    unclipped eps."""
    eps = (x - denoised) / sigma
    if clip_sample is not None:
        denoised = denoised.clamp(-clip_sample, clip_sample)
    s, sp = float(sigma), float(sigma_prev)
    su = eta * sp * math.sqrt(max(s * s - sp * sp, 0.0)) / s if eta > 0 else 0.0
    x = denoised + math.sqrt(max(sp * sp - su * su, 0.0)) * eps
    if draw:
        x = x + su * randn_like(x, generator)
    return x


@torch.no_grad()
def sample_ddim(denoise: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                callback: Callback = None, post_step: PostStep = None, eta: float = 0.0, sigmas_prev: Tensor | None = None,
                clip_sample: float | None = None) -> Tensor:
    """DDIM (Song et al. 2021) = diffusers' DDIMScheduler; eta=0 is deterministic (and equals
    Euler in sigma space), eta=1 is DDPM-like.

    ``sigmas_prev[i]``: the level step i lands at, when it differs from ``sigmas[i+1]``.
    diffusers' DDIM always steps to ``t - T // steps`` and then evaluates the model at the next
    listed timestep; with "linspace"/"trailing" spacing the two differ and the VP sample is
    reinterpreted at the new level (a diffusers quirk, mirrored; the plan supplies it).
    With eta > 0, noise is drawn at every step as diffusers does, including the last one
    (whose std is non-zero when the final sigma is sigma(t=0))."""
    sigmas = _prepare(sigmas)
    n = len(sigmas) - 1
    prev = sigmas[1:] if sigmas_prev is None else _prepare_prev(sigmas_prev, n)
    for i in range(n):
        sigma = sigmas[i]
        denoised = denoise(x, sigma)
        x = _ddim_update(x, denoised, sigma, prev[i], eta, generator, clip_sample, draw=eta > 0)
        x = _reinterpret(x, prev[i], sigmas[i + 1])
        x = _finish_step(callback, post_step, i, n, x, denoised)
    return x


@torch.no_grad()
def sample_ddpm(denoise: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                callback: Callback = None, post_step: PostStep = None, clip_sample: float | None = None) -> Tensor:
    """DDPM ancestral sampling = diffusers' DDPMScheduler (variance_type "fixed_small").

    The posterior q(x_{t'} | x_t, x0) in sigma space has mean ``x0 + (s'^2/s^2)(x - x0)`` and
    std ``s' sqrt(s^2 - s'^2) / s``: the Euler-ancestral / DDIM(eta=1) step.  Noise is drawn
    for every step whose target sigma is > 0 (diffusers also draws one at its final t > 0 step
    and scales it by ~1e-10)."""
    sigmas = _prepare(sigmas)
    n = len(sigmas) - 1
    for i in range(n):
        sigma = sigmas[i]
        denoised = denoise(x, sigma)
        if clip_sample is not None:  # the posterior mean uses the clipped x0 and the sample itself
            denoised = denoised.clamp(-clip_sample, clip_sample)
        x = _ddim_update(x, denoised, sigma, sigmas[i + 1], 1.0, generator, None,
                         draw=float(sigmas[i + 1]) > 0)
        x = _finish_step(callback, post_step, i, n, x, denoised)
    return x


@torch.no_grad()
def sample_plms(denoise: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                callback: Callback = None, post_step: PostStep = None, sigmas_prev: Tensor | None = None,
                sigma_restart: float | None = None) -> Tensor:
    """PLMS (pseudo linear multistep, Liu et al. 2022) = diffusers' PNDMScheduler with
    ``skip_prk_steps=True`` (SD's default scheduler).

    Linear multistep on eps with the DDIM "transfer" (an Euler step on eps in sigma space):
    step 0 is an Euler step followed by a trapezoidal correction (eps averaged with a model
    call at ``sigmas[1]``; diffusers lists that second call as a repeated timestep), then
    Adams-Bashforth of order 2, 3, 4 on the stored eps.  Mirrored diffusers quirks: the
    second-order step uses the eps of the first call and of the third call (the correction's
    eps is not stored), and, with non-"leading" spacing, each update lands at
    ``sigmas_prev[i]`` (t - T // steps) and the correction starts from ``sigma_restart``
    (t1 + T // steps) rather than from ``sigmas[0]`` (the plan supplies both).  Deterministic;
    ``generator`` is unused.  For v-prediction models diffusers averages v rather than eps;
    this sampler always averages eps (they differ only for v-prediction)."""
    sigmas = _prepare(sigmas)
    n = len(sigmas) - 1
    prev = sigmas[1:] if sigmas_prev is None else _prepare_prev(sigmas_prev, n)
    level = sigmas[0]  # the noise level x is currently expressed at
    ets: list[Tensor] = []
    for i in range(n):
        sigma = sigmas[i]
        x = _reinterpret(x, level, sigma)
        denoised = denoise(x, sigma)
        eps = (x - denoised) / sigma
        if i == 0:
            ets.append(eps)
            x_pred = x + (prev[0] - sigma) * eps
            if n == 1:
                x, level = x_pred, prev[0]
            else:
                s1 = sigmas[1]
                x_eval = _reinterpret(x_pred, prev[0], s1)
                denoised = denoise(x_eval, s1)
                eps1 = (x_eval - denoised) / s1
                s_r = sigma if sigma_restart is None else torch.tensor(float(sigma_restart))
                x = _reinterpret(x, sigma, s_r) + (s1 - s_r) * ((eps + eps1) / 2)
                level = s1
        else:
            ets = ets[-3:] + [eps]
            if len(ets) == 2:
                e = (3 * ets[-1] - ets[-2]) / 2
            elif len(ets) == 3:
                e = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
            else:
                e = (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24
            x = x + (prev[i] - sigma) * e
            level = prev[i]
        x = _finish_step(callback, post_step, i, n, x, denoised)
    return _reinterpret(x, level, sigmas[-1])
