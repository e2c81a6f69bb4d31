"""The sampler contract: denoiser, noise, callbacks, and the VP-model wrapper (see :mod:`latentdiff.samplers`)."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..schedule import NoiseSchedule

Denoiser = Callable[[Tensor, Tensor], Tensor]
Generator = torch.Generator | Sequence[torch.Generator] | None
Callback = Callable[[int, int, Tensor], Any] | None
# post_step(i, x) -> x: called with the sample that step i landed at (noise level sigmas[i + 1]);
# what it returns is the sample the sampler carries on from.  Blended inpainting uses it to put
# back the known latents; multistep samplers keep their history of x0 predictions untouched.
PostStep = Callable[[int, Tensor], Tensor] | None


class SamplingCancelled(Exception):
    """Raised when the step callback returns True."""


# ----------------------------------------------------------------------------- helpers
def _prepare(sigmas: Tensor) -> Tensor:
    sigmas = torch.as_tensor(sigmas).detach().cpu()
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError("sigmas must be a 1-D tensor with at least 2 entries")
    if not sigmas.is_floating_point():
        sigmas = sigmas.float()
    return sigmas


def _finish_step(callback: Callback, post_step: PostStep, step: int, total: int, x: Tensor, x0: Tensor) -> Tensor:
    """After step ``step``: apply ``post_step`` to the sample, then tell ``callback`` (which may cancel)."""
    if post_step is not None:
        x = post_step(step, x)
    if callback is not None and callback(step, total, x0) is True:
        raise SamplingCancelled(f"sampling cancelled by callback after step {step + 1}/{total}")
    return x


def randn_like(x: Tensor, generator: Generator) -> Tensor:
    """Standard normal noise shaped like ``x``, drawn as diffusers' ``randn_tensor`` does."""
    if generator is None:
        return torch.randn(x.shape, dtype=torch.float32, device=x.device).to(x.dtype)
    if isinstance(generator, (list, tuple)):
        if len(generator) == 1:
            generator = generator[0]
        else:
            if len(generator) != x.shape[0]:
                raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
            parts = [
                torch.randn((1, *x.shape[1:]), generator=g, device=g.device,
                            dtype=torch.float32 if g.device.type == "cpu" else x.dtype)
                for g in generator
            ]
            return torch.cat(parts).to(device=x.device, dtype=x.dtype)
    dtype = torch.float32 if generator.device.type == "cpu" else x.dtype
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=dtype).to(x.device, x.dtype)


def _reinterpret(x: Tensor, sigma_from: Tensor | float, sigma_to: Tensor | float) -> Tensor:
    """Re-read a sample at another noise level through VP space: ``x_vp`` is kept and
    re-divided by sqrt(abar) of the new level (what a VP scheduler does when it lands a step
    at one timestep and then evaluates the model at another)."""
    a, b = float(sigma_from), float(sigma_to)
    if a == b:
        return x
    return x * math.sqrt((1.0 + b * b) / (1.0 + a * a))


def vp_denoiser(model: Callable[..., Tensor], schedule: NoiseSchedule, *,
                prediction_type: str | None = None, discrete_timesteps: bool = False,
                timesteps: dict[float, float] | None = None) -> Callable[..., Tensor]:
    """Wrap a VP model ``model(x_vp, t, **kw) -> eps | v`` as a sigma-space denoiser
    ``denoise(x, sigma, **kw) -> x0``: input scaled by ``c_in = 1/sqrt(sigma^2+1)``, timestep
    ``timesteps[sigma]`` when the plan lists that sigma (:attr:`SigmaPlan.timesteps`), else
    ``schedule.sigma_to_t(sigma)`` (rounded when ``discrete_timesteps``).  ``t`` is passed as a
    float32 tensor of shape ``sigma.shape``.  Classifier-free guidance belongs in ``model``.
    The returned x0 has the dtype of ``x`` whatever the model computes in."""
    pred = prediction_type or schedule.config.prediction_type
    if pred not in ("epsilon", "v_prediction"):
        raise ValueError(f"unsupported prediction_type {pred!r}")
    table = dict(timesteps or {})

    def timestep(sigma: Tensor) -> Tensor:
        if sigma.ndim == 0 and float(sigma) in table:
            return torch.tensor(table[float(sigma)], dtype=torch.float32)
        return schedule.sigma_to_t(sigma, quantize=discrete_timesteps)

    def denoise(x: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        t = timestep(sigma)
        s = sigma.to(x.device)
        if s.ndim:
            s = s.reshape(-1, *([1] * (x.ndim - 1)))
        c_in = (s * s + 1) ** -0.5
        out = model(x * c_in, t.to(x.device), **kwargs).to(x.dtype)
        if pred == "epsilon":
            return x - s * out
        return x * c_in * c_in - s * c_in * out

    return denoise


def _prepare_prev(sigmas_prev: Tensor, n: int) -> Tensor:
    prev = torch.as_tensor(sigmas_prev).detach().cpu().float()
    if prev.shape != (n,):
        raise ValueError(f"sigmas_prev must have shape ({n},), got {tuple(prev.shape)}")
    return prev


def lagrange_basis(nodes: Sequence[float], j: int) -> list[float]:
    """Coefficients (of u^0, u^1, ...) of the Lagrange basis polynomial through ``nodes`` that is
    1 at ``nodes[j]`` and 0 at the others (LMS and DEIS integrate it over one step)."""
    poly = [1.0]
    for k in range(len(nodes)):
        if k == j:
            continue
        denom = nodes[j] - nodes[k]
        new = [0.0] * (len(poly) + 1)
        for p, c in enumerate(poly):
            new[p + 1] += c / denom
            new[p] -= c * nodes[k] / denom
        poly = new
    return poly
