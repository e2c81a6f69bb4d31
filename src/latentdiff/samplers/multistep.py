"""Multistep exponential-integrator samplers: DPM-Solver++(2M), UniPC, DEIS."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .base import Callback, Denoiser, Generator, PostStep, _finish_step, _prepare, lagrange_basis

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


def deis_coefficient(sigmas: Sequence[float], i: int, order: int, j: int) -> float:
    """DEIS's "logrho" coefficient: the integral over rho in [sigmas[i], sigmas[i+1]] of the
    Lagrange basis polynomial in log(rho) through log sigmas[i], ..., log sigmas[i-order+1] that
    is 1 at log sigmas[i-j] (diffusers' ``ind_fn`` differences, for any order).

    With ``v = log(rho / sigmas[i])`` the polynomial is expanded in powers of v and each
    ``integral_0^h v^m e^v dv = h^m e^h - m * (the one for m - 1)``, starting from expm1(h),
    is exact in float64 (diffusers: float32)."""
    base = math.log(sigmas[i])
    nodes = [math.log(sigmas[i - k]) - base for k in range(order)]
    poly = lagrange_basis(nodes, j)  # coefficients of powers of v (v = log(rho / sigmas[i]))
    h = math.log(sigmas[i + 1]) - base
    integral = math.expm1(h)
    total = poly[0] * integral
    for m in range(1, len(poly)):
        integral = h**m * math.exp(h) - m * integral
        total += poly[m] * integral
    return sigmas[i] * total


@torch.no_grad()
def sample_deis(denoise: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                callback: Callback = None, post_step: PostStep = None, order: int = 2,
                lower_order_final: bool | None = None) -> Tensor:
    """DEIS (Zhang & Chen 2022) = diffusers' DEISMultistepScheduler defaults (deis, "logrho",
    order 2, lower_order_final): a multistep Adams method on eps in rho = sigma.

    diffusers' VP update ``x_t = alpha_t (x_s / alpha_s + sum_j c_j eps_j)``, divided by alpha_t,
    is ``x' = x + sum_j c_j eps_j`` here, ``eps_j = (x_j - x0_j) / sigma_j``, with the c_j of
    :func:`deis_coefficient` (order 1: an Euler step).  The order warms up from 1 and, with
    ``lower_order_final``, drops at the end (``min(order, i + 1, n - i)``); None means
    diffusers' rule: only for runs of fewer than 15 steps (the "deis" plan passes the whole
    run's value, so an img2img tail decides as diffusers does).  A step between equal sigmas
    changes nothing (diffusers' repeated final Karras sigma).  Deviations: where two of the
    previous sigmas coincide (diffusers' spacing repeats a level at ~1000 steps) the order is
    lowered instead of dividing by zero (diffusers gives NaN); a step to sigma 0 returns x0."""
    if order not in (1, 2, 3):
        raise ValueError(f"DEIS order must be 1, 2 or 3, got {order}")
    sigmas = _prepare(sigmas)
    n = len(sigmas) - 1
    sig = [float(s) for s in sigmas]
    if lower_order_final is None:
        lower_order_final = n < 15
    eps: list[Tensor] = []  # eps at steps i-len+1 .. i, each shaped like x
    for i in range(n):
        denoised = denoise(x, sigmas[i])
        eps = (eps + [(x - denoised) / sigmas[i]])[-order:]
        if sig[i + 1] == 0:
            x = denoised
        else:
            p = min(order, i + 1, n - i) if lower_order_final else min(order, i + 1)
            while p > 1 and len(set(sig[i - p + 1:i + 1])) < p:
                p -= 1
            x = x + sum(deis_coefficient(sig, i, p, j) * eps[-1 - j] for j in range(p))
        x = _finish_step(callback, post_step, i, n, x, denoised)
    return x
