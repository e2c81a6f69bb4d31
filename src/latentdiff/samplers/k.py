"""k-diffusion-style samplers: Euler, Euler ancestral, Heun, LMS (diffusers' *DiscreteScheduler family)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import Callback, Denoiser, Generator, PostStep, _finish_step, _prepare, lagrange_basis, randn_like

@torch.no_grad()
def sample_euler(denoise: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                 callback: Callback = None, post_step: PostStep = None, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = float("inf"), s_noise: float = 1.0) -> Tensor:
    """Euler (Karras et al. 2022, Algorithm 2) = diffusers' EulerDiscreteScheduler.

    With ``s_churn > 0`` noise is added before the model call as in k-diffusion (diffusers
    instead evaluates the model on the sample before the churn noise was added; defaults
    disable churn, where both agree)."""
    sigmas = _prepare(sigmas)
    n = len(sigmas) - 1
    for i in range(n):
        sigma = sigmas[i]
        gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= float(sigma) <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            x = x + randn_like(x, generator) * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
        denoised = denoise(x, sigma_hat)
        d = (x - denoised) / sigma_hat
        x = x + d * (sigmas[i + 1] - sigma_hat)
        x = _finish_step(callback, post_step, i, n, x, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoise: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                           callback: Callback = None, post_step: PostStep = None, eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    """Euler ancestral = diffusers' EulerAncestralDiscreteScheduler (eta=1): an Euler step to
    ``sigma_down`` then fresh noise of std ``sigma_up``, with
    ``sigma_up = min(s', eta * sqrt(s'^2 (s^2 - s'^2) / s^2))``, ``sigma_down = sqrt(s'^2 - sigma_up^2)``.
    No noise is drawn for a step to sigma 0 (diffusers draws it and multiplies it by 0)."""
    sigmas = _prepare(sigmas)
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        d = (x - denoised) / sigma
        x = x + d * (sigma_down - sigma)
        if float(sigma_next) > 0 and float(sigma_up) > 0:
            x = x + randn_like(x, generator) * (s_noise * sigma_up)
        x = _finish_step(callback, post_step, i, n, x, denoised)
    return x


@torch.no_grad()
def sample_heun(denoise: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                callback: Callback = None, post_step: PostStep = None) -> Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 1 without churn) =
    diffusers' HeunDiscreteScheduler: two model calls per step, an Euler step for the last
    step to sigma 0 (so 2n-1 calls)."""
    sigmas = _prepare(sigmas)
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        d = (x - denoised) / sigma
        dt = sigma_next - sigma
        if float(sigma_next) == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = denoise(x_2, sigma_next)
            d_2 = (x_2 - denoised_2) / sigma_next
            x = x + (d + d_2) / 2 * dt
        x = _finish_step(callback, post_step, i, n, x, denoised)
    return x


def lms_coefficient(sigmas: Sequence[float], i: int, order: int, j: int) -> float:
    """Integral over [sigmas[i], sigmas[i+1]] of the Lagrange basis polynomial through
    sigmas[i], sigmas[i-1], ..., sigmas[i-order+1] that is 1 at sigmas[i-j].

    Computed exactly: the polynomial is expanded in powers of (tau - sigmas[i]) and integrated
    term by term (diffusers uses scipy's adaptive quadrature, exact for these low degrees)."""
    origin = float(sigmas[i])
    nodes = [float(sigmas[i - k]) - origin for k in range(order)]
    poly = lagrange_basis(nodes, j)  # coefficients of powers of u (u = tau - origin)
    h = float(sigmas[i + 1]) - origin
    return sum(c * h ** (p + 1) / (p + 1) for p, c in enumerate(poly))


@torch.no_grad()
def sample_lms(denoise: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
               callback: Callback = None, post_step: PostStep = None, order: int = 4) -> Tensor:
    """Linear multistep (Adams-Bashforth in sigma, order up to ``order``, warming up from 1) =
    diffusers' LMSDiscreteScheduler (order 4).

    Deviation: for img2img (a tail of the schedule) the warm-up restarts at order 1.  diffusers
    takes the order from the absolute step index, so its first tail steps use coefficients of
    a higher-order polynomial through sigmas that were never visited, truncated to the
    derivatives it has (a diffusers bug, not mirrored)."""
    sigmas = _prepare(sigmas)
    n = len(sigmas) - 1
    sig = [float(s) for s in sigmas]
    ds: list[Tensor] = []
    for i in range(n):
        sigma = sigmas[i]
        denoised = denoise(x, sigma)
        ds.append((x - denoised) / sigma)
        if len(ds) > order:
            ds.pop(0)
        cur_order = min(i + 1, order)
        coeffs = [lms_coefficient(sig, i, cur_order, j) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        x = _finish_step(callback, post_step, i, n, x, denoised)
    return x
