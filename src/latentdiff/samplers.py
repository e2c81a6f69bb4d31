"""Samplers as plain functions over a denoiser (k-diffusion's "one denoiser contract").

Every sampler has the signature::

    sample_xxx(denoise, x, sigmas, *, generator=None, callback=None, **options) -> Tensor

* ``denoise(x, sigma) -> x0_pred`` works in sigma space, ``x = x0 + sigma * eps``
  (see :mod:`latentdiff.schedule`); ``sigma`` is a 0-d float tensor on the CPU.
* ``sigmas``: decreasing 1-D tensor; the model is evaluated at ``sigmas[:-1]`` and the result
  is at noise level ``sigmas[-1]`` (0, or a small positive sigma).
* ``x``: the starting sample, already at noise level ``sigmas[0]``.
* ``generator``: one ``torch.Generator`` or one per batch element.  With a list, the noise of
  element i is ``torch.randn((1, *x.shape[1:]), generator=generator[i])`` (float32 on a CPU
  generator's device, then moved to x's device/dtype); with one generator the whole batch is
  drawn at once.  This is exactly diffusers' ``randn_tensor``, so stochastic samplers draw
  the same numbers in the same order as diffusers' schedulers.
* ``callback(step, total, x0_pred)`` is called after each step; returning True cancels the
  run by raising :class:`SamplingCancelled`.

diffusers' discrete VP schedulers (DDIM, DDPM, PNDM, DPM-Solver, UniPC) are reproduced here by
their exact sigma-space equivalents: dividing a VP update by sqrt(abar) of its target level
turns it into an update of ``x = x_vp / sqrt(abar)``; e.g. DDIM (eta=0) and PLMS's
"transfer" are Euler steps on eps, DDPM and DDIM(eta=1) are the ancestral (Euler a) step,
DPM-Solver++/UniPC become their k-diffusion forms.  With the plans of
:meth:`latentdiff.schedule.NoiseSchedule.plan`, results equal diffusers' within float
rounding; places where diffusers has a quirk are documented on the function that mirrors it.

:data:`SAMPLERS` maps ids to :class:`SamplerSpec`; :func:`get_sampler` resolves ids and
AUTOMATIC1111 display names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .schedule import NoiseSchedule, SigmaPlan

__all__ = [
    "SamplingCancelled",
    "SamplerSpec",
    "SAMPLERS",
    "get_sampler",
    "vp_denoiser",
    "sample_ddim",
    "sample_ddpm",
    "sample_plms",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lms",
    "sample_dpmpp_2m",
    "sample_unipc",
    "lms_coefficient",
]

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
                prediction_type: str | None = None, discrete_timesteps: bool = False) -> Callable[..., Tensor]:
    """Wrap a VP model ``model(x_vp, t, **kw) -> eps | v`` as a sigma-space denoiser
    ``denoise(x, sigma, **kw) -> x0``: input scaled by ``c_in = 1/sqrt(sigma^2+1)``, timestep
    ``schedule.sigma_to_t(sigma)`` (rounded when ``discrete_timesteps``, see
    :attr:`SigmaPlan.discrete_timesteps`).  ``t`` is passed as a float32 tensor of shape
    ``sigma.shape``.  Classifier-free guidance belongs in ``model``."""
    pred = prediction_type or schedule.config.prediction_type
    if pred not in ("epsilon", "v_prediction"):
        raise ValueError(f"unsupported prediction_type {pred!r}")

    def denoise(x: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        t = schedule.sigma_to_t(sigma, quantize=discrete_timesteps)
        s = sigma.to(x.device)
        if s.ndim:
            s = s.reshape(-1, *([1] * (x.ndim - 1)))
        c_in = (s * s + 1) ** -0.5
        out = model(x * c_in, t.to(x.device), **kwargs)
        if pred == "epsilon":
            return x - s * out
        return x * c_in * c_in - s * c_in * out

    return denoise


# ----------------------------------------------------------------------------- samplers
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


def _prepare_prev(sigmas_prev: Tensor, n: int) -> Tensor:
    prev = torch.as_tensor(sigmas_prev).detach().cpu().float()
    if prev.shape != (n,):
        raise ValueError(f"sigmas_prev must have shape ({n},), got {tuple(prev.shape)}")
    return prev


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
    poly = [1.0]  # coefficients of u^0, u^1, ... with u = tau - origin
    for k in range(order):
        if k == j:
            continue
        denom = nodes[j] - nodes[k]
        new = [0.0] * (len(poly) + 1)
        for p, c in enumerate(poly):
            new[p + 1] += c / denom
            new[p] -= c * nodes[k] / denom
        poly = new
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


@torch.no_grad()
def sample_dpmpp_2m(denoise: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                    callback: Callback = None, post_step: PostStep = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) = diffusers' DPMSolverMultistepScheduler defaults
    (dpmsolver++, order 2, midpoint, lower_order_final, final sigma 0).

    In sigma space with ``t = -log sigma``, ``h = t' - t``:
    ``x' = (s'/s) x - expm1(-h) D`` where D is the current x0 for the first step and for a
    step to sigma 0 (which therefore returns x0), else
    ``D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev`` with ``r = h_prev / h``."""
    sigmas = _prepare(sigmas)
    n = len(sigmas) - 1
    old_denoised = None
    h_last = None
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if float(sigma_next) == 0:
            x = denoised
        else:
            t, t_next = -sigma.double().log(), -sigma_next.double().log()
            h = t_next - t
            ratio = float(sigma_next / sigma)
            phi = float(torch.expm1(-h))
            if old_denoised is None:
                x = ratio * x - phi * denoised
            else:
                r = float(h_last / h)
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
                x = ratio * x - phi * d
            h_last = h
        old_denoised = denoised
        x = _finish_step(callback, post_step, i, n, x, denoised)
    return x


def _unipc_coeffs(h: float, rks: list[float], order: int, variant: str) -> tuple[float, float, Tensor, Tensor]:
    """UniPC's h_phi_1, B(h), R matrix and b vector (Zhao et al. 2023), in float64."""
    hh = -h  # predict_x0
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    if variant == "bh1":
        b_h = hh
    elif variant == "bh2":
        b_h = math.expm1(hh)
    else:
        raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
    factorial = 1
    R, b = [], []
    for k in range(1, order + 1):
        R.append([r ** (k - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, torch.tensor(R, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)


@torch.no_grad()
def sample_unipc(denoise: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                 callback: Callback = None, post_step: PostStep = None, order: int = 2, variant: str = "bh2",
                 lower_order_final: bool = True, disable_corrector: Sequence[int] = ()) -> Tensor:
    """UniPC (Zhao et al. 2023) = diffusers' UniPCMultistepScheduler defaults (bh2, order 2,
    predict_x0, lower_order_final): a multistep predictor (UniP) and, at each model call, a
    corrector (UniC) that refines the previous step with the new x0 (no extra model call).

    All VP quantities divide out: with ``lambda = -log sigma``, ``h = lambda' - lambda``,
    ``x' = (s'/s) x - expm1(-h) x0 - B(h) * sum(rho_k D_k)``.  A step to sigma 0 returns x0
    (diffusers' lower_order_final makes that step first order, which gives x0; with higher
    order there it would divide by zero).  Coefficients are computed in float64 (diffusers:
    float32)."""
    sigmas = _prepare(sigmas)
    n = len(sigmas) - 1
    sig = [float(s) for s in sigmas]
    lam = [-math.log(s) if s > 0 else math.inf for s in sig]
    hist: list[Tensor] = []  # x0 predictions at steps i-len+1 .. i
    last_sample: Tensor | None = None
    last_order = 0
    lower_order_nums = 0
    disabled = set(disable_corrector)
    for i in range(n):
        denoised = denoise(x, sigmas[i])
        if i > 0 and last_sample is not None and (i - 1) not in disabled:
            # UniC: redo step i-1 (sigma[i-1] -> sigma[i]) using the new x0 at sigma[i].
            p = last_order
            m0 = hist[-1]
            h = lam[i] - lam[i - 1]
            rks = [(lam[i - 1 - k] - lam[i - 1]) / h for k in range(1, p)] + [1.0]
            d1s = [(hist[-(k + 1)] - m0) / rks[k - 1] for k in range(1, p)]
            h_phi_1, b_h, R, b = _unipc_coeffs(h, rks, p, variant)
            rhos_c = [0.5] if p == 1 else torch.linalg.solve(R, b).tolist()
            corr = sum(r * d for r, d in zip(rhos_c[:-1], d1s))
            x = (sig[i] / sig[i - 1]) * last_sample - h_phi_1 * m0 - b_h * (corr + rhos_c[-1] * (denoised - m0))
        hist = (hist + [denoised])[-order:]
        this_order = min(order, n - i) if lower_order_final else order
        this_order = min(this_order, lower_order_nums + 1)
        last_sample, last_order = x, this_order
        # UniP: sigma[i] -> sigma[i+1].
        if sig[i + 1] == 0:
            x = denoised
        else:
            p = this_order
            m0 = hist[-1]
            h = lam[i + 1] - lam[i]
            rks = [(lam[i - k] - lam[i]) / h for k in range(1, p)] + [1.0]
            d1s = [(hist[-(k + 1)] - m0) / rks[k - 1] for k in range(1, p)]
            h_phi_1, b_h, R, b = _unipc_coeffs(h, rks, p, variant)
            x = (sig[i + 1] / sig[i]) * x - h_phi_1 * m0
            if p >= 2:
                rhos_p = [0.5] if p == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
                x = x - b_h * sum(r * d for r, d in zip(rhos_p, d1s))
        lower_order_nums = min(lower_order_nums + 1, order)
        x = _finish_step(callback, post_step, i, n, x, denoised)
    return x


# ----------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class SamplerSpec:
    """A sampler: its function, A1111 display name, the diffusers scheduler it reproduces
    (class and extra config), and the :meth:`NoiseSchedule.plan` kind giving its sigmas."""

    id: str
    name: str
    fn: Callable[..., Tensor]
    diffusers_class: str
    plan_kind: str
    diffusers_config: dict[str, Any] = field(default_factory=dict)
    stochastic: bool = False

    def plan(self, schedule: NoiseSchedule, steps: int, *, strength: float | None = None) -> SigmaPlan:
        """Sigmas (and options) for ``steps`` steps, optionally the img2img tail."""
        plan = schedule.plan(self.plan_kind, steps, strength=strength)
        if self.id in ("ddim", "ddpm") and schedule.config.clip_sample:
            plan.options["clip_sample"] = schedule.config.clip_sample_range
        return plan

    def __call__(self, denoise: Denoiser, x: Tensor, sigmas: Tensor, **kwargs: Any) -> Tensor:
        return self.fn(denoise, x, sigmas, **kwargs)


def _spec(id: str, name: str, fn: Callable[..., Tensor], cls: str, kind: str, stochastic: bool = False,
          **config: Any) -> SamplerSpec:
    return SamplerSpec(id, name, fn, cls, kind, dict(config), stochastic)


SAMPLERS: dict[str, SamplerSpec] = {
    s.id: s
    for s in [
        _spec("ddim", "DDIM", sample_ddim, "DDIMScheduler", "ddim"),
        _spec("ddpm", "DDPM", sample_ddpm, "DDPMScheduler", "ddpm", stochastic=True),
        _spec("plms", "PLMS", sample_plms, "PNDMScheduler", "pndm", skip_prk_steps=True),
        _spec("euler", "Euler", sample_euler, "EulerDiscreteScheduler", "euler"),
        _spec("euler_a", "Euler a", sample_euler_ancestral, "EulerAncestralDiscreteScheduler", "euler",
              stochastic=True),
        _spec("heun", "Heun", sample_heun, "HeunDiscreteScheduler", "euler"),
        _spec("lms", "LMS", sample_lms, "LMSDiscreteScheduler", "euler"),
        _spec("dpmpp_2m", "DPM++ 2M", sample_dpmpp_2m, "DPMSolverMultistepScheduler", "dpm"),
        _spec("dpmpp_2m_karras", "DPM++ 2M Karras", sample_dpmpp_2m, "DPMSolverMultistepScheduler",
              "dpm_karras", use_karras_sigmas=True),
        _spec("unipc", "UniPC", sample_unipc, "UniPCMultistepScheduler", "dpm"),
    ]
}


def get_sampler(name: str) -> SamplerSpec:
    """Look a sampler up by id ("euler_a") or A1111 name ("Euler a"), case-insensitively."""
    key = name.strip().lower()
    for spec in SAMPLERS.values():
        if key in (spec.id, spec.name.lower()):
            return spec
    valid = ", ".join(f"{s.id!r} ({s.name!r})" for s in SAMPLERS.values())
    raise ValueError(f"unknown sampler {name!r}; valid ids (A1111 names): {valid}")
