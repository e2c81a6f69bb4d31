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
  the same numbers in the same order as diffusers' schedulers.  DPM++ SDE draws from Brownian
  trees instead, one per element seeded with ``generator[i].initial_seed()`` (A1111's
  seeding; :class:`~latentdiff.samplers.sde.BrownianNoise`).
* ``callback(step, total, x0_pred)`` is called after each step; returning True cancels the
  run by raising :class:`SamplingCancelled`.

diffusers' discrete VP schedulers (DDIM, DDPM, PNDM, DPM-Solver, UniPC, DEIS) are reproduced here by
their exact sigma-space equivalents: dividing a VP update by sqrt(abar) of its target level
turns it into an update of ``x = x_vp / sqrt(abar)``; e.g. DDIM (eta=0) and PLMS's
"transfer" are Euler steps on eps, DDPM and DDIM(eta=1) are the ancestral (Euler a) step,
DPM-Solver++/UniPC become their k-diffusion forms, DEIS an Adams method in sigma, LCM's
consistency step a boundary-conditioned x0 re-noised to the next sigma.  With the plans of
:meth:`latentdiff.schedule.NoiseSchedule.plan`, results equal diffusers' within float
rounding; places where diffusers has a quirk are documented on the function that mirrors it.

:data:`SAMPLERS` maps ids to :class:`SamplerSpec`; :func:`get_sampler` resolves ids and
AUTOMATIC1111 display names.
"""

from __future__ import annotations

from .base import SamplingCancelled, randn_like, vp_denoiser
from .dpm2 import sample_dpm2, sample_dpm2_ancestral
from .k import lms_coefficient, sample_euler, sample_euler_ancestral, sample_heun, sample_lms
from .lcm import sample_lcm
from .multistep import deis_coefficient, sample_deis, sample_dpmpp_2m, sample_unipc
from .registry import SAMPLERS, SamplerSpec, get_sampler
from .sde import BrownianNoise, sample_dpmpp_2m_sde, sample_dpmpp_2s_ancestral, sample_dpmpp_sde
from .vp import sample_ddim, sample_ddpm, sample_plms

__all__ = [
    "randn_like",
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
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_sde",
    "sample_dpmpp_2s_ancestral",
    "BrownianNoise",
    "sample_dpm2",
    "sample_dpm2_ancestral",
    "sample_deis",
    "sample_lcm",
    "deis_coefficient",
    "lms_coefficient",
]
