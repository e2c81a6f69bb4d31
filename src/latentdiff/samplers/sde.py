"""Stochastic DPM-Solver++ samplers: DPM++ 2M SDE, DPM++ SDE (Brownian-tree noise), DPM++ 2S a.

All three work in sigma space (``x = x0 + sigma * eps``) with k-diffusion's ``t = -log sigma``.
Their noise comes from a *noise sampler* ``noise(sigma, sigma_next) -> unit normal noise shaped
like x`` (k-diffusion's ``noise_sampler`` argument): by default the per-image generators
(:func:`~latentdiff.samplers.randn_like`, as diffusers' ``randn_tensor``), or, for DPM++ SDE, a
Brownian tree per image (:class:`BrownianNoise`, torchsde's ``BrownianInterval`` as diffusers
and k-diffusion use it).

AUTOMATIC1111 (k-diffusion's samplers) differs from diffusers for these names: its "Automatic"
schedule type is Karras for DPM++ SDE and DPM++ 2S a, Exponential for DPM++ 2M SDE (here
"Automatic" is the diffusers class' own spacing; the schedule types are there to pick); it gives
DPM++ SDE *and* DPM++ 2M SDE Brownian-tree noise, one tree per image seeded with the image's
seed over the whole schedule's sigma range, drawn with its RNG source (GPU by default; a CPU
generator's trees, as here, are its "CPU" source), where diffusers' DPM++ 2M SDE draws generator
noise and its DPM++ SDE grows one tree for the whole batch.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import torch
import torchsde
from torch import Tensor

from ..schedule import sde_midpoint_sigma
from .base import Callback, Denoiser, Generator, PostStep, _finish_step, _prepare, randn_like

#: ``noise(sigma, sigma_next) -> Tensor``: unit-variance noise shaped like the sample, for the step
#: from ``sigma`` to ``sigma_next`` (k-diffusion's ``noise_sampler``).
NoiseSampler = Callable[[Tensor, Tensor], Tensor]


def _generator_noise(x: Tensor, generator: Generator) -> NoiseSampler:
    """Fresh noise from ``generator`` at every call (k-diffusion's ``default_noise_sampler``,
    drawn as diffusers' ``randn_tensor``)."""
    return lambda sigma, sigma_next: randn_like(x, generator)


class BrownianNoise:
    """Noise from Brownian motion over noise levels:
    ``noise(s, s') = (W(s') - W(s)) / sqrt(|s' - s|)``, so the noise of nearby steps is
    correlated the way the SDE's is, whatever the step sizes.

    As k-diffusion's ``BrownianTreeNoiseSampler`` and diffusers' (``BatchedBrownianTree``): one
    ``torchsde.BrownianInterval`` on ``[sigma_min, sigma_max]`` (``tol=1e-6, pool_size=24,
    halfway_tree=True``, entropy = the seed) per seed.  ``seed`` a sequence: one tree per batch
    element, each the size of one element (k-diffusion's batched trees, A1111's seeding); an
    int: one tree the size of the whole batch (diffusers' ``noise_sampler_seed``); None: a
    random seed.  For one image both give the same numbers.

    The trees are drawn on ``device`` in ``dtype`` (default: x's) and the noise is returned on
    x's device in x's dtype.  The path depends on the interval, so a tail of a schedule
    (img2img) must pass the whole schedule's sigma_min/sigma_max to get the same noise.
    """

    def __init__(self, x: Tensor, sigma_min: float | Tensor, sigma_max: float | Tensor,
                 seed: int | Sequence[int] | None = None, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        lo, hi = float(sigma_min), float(sigma_max)
        # k-diffusion/diffusers sort the ends and keep the sign (-1 also when they are equal)
        t0, t1, self._sign = (lo, hi, 1) if lo < hi else (hi, lo, -1)
        if seed is None:
            seed = int(torch.randint(0, 2**63 - 1, []).item())
        self._batched = not isinstance(seed, int)
        seeds = [int(s) for s in seed] if self._batched else [seed]
        if self._batched and len(seeds) != x.shape[0]:
            raise ValueError(f"got {len(seeds)} Brownian-tree seeds for a batch of {x.shape[0]}")
        size = tuple(x.shape[1:]) if self._batched else tuple(x.shape)
        self._device, self._dtype = x.device, x.dtype
        self._trees = [
            torchsde.BrownianInterval(t0=t0, t1=t1, size=size, dtype=dtype or x.dtype,
                                      device=device or x.device, entropy=s, tol=1e-6, pool_size=24,
                                      halfway_tree=True)
            for s in seeds
        ]

    @classmethod
    def for_generators(cls, x: Tensor, sigma_min: float | Tensor, sigma_max: float | Tensor,
                       generator: Generator) -> "BrownianNoise":
        """Trees seeded from the sampler's generators: a list gives one tree per image, seeded
        with ``generator[i].initial_seed()`` (the image's seed); one generator gives one tree for
        the batch with its seed; None a random seed.  The trees live where the generators do, in
        float32 on a CPU generator (as :func:`randn_like` draws), so results do not depend on the
        device the sample is on."""
        if generator is None:
            return cls(x, sigma_min, sigma_max, None)
        if isinstance(generator, (list, tuple)):
            if len(generator) == 1:
                generator = generator[0]
            else:
                g = generator[0]
                return cls(x, sigma_min, sigma_max, [gi.initial_seed() for gi in generator], device=g.device,
                           dtype=torch.float32 if g.device.type == "cpu" else x.dtype)
        dtype = torch.float32 if generator.device.type == "cpu" else x.dtype
        return cls(x, sigma_min, sigma_max, generator.initial_seed(), device=generator.device, dtype=dtype)

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        a, b = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        lo, hi, sign = (a, b, 1) if a < b else (b, a, -1)
        with warnings.catch_warnings():
            # torchsde rounds the interval's ends to 6 decimals and clamps (with a warning) the
            # queries just outside it, e.g. sigma_fn(t_fn(sigma_max)), in diffusers and k-diffusion too
            warnings.filterwarnings("ignore", message="Should have", category=UserWarning)
            w = torch.stack([tree(lo, hi) for tree in self._trees]) * (self._sign * sign)
        w = w if self._batched else w[0]
        return (w / (b - a).abs().sqrt()).to(self._device, self._dtype)


def _ancestral_step(sigma_from: Tensor, sigma_to: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """k-diffusion's ``get_ancestral_step``: (sigma_down, sigma_up) with
    ``sigma_up = min(s', eta * sqrt(s'^2 (s^2 - s'^2) / s^2))``, ``sigma_down = sqrt(s'^2 - sigma_up^2)``."""
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def _t(sigma: Tensor) -> Tensor:
    return sigma.log().neg()


def _sigma(t: Tensor) -> Tensor:
    return t.neg().exp()


@torch.no_grad()
def sample_dpmpp_2m_sde(denoise: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                        callback: Callback = None, post_step: PostStep = None, eta: float = 1.0,
                        s_noise: float = 1.0, solver_type: str = "midpoint",
                        noise_sampler: NoiseSampler | None = None) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022) = diffusers' DPMSolverMultistepScheduler with
    ``algorithm_type="sde-dpmsolver++"`` (order 2, midpoint, lower_order_final, final sigma 0)
    and k-diffusion's ``sample_dpmpp_2m_sde``.

    With ``h = log(s / s')``, ``b = 1 - e^(-h - eta h)``, ``r = h_prev / h``:
    ``x' = (s'/s) e^(-eta h) x + b x0 + c (x0 - x0_prev) / r + s' sqrt(1 - e^(-2 eta h)) z``
    with ``c = b / 2`` ("midpoint") or ``1 - b / (h + eta h)`` ("heun"), and no ``c`` term at
    the first step; a step to sigma 0 returns x0.  Coefficients in float64.

    Noise ``z``: by default fresh normal noise from ``generator`` at every step that does not
    end at sigma 0, drawn as diffusers draws it in ``step()`` (diffusers also draws, and
    multiplies by 0, at that last step).  ``noise_sampler`` replaces it, e.g. a
    :class:`BrownianNoise` for A1111's "DPM++ 2M SDE", which uses k-diffusion's Brownian tree.

    A step between equal sigmas (``h = 0``, e.g. repeated timesteps of 1000-step schedules)
    leaves x unchanged and the multistep history as it was; diffusers divides by ``h = 0`` in
    the step after it (NaN)."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    sigmas = _prepare(sigmas)
    n = len(sigmas) - 1
    noise = noise_sampler or _generator_noise(x, generator)
    old_denoised: Tensor | None = None
    h_last = 0.0
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if float(sigma_next) == 0:
            x = denoised
        else:
            s, s_next = float(sigma), float(sigma_next)
            h = math.log(s) - math.log(s_next)
            eta_h = eta * h
            b = -math.expm1(-h - eta_h)
            x = (s_next / s * math.exp(-eta_h)) * x + b * denoised
            if old_denoised is not None and h != 0:
                c = 0.5 * b if solver_type == "midpoint" else 1 - b / (h + eta_h)
                x = x + (c * h / h_last) * (denoised - old_denoised)
            if eta:
                x = x + noise(sigma, sigma_next) * (s_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise)
            if h != 0:
                old_denoised, h_last = denoised, h
        x = _finish_step(callback, post_step, i, n, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_sde(denoise: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                     callback: Callback = None, post_step: PostStep = None, eta: float = 1.0,
                     s_noise: float = 1.0, r: float = 0.5, noise_sampler: NoiseSampler | None = None,
                     brownian_range: tuple[float, float] | None = None) -> Tensor:
    """DPM-Solver++ (stochastic, 2 model calls a step) = diffusers' DPMSolverSDEScheduler and
    k-diffusion's ``sample_dpmpp_sde``.

    Each step: an ancestral DPM-Solver++ step to the log-midpoint ``s_mid = exp(-(t + r h))``
    with noise, a model call there, then the step from ``sigma`` to ``sigma'`` with
    ``D = (1 - 1/(2r)) x0 + 1/(2r) x0_mid`` and noise; a step to sigma 0 is an Euler step
    (so ``2n - 1`` model calls).  The t / sigma conversions are done in the sigmas' dtype with
    k-diffusion's (and diffusers') ops, so ``sigma_fn(t_fn(sigma))``, not ``sigma``, enters the
    ancestral steps and the noise queries, as there; the midpoint sigma is the one
    :func:`~latentdiff.schedule.sde_midpoint_sigma` gives, whose timestep the plan lists.

    Noise: by default a :class:`BrownianNoise` over ``brownian_range`` (default: the smallest
    positive and the largest of ``sigmas``; plans of kind "dpm_sde" pass the whole schedule's,
    as diffusers and A1111 do for img2img), seeded per image from ``generator``
    (:meth:`BrownianNoise.for_generators`): one image equals diffusers with
    ``noise_sampler_seed`` = its seed, a batch equals k-diffusion with one tree per image
    (diffusers seeds one tree for the whole batch).  ``noise_sampler`` replaces it.

    Deviation: a step that adds no noise (``sigma_up = 0``, e.g. between equal sigmas) does not
    query the noise sampler; k-diffusion and diffusers query it and get 0/0 = NaN there."""
    sigmas = _prepare(sigmas)
    n = len(sigmas) - 1
    if noise_sampler is None:
        if brownian_range is None:
            positive = sigmas[sigmas > 0]
            brownian_range = (float(positive.min()), float(sigmas.max())) if len(positive) else (0.0, 0.0)
        noise_sampler = BrownianNoise.for_generators(x, *brownian_range, generator)
    fac = 1 / (2 * r)
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if float(sigma_next) == 0:
            x = x + (x - denoised) / sigma * (sigma_next - sigma)
        else:
            t, t_next = _t(sigma), _t(sigma_next)
            sigma_from, sigma_mid = _sigma(t), sde_midpoint_sigma(sigma, sigma_next, r)
            # step 1: ancestral step to the midpoint
            sd, su = _ancestral_step(sigma_from, sigma_mid, eta)
            t_down = _t(sd)
            x_2 = (_sigma(t_down) / sigma_from) * x - (t - t_down).expm1() * denoised
            if float(su) > 0:
                x_2 = x_2 + noise_sampler(sigma_from, sigma_mid) * s_noise * su
            denoised_2 = denoise(x_2, sigma_mid)
            # step 2: the whole step with the midpoint's x0
            sigma_to = _sigma(t_next)
            sd, su = _ancestral_step(sigma_from, sigma_to, eta)
            t_down = _t(sd)
            d = (1 - fac) * denoised + fac * denoised_2
            x = (_sigma(t_down) / sigma_from) * x - (t - t_down).expm1() * d
            if float(su) > 0:
                x = x + noise_sampler(sigma_from, sigma_to) * s_noise * su
        x = _finish_step(callback, post_step, i, n, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoise: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                              callback: Callback = None, post_step: PostStep = None, eta: float = 1.0,
                              s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None) -> Tensor:
    """DPM-Solver++(2S) ancestral = k-diffusion's ``sample_dpmpp_2s_ancestral`` (A1111's
    "DPM++ 2S a"; diffusers has no such scheduler).

    Each step: the ancestral split ``(sigma_down, sigma_up)`` of ``sigma -> sigma'``, a
    single-step second-order DPM-Solver++ step to sigma_down through the log-midpoint (a
    second model call there), then noise of std ``sigma_up``; a step to sigma 0 is an Euler
    step (``2n - 1`` model calls).  Noise: from ``generator`` (:func:`randn_like`) at every step
    that does not end at sigma 0, or from ``noise_sampler``."""
    sigmas = _prepare(sigmas)
    n = len(sigmas) - 1
    noise = noise_sampler or _generator_noise(x, generator)
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
        if float(sigma_down) == 0:
            x = x + (x - denoised) / sigma * (sigma_down - sigma)
        else:
            t, t_next = _t(sigma), _t(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (_sigma(s) / _sigma(t)) * x - (-0.5 * h).expm1() * denoised
            denoised_2 = denoise(x_2, _sigma(s))
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_2
        if float(sigma_next) > 0:
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
        x = _finish_step(callback, post_step, i, n, x, denoised)
    return x
