"""Noise schedule: betas, cumulative alphas, sigmas, timestep spacing, sampler sigma plans.

Two parameterisations of the same forward process are used in this package:

* variance preserving (VP, what the UNet is trained on and what diffusers' DDIM/DDPM/PNDM/
  DPM-Solver/UniPC schedulers step in)::

      x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps

* variance exploding "sigma" space (k-diffusion, what every sampler in :mod:`latentdiff.samplers`
  steps in)::

      x = x0 + sigma * eps,    sigma = sqrt((1 - abar) / abar),    x = x_t / sqrt(abar)

so ``x_vp = x / sqrt(1 + sigma**2)`` and the UNet input is ``c_in(sigma) * x`` with
``c_in = 1 / sqrt(sigma**2 + 1)``, evaluated at timestep ``sigma_to_t(sigma)``.

Numerics mirror diffusers exactly (this matters for bit-level comparisons against it):
betas are built with ``torch.linspace(..., dtype=float32)`` (squared for "scaled_linear"),
``alphas_cumprod`` is a float32 ``torch.cumprod``, training sigmas are
``((1 - abar) / abar) ** 0.5`` in float32.  Interpolation of sigmas at (possibly fractional)
timesteps is done in float64 on those float32 values and the result rounded to float32, as
``np.interp`` does in diffusers.

The entry point for a sampler is :meth:`NoiseSchedule.plan`, which returns a
:class:`SigmaPlan`: the sigma sequence a given diffusers scheduler would step through for
``set_timesteps(steps)``, the scale of the initial noise, whether the model is fed integer
timesteps, extra sampler options mirroring diffusers' discrete-timestep quirks, and the
conversion of the final sample back to VP latents.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ScheduleConfig",
    "NoiseSchedule",
    "SigmaPlan",
    "PLAN_KINDS",
    "img2img_start",
]

_SPACINGS = ("leading", "trailing", "linspace")
_BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")
_PREDICTION_TYPES = ("epsilon", "v_prediction")


# ----------------------------------------------------------------------------- config
@dataclass
class ScheduleConfig:
    """The training noise schedule and the inference conventions of a checkpoint.

    Read from a diffusers ``scheduler_config.json`` with :meth:`from_dict`; the defaults are
    Stable Diffusion 1.x's (scaled_linear 0.00085..0.012 over 1000 steps, "leading" spacing
    with ``steps_offset=1``, epsilon prediction, no clipping, ``set_alpha_to_one=False``).

    Note: SD 1.x's own ``scheduler_config.json`` names no ``timestep_spacing``; diffusers
    then uses each scheduler class' default ("leading" for DDIM/DDPM/PNDM, "linspace" for
    Euler/Heun/LMS/DPM-Solver/UniPC).  This config defaults to "leading" for every sampler
    (one convention for the whole package); pass ``timestep_spacing`` explicitly to change it.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: list[float] | None = None
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    prediction_type: str = "epsilon"
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = False
    skip_prk_steps: bool = True

    def __post_init__(self) -> None:
        if self.beta_schedule not in _BETA_SCHEDULES and self.trained_betas is None:
            raise ValueError(f"beta_schedule must be one of {_BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if self.timestep_spacing not in _SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {_SPACINGS}, got {self.timestep_spacing!r}")
        if self.prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {_PREDICTION_TYPES}, got {self.prediction_type!r}")

    @classmethod
    def sd15(cls) -> "ScheduleConfig":
        return cls()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ScheduleConfig":
        """Build from a diffusers scheduler config dict; unknown keys (``_class_name``,
        ``_diffusers_version``, scheduler-specific options) are ignored."""
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and v is not None}
        if "trained_betas" in kwargs:
            kwargs["trained_betas"] = [float(b) for b in kwargs["trained_betas"]]
        return cls(**kwargs)

    def to_dict(self, class_name: str = "DDIMScheduler") -> dict[str, Any]:
        """A dict that diffusers' ``<class_name>.from_config`` accepts (keys a given class
        does not know are ignored by diffusers)."""
        d = {"_class_name": class_name}
        d.update(asdict(self))
        if d["trained_betas"] is None:
            del d["trained_betas"]
        return d


# ----------------------------------------------------------------------------- plan
@dataclass
class SigmaPlan:
    """What a sampler needs to reproduce one diffusers scheduler run.

    Attributes:
        sigmas: float32 1-D tensor, decreasing; the model is evaluated at ``sigmas[:-1]`` and
            the sample ends at noise level ``sigmas[-1]`` (0, or ``sigma(t=0)`` for DDIM/PLMS
            with ``set_alpha_to_one=False``).
        init_noise_sigma: scale of unit Gaussian noise for the txt2img starting sample, in
            sigma units.  For VP schedulers (DDIM, DDPM, PNDM, DPM-Solver, UniPC) diffusers
            starts from unit noise in VP space, i.e. ``sqrt(1 + sigmas[0]**2)`` here; for the
            Euler family diffusers uses ``sigmas[0]`` with "linspace"/"trailing" spacing and
            ``sqrt(1 + sigmas[0]**2)`` with "leading" spacing (a diffusers convention mirrored
            as is).
        discrete_timesteps: the model is fed integer timesteps (diffusers' DDIM/DDPM/PNDM/
            DPM-Solver/UniPC use int64 timesteps, rounding them for Karras sigmas); the model
            wrapper should round ``sigma_to_t(sigma)``.
        options: extra keyword arguments for the sampler (``sigmas_prev``/``sigma_restart``,
            see :func:`latentdiff.samplers.sample_ddim` and ``sample_plms``).
        kind: the plan kind it was built with.
    """

    sigmas: Tensor
    init_noise_sigma: float
    discrete_timesteps: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    kind: str = ""

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def to_vp(self, x: Tensor) -> Tensor:
        """Convert the sampler's final sample (at ``sigmas[-1]``) to VP latents, i.e. what the
        corresponding diffusers scheduler loop returns (identity when the last sigma is 0)."""
        s = float(self.sigmas[-1])
        return x if s == 0.0 else x / math.sqrt(1.0 + s * s)

    def tail(self, start: int) -> "SigmaPlan":
        """The plan from step ``start`` on (img2img); its ``init_noise_sigma`` is its first
        sigma (the clean latent is noised to ``x0 + sigmas[0] * noise``)."""
        opts = dict(self.options)
        if "sigmas_prev" in opts:
            opts["sigmas_prev"] = opts["sigmas_prev"][start:]
        if start > 0 and "sigma_restart" in opts:
            # PLMS restarts its warm-up at the new first step: from sigmas[start] itself.
            opts.pop("sigma_restart")
        sig = self.sigmas[start:]
        return SigmaPlan(sig, float(sig[0]), self.discrete_timesteps, opts, self.kind)


# Plan kinds: which diffusers scheduler's set_timesteps() each mirrors.
PLAN_KINDS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler (skip_prk_steps=True, i.e. PLMS)",
    "euler": "EulerDiscreteScheduler / EulerAncestralDiscreteScheduler / HeunDiscreteScheduler / LMSDiscreteScheduler",
    "euler_karras": "EulerDiscreteScheduler(use_karras_sigmas=True) (also Heun/LMS)",
    "dpm": "DPMSolverMultistepScheduler / UniPCMultistepScheduler",
    "dpm_karras": "DPMSolverMultistepScheduler(use_karras_sigmas=True) / UniPC(use_karras_sigmas=True)",
}


def img2img_start(steps: int, strength: float) -> int:
    """Index of the first step run by img2img, as diffusers' ``get_timesteps``:
    ``init_timestep = min(int(steps * strength), steps); t_start = max(steps - init_timestep, 0)``."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    init_timestep = min(int(steps * strength), steps)
    return max(steps - init_timestep, 0)


# ----------------------------------------------------------------------------- schedule
def _cosine_betas(n: int, max_beta: float = 0.999) -> Tensor:
    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


class NoiseSchedule:
    """The discrete training schedule and everything derived from it.

    Attributes (all CPU tensors): ``betas``, ``alphas``, ``alphas_cumprod`` (float32, exactly
    as diffusers computes them), ``sigmas`` (float32 training sigmas, index = timestep,
    increasing), ``log_sigmas`` (float64 log of those).
    """

    def __init__(self, config: ScheduleConfig | None = None) -> None:
        self.config = config = config or ScheduleConfig()
        n = config.num_train_timesteps
        if config.trained_betas is not None:
            betas = torch.tensor(config.trained_betas, dtype=torch.float32)
        elif config.beta_schedule == "linear":
            betas = torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float32)
        elif config.beta_schedule == "scaled_linear":
            betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float32) ** 2
        else:  # squaredcos_cap_v2
            betas = _cosine_betas(n)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.log_sigmas = self.sigmas.double().log()
        # DDIM/PNDM: the "previous" alphas_cumprod of the last step.
        self.final_alpha_cumprod = 1.0 if config.set_alpha_to_one else float(self.alphas_cumprod[0])

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    # -- sigma <-> t -----------------------------------------------------------------
    def sigma_to_t(self, sigma: Tensor | float, *, quantize: bool = False) -> Tensor:
        """Timestep for a sigma by linear interpolation in log-sigma between neighbouring
        training sigmas (diffusers' ``_sigma_to_t``), clipped to [0, T-1].  Exact (an integer)
        at training sigmas.  Returns float32 on the input's device; ``quantize`` rounds
        half-to-even as diffusers' ``.round()`` does."""
        sigma = torch.as_tensor(sigma)
        device = sigma.device
        log_sigma = sigma.detach().to("cpu", torch.float64).clamp(min=1e-10).log()
        ls = self.log_sigmas
        low = (torch.searchsorted(ls, log_sigma.reshape(-1), right=True) - 1).clamp(0, len(ls) - 2)
        low = low.reshape(log_sigma.shape)
        lo, hi = ls[low], ls[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        t = (1 - w) * low + w * (low + 1)
        if quantize:
            t = t.round()
        return t.to(device=device, dtype=torch.float32)

    def t_to_sigma(self, t: Tensor | float) -> Tensor:
        """Sigma at a (possibly fractional) timestep: linear interpolation of the training
        sigmas in float64, rounded to float32 (diffusers' ``np.interp``).  Note that this is
        linear in sigma while :meth:`sigma_to_t` is linear in log-sigma, exactly as in
        diffusers; the two are inverse at integer timesteps."""
        t = torch.as_tensor(t, dtype=torch.float64)
        s = self.sigmas.double()
        tc = t.clamp(0, len(s) - 1)
        lo = tc.floor().long().clamp(max=len(s) - 2)
        w = tc - lo
        return ((1 - w) * s[lo] + w * s[lo + 1]).float()

    def c_in(self, sigma: Tensor | float) -> Tensor:
        """UNet input scaling 1/sqrt(sigma^2+1) (maps sigma-space x to the VP x_t)."""
        sigma = torch.as_tensor(sigma)
        return (sigma**2 + 1) ** -0.5

    # -- timesteps -------------------------------------------------------------------
    def timesteps(self, steps: int, style: str = "discrete") -> Tensor:
        """Inference timesteps, decreasing, per ``config.timestep_spacing``.

        ``style``:
          * "discrete": DDIM/DDPM/PNDM (int64; "linspace" rounds),
          * "continuous": Euler/Heun/LMS (float32; "linspace" is not rounded),
          * "multistep": DPM-Solver/UniPC (int64, ``steps + 1`` points with the last dropped
            for "linspace"/"leading").
        """
        cfg = self.config
        T = cfg.num_train_timesteps
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if steps > T:
            raise ValueError(f"steps ({steps}) cannot exceed num_train_timesteps ({T})")
        sp = cfg.timestep_spacing
        if style == "multistep":
            if sp == "linspace":
                ts = _np_linspace(0, T - 1, steps + 1).round().flip(0)[:-1]
            elif sp == "leading":
                ratio = T // (steps + 1)
                ts = (torch.arange(0, steps + 1, dtype=torch.float64) * ratio).flip(0)[:-1] + cfg.steps_offset
            else:
                ts = _trailing(T, steps)
            return ts.long()
        if sp == "linspace":
            ts = _np_linspace(0, T - 1, steps).flip(0)
            if style == "discrete":
                return ts.round().long()
            return ts.float()  # diffusers: np.linspace(..., dtype=np.float32)
        if sp == "leading":
            ratio = T // steps
            ts = (torch.arange(0, steps, dtype=torch.float64) * ratio).flip(0) + cfg.steps_offset
        else:
            ts = _trailing(T, steps)
        return ts.long() if style == "discrete" else ts.float()

    def _sigmas_at(self, ts: Tensor) -> Tensor:
        """float64 sigmas at timesteps (linear interpolation, np.interp semantics)."""
        t = ts.double()
        s = self.sigmas.double()
        tc = t.clamp(0, len(s) - 1)
        lo = tc.floor().long().clamp(max=len(s) - 2)
        w = tc - lo
        return (1 - w) * s[lo] + w * s[lo + 1]

    def karras_sigmas(self, steps: int, sigma_min: float | None = None, sigma_max: float | None = None,
                      rho: float = 7.0) -> Tensor:
        """Karras et al. (2022) sigmas, ``steps`` values, decreasing, no trailing zero, float64.

        Defaults span the training sigmas (sigma(t=0)..sigma(t=T-1)) as diffusers'
        DPM-Solver/UniPC ``use_karras_sigmas`` (and k-diffusion/A1111) do.  diffusers' Euler/
        Heun/LMS ``use_karras_sigmas`` instead span the sigmas of their first and last
        inference timesteps; :meth:`plan` with kind "euler_karras" does that.
        """
        lo = self.sigma_min if sigma_min is None else float(sigma_min)
        hi = self.sigma_max if sigma_max is None else float(sigma_max)
        ramp = _np_linspace(0.0, 1.0, steps)
        min_inv, max_inv = lo ** (1 / rho), hi ** (1 / rho)
        return (max_inv + ramp * (min_inv - max_inv)) ** rho

    # -- plans -----------------------------------------------------------------------
    def plan(self, kind: str, steps: int, *, strength: float | None = None) -> SigmaPlan:
        """Sigma plan mirroring ``<diffusers scheduler>.set_timesteps(steps)`` (see
        :data:`PLAN_KINDS`).

        With ``strength`` (img2img/inpainting), the plan is cut to the tail that diffusers runs
        (:func:`img2img_start`) and ``init_noise_sigma`` is ``sigmas[0]``: the starting sample
        is ``x0 + plan.sigmas[0] * noise``, which is what diffusers' ``add_noise`` gives in
        every scheduler, in sigma space."""
        if kind == "ddim":
            plan = self._plan_ddim(steps)
        elif kind == "ddpm":
            plan = self._plan_ddpm(steps)
        elif kind == "pndm":
            plan = self._plan_pndm(steps)
        elif kind in ("euler", "euler_karras"):
            plan = self._plan_euler(steps, karras=kind == "euler_karras")
        elif kind in ("dpm", "dpm_karras"):
            plan = self._plan_dpm(steps, karras=kind == "dpm_karras")
        else:
            raise ValueError(f"unknown plan kind {kind!r}; valid: {sorted(PLAN_KINDS)}")
        plan.kind = kind
        if strength is not None:
            start = img2img_start(steps, strength)
            if start >= steps:
                raise ValueError(f"strength={strength} with {steps} steps leaves no step to run")
            plan = plan.tail(start)
        return plan

    def _vp_init(self, sigma0: float) -> float:
        return math.sqrt(1.0 + sigma0 * sigma0)

    def _prev_sigmas(self, ts: Tensor) -> Tensor:
        """DDIM/PNDM's "previous" level of each step: t - T // steps, or the final alpha."""
        ratio = self.config.num_train_timesteps // len(ts)
        prev = ts - ratio
        final = 0.0 if self.config.set_alpha_to_one else self.sigmas[0]
        out = torch.empty(len(ts), dtype=torch.float32)
        for i, p in enumerate(prev.tolist()):
            out[i] = self.sigmas[p] if p >= 0 else final
        return out

    def _plan_ddim(self, steps: int) -> SigmaPlan:
        """DDIMScheduler.  diffusers steps from t to ``t - T // steps`` (not to the next
        timestep), so with "linspace"/"trailing" spacing the sample lands at one level and
        the model is then told another; ``sigmas_prev`` carries the landing levels and the
        sampler reinterprets the VP sample at the next sigma (a diffusers quirk, mirrored).
        The last step lands at ``final_alpha_cumprod`` (sigma(t=0) unless set_alpha_to_one)."""
        ts = self.timesteps(steps, "discrete")
        prev = self._prev_sigmas(ts)
        sig = torch.cat([self.sigmas[ts], prev[-1:]])
        opts: dict[str, Any] = {}
        if not torch.equal(prev[:-1], sig[1:-1]):
            opts["sigmas_prev"] = prev
        return SigmaPlan(sig, self._vp_init(float(sig[0])), True, opts)

    def _plan_ddpm(self, steps: int) -> SigmaPlan:
        """DDPMScheduler: steps to the next timestep in its list, the last one to abar=1 (sigma 0)."""
        ts = self.timesteps(steps, "discrete")
        sig = torch.cat([self.sigmas[ts], torch.zeros(1)])
        return SigmaPlan(sig, self._vp_init(float(sig[0])), True, {})

    def _plan_pndm(self, steps: int) -> SigmaPlan:
        """PNDMScheduler with ``skip_prk_steps=True`` (PLMS).  Its timestep list repeats the
        second timestep ([t0, t1, t1, t2, ...]): the first step is an Euler step followed by a
        trapezoidal correction evaluated at t1; ``sample_plms`` does this from the plain list
        [t0, t1, t2, ...].  Each update goes from t to ``t - T // steps`` (``sigmas_prev``), and
        the correction starts from ``t1 + T // steps`` (``sigma_restart``), which differ from
        the list's own levels with non-"leading" spacing (diffusers quirks, mirrored)."""
        if not self.config.skip_prk_steps:
            raise NotImplementedError("PNDM with Runge-Kutta warm-up (skip_prk_steps=False) is not implemented")
        ts = self.timesteps(steps, "discrete")
        prev = self._prev_sigmas(ts)
        sig = torch.cat([self.sigmas[ts], prev[-1:]])
        opts: dict[str, Any] = {}
        if not torch.equal(prev[:-1], sig[1:-1]):
            opts["sigmas_prev"] = prev
        if steps >= 2:
            restart_t = int(ts[1]) + self.config.num_train_timesteps // steps
            if restart_t != int(ts[0]):
                opts["sigma_restart"] = float(self.t_to_sigma(restart_t))
        return SigmaPlan(sig, self._vp_init(float(sig[0])), True, opts)

    def _euler_init(self, sigma0: float) -> float:
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return sigma0
        return math.sqrt(sigma0 * sigma0 + 1.0)

    def _plan_euler(self, steps: int, karras: bool) -> SigmaPlan:
        """Euler/Euler a/Heun/LMS (k-diffusion-style discrete schedulers): sigmas interpolated
        at float timesteps, a final 0.  Heun's doubled list in diffusers is the same sigmas
        with two model calls per step."""
        ts = self.timesteps(steps, "continuous")
        sig = self._sigmas_at(ts)
        if karras:
            sig = self.karras_sigmas(steps, float(sig[-1]), float(sig[0]))
        sig = torch.cat([sig.float(), torch.zeros(1)])
        return SigmaPlan(sig, self._euler_init(float(sig[0])), False, {})

    def _plan_dpm(self, steps: int, karras: bool) -> SigmaPlan:
        """DPM-Solver(++) multistep / UniPC: ``steps + 1``-point spacing, final sigma 0
        (``final_sigmas_type="zero"``); Karras sigmas span the training sigmas and the model
        gets the rounded timesteps."""
        if karras:
            sig = self.karras_sigmas(steps)
        else:
            sig = self._sigmas_at(self.timesteps(steps, "multistep"))
        sig = torch.cat([sig.float(), torch.zeros(1)])
        return SigmaPlan(sig, self._vp_init(float(sig[0])), True, {})


def _trailing(T: int, steps: int) -> Tensor:
    """``np.round(np.arange(T, 0, -T / steps)) - 1`` in float64 (numpy's arange length rule)."""
    ratio = T / steps
    n = math.ceil((0 - T) / -ratio)
    ts = T + torch.arange(n, dtype=torch.float64) * -ratio
    return ts.round() - 1


def _np_linspace(start: float, stop: float, num: int) -> Tensor:
    """``np.linspace(start, stop, num)`` in float64, computed the way numpy does."""
    if num == 1:
        return torch.tensor([float(start)], dtype=torch.float64)
    step = (stop - start) / (num - 1)
    y = torch.arange(num, dtype=torch.float64) * step + start
    y[-1] = stop
    return y
