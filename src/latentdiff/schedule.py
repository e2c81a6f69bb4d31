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
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import BadArgument

__all__ = [
    "ScheduleConfig",
    "NoiseSchedule",
    "SigmaPlan",
    "PLAN_KINDS",
    "SIGMA_SCHEDULES",
    "check_sigma_schedule",
    "SD15_SCHEDULER_CONFIG",
    "CLASS_DEFAULTS",
    "class_defaults",
    "img2img_start",
    "kdpm2_step_levels",
    "lcm_boundary_scalings",
    "sde_midpoint_sigma",
]

_SPACINGS = ("leading", "trailing", "linspace")
_BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")
_PREDICTION_TYPES = ("epsilon", "v_prediction")


# ----------------------------------------------------------------------------- config
#: Stable Diffusion 1.5's own ``scheduler/scheduler_config.json``, verbatim.  It names no
#: ``timestep_spacing``, so each sampler uses its diffusers class' default spacing.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}

# diffusers' constructor defaults, taken by a key a config leaves out: what most scheduler
# classes share, then each class' own differences (checked against diffusers in the tests).
_COMMON_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "timestep_spacing": "linspace", "steps_offset": 0, "prediction_type": "epsilon",
    "clip_sample": False, "clip_sample_range": 1.0, "set_alpha_to_one": False, "skip_prk_steps": False,
    "original_inference_steps": 50, "timestep_scaling": 10.0,
}
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": {"timestep_spacing": "leading", "clip_sample": True, "set_alpha_to_one": True},
    "DDPMScheduler": {"timestep_spacing": "leading", "clip_sample": True},
    "PNDMScheduler": {"timestep_spacing": "leading"},
    "EulerDiscreteScheduler": {},
    "EulerAncestralDiscreteScheduler": {},
    "HeunDiscreteScheduler": {"beta_start": 0.00085, "beta_end": 0.012},
    "LMSDiscreteScheduler": {},
    "DPMSolverMultistepScheduler": {},
    "UniPCMultistepScheduler": {},
    "KDPM2DiscreteScheduler": {"beta_start": 0.00085, "beta_end": 0.012},
    "KDPM2AncestralDiscreteScheduler": {"beta_start": 0.00085, "beta_end": 0.012},
    "DEISMultistepScheduler": {},
    "DPMSolverSDEScheduler": {"beta_start": 0.00085, "beta_end": 0.012},
    "LCMScheduler": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                     "timestep_spacing": "leading", "set_alpha_to_one": True},
}
#: The class whose defaults a schedule takes when none is named: training's forward process.
TRAINING_CLASS = "DDPMScheduler"


def class_defaults(class_name: str) -> dict[str, Any]:
    """diffusers' defaults for the schedule keys of scheduler class ``class_name``."""
    if class_name not in CLASS_DEFAULTS:
        raise ValueError(f"no schedule defaults for scheduler class {class_name!r}; known: {sorted(CLASS_DEFAULTS)}")
    return {**_COMMON_DEFAULTS, **CLASS_DEFAULTS[class_name]}


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "num_train_timesteps": (int,), "beta_start": (int, float), "beta_end": (int, float), "beta_schedule": (str,),
    "timestep_spacing": (str,), "steps_offset": (int,), "prediction_type": (str,), "clip_sample": (bool,),
    "clip_sample_range": (int, float), "set_alpha_to_one": (bool,), "skip_prk_steps": (bool,),
    "original_inference_steps": (int,), "timestep_scaling": (int, float),
}


@dataclass
class ScheduleConfig:
    """The training noise schedule and the inference conventions of a checkpoint.

    Read from a diffusers ``scheduler_config.json`` with :meth:`from_dict`.  A field that is
    ``None`` was absent from the file and means what diffusers makes of an absent key: the
    default of the scheduler class that samples (:meth:`resolve`; e.g. "leading" spacing for
    DDIM/DDPM/PLMS, "linspace" for Euler, Heun, LMS, DPM-Solver, UniPC).  The defaults of
    ``ScheduleConfig()`` are SD 1.5's own file (:data:`SD15_SCHEDULER_CONFIG`), which names no
    spacing.  Values of the wrong type or out of their domain raise ``ValueError`` naming the field.

    ``original_inference_steps`` and ``timestep_scaling`` are LCMScheduler's (the distillation's
    step count, whose DDIM timesteps LCM picks from, and the factor on the timestep in the
    boundary conditions); the other schedulers ignore them.
    """

    num_train_timesteps: int | None = 1000
    beta_start: float | None = 0.00085
    beta_end: float | None = 0.012
    beta_schedule: str | None = "scaled_linear"
    trained_betas: list[float] | None = None
    timestep_spacing: str | None = None
    steps_offset: int | None = 1
    prediction_type: str | None = None
    clip_sample: bool | None = False
    clip_sample_range: float | None = None
    set_alpha_to_one: bool | None = False
    skip_prk_steps: bool | None = True
    original_inference_steps: int | None = None
    timestep_scaling: float | None = None

    def __post_init__(self) -> None:
        for name, types in _FIELD_TYPES.items():
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
                expected = " or ".join(t.__name__ for t in types)
                raise ValueError(f"scheduler config: {name} must be {expected}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"scheduler config: {name} must be finite, got {value!r}")
        choices = {"beta_schedule": _BETA_SCHEDULES, "timestep_spacing": _SPACINGS,
                   "prediction_type": _PREDICTION_TYPES}
        for name, valid in choices.items():
            value = getattr(self, name)
            if value is not None and value not in valid and not (name == "beta_schedule" and self.trained_betas):
                raise ValueError(f"scheduler config: {name} must be one of {valid}, got {value!r}")
        if self.num_train_timesteps is not None and not 2 <= self.num_train_timesteps <= 100_000:
            raise ValueError(f"scheduler config: num_train_timesteps must be in [2, 100000], "
                             f"got {self.num_train_timesteps}")
        for name in ("beta_start", "beta_end"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise ValueError(f"scheduler config: {name} must be in (0, 1), got {value}")
        if self.steps_offset is not None and not 0 <= self.steps_offset < (self.num_train_timesteps or 1000):
            raise ValueError(f"scheduler config: steps_offset must be in [0, num_train_timesteps), got {self.steps_offset}")
        if self.original_inference_steps is not None and not 1 <= self.original_inference_steps <= (
                self.num_train_timesteps or 1000):
            raise ValueError(f"scheduler config: original_inference_steps must be in [1, num_train_timesteps], "
                             f"got {self.original_inference_steps}")
        if self.timestep_scaling is not None and not self.timestep_scaling > 0:
            raise ValueError(f"scheduler config: timestep_scaling must be > 0, got {self.timestep_scaling}")
        if self.clip_sample_range is not None and not self.clip_sample_range > 0:
            raise ValueError(f"scheduler config: clip_sample_range must be > 0, got {self.clip_sample_range}")
        if self.trained_betas is not None:
            betas = self.trained_betas
            if (not isinstance(betas, (list, tuple)) or len(betas) < 2
                    or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 < b < 1.0 for b in betas)):
                raise ValueError("scheduler config: trained_betas must be a list of at least 2 numbers in (0, 1)")
            self.trained_betas = [float(b) for b in betas]

    @classmethod
    def sd15(cls) -> "ScheduleConfig":
        return cls()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ScheduleConfig":
        """Build from a diffusers scheduler config dict.  Keys it lacks (or sets to null) stay
        ``None`` (the sampling class' default); unknown keys (``_class_name``,
        ``_diffusers_version``, scheduler-specific options) are ignored."""
        if not isinstance(d, dict):
            raise ValueError(f"scheduler config must be a JSON object, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        return cls(**{name: d.get(name) for name in names})

    def resolve(self, class_name: str = TRAINING_CLASS) -> "ScheduleConfig":
        """Every absent field filled with diffusers' default for scheduler class ``class_name``."""
        defaults = class_defaults(class_name)
        return ScheduleConfig(**{f.name: defaults[f.name] if getattr(self, f.name) is None and f.name != "trained_betas"
                                 else getattr(self, f.name) for f in fields(self)})

    def to_dict(self, class_name: str = "DDIMScheduler") -> dict[str, Any]:
        """A dict that diffusers' ``<class_name>.from_config`` accepts, with the fields that are set
        (so an absent key stays absent; keys a given class does not know are ignored by diffusers)."""
        d: dict[str, Any] = {"_class_name": class_name}
        d.update({k: v for k, v in asdict(self).items() if v is not None})
        return d


# ----------------------------------------------------------------------------- plan
@dataclass
class SigmaPlan:
    """What a sampler needs to reproduce one diffusers scheduler run.

    Attributes:
        sigmas: float32 1-D tensor, decreasing; the model is evaluated at ``sigmas[:-1]`` and
            the sample ends at noise level ``sigmas[-1]`` (0, or ``sigma(t=0)`` for DDIM/PLMS
            with ``set_alpha_to_one=False`` and for DEIS).
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
        timesteps: ``{sigma: t}``, the model timestep diffusers feeds at each sigma it lists
            (keys are the float32 sigmas as Python floats, values float32-exact timesteps,
            computed as diffusers does: from float64 sigmas, rounded or truncated where it
            does).  A sigma not listed (a sampler's intermediate point) falls back to
            ``sigma_to_t``.  Without the table, timesteps recomputed from float32 sigmas are off
            by up to ~3e-3, which moves the UNet's time embedding visibly in the latents.
    """

    sigmas: Tensor
    init_noise_sigma: float
    discrete_timesteps: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    kind: str = ""
    timesteps: dict[float, float] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def to_vp(self, x: Tensor) -> Tensor:
        """Convert the sampler's final sample (at ``sigmas[-1]``) to VP latents, i.e. what the
        corresponding diffusers scheduler loop returns (identity when the last sigma is 0)."""
        s = float(self.sigmas[-1])
        return x if s == 0.0 else x / math.sqrt(1.0 + s * s)

    def distinct(self) -> "SigmaPlan":
        """This plan without the steps between equal sigmas (zero-length steps, which a
        1000-step schedule can contain); the same plan when there are none.  Only for plans
        without per-step options."""
        keep = [0] + [i for i in range(1, len(self.sigmas)) if float(self.sigmas[i]) != float(self.sigmas[i - 1])]
        if len(keep) == len(self.sigmas):
            return self
        if any(k in self.options for k in ("sigmas_prev", "sigma_restart", "timesteps")):
            raise ValueError("a plan with per-step options cannot drop repeated sigmas")
        return replace(self, sigmas=self.sigmas[keep])

    def tail(self, start: int) -> "SigmaPlan":
        """The plan from step ``start`` on (img2img); its ``init_noise_sigma`` is its first
        sigma (the clean latent is noised to ``x0 + sigmas[0] * noise``)."""
        opts = dict(self.options)
        if "sigmas_prev" in opts:
            opts["sigmas_prev"] = opts["sigmas_prev"][start:]
        if start > 0 and "sigma_restart" in opts:
            # PLMS restarts its warm-up at the new first step: from sigmas[start] itself.
            opts.pop("sigma_restart")
        if "timesteps" in opts:
            opts["timesteps"] = opts["timesteps"][start:]
        sig = self.sigmas[start:]
        return SigmaPlan(sig, float(sig[0]), self.discrete_timesteps, opts, self.kind, dict(self.timesteps))


# Plan kinds: which diffusers scheduler's set_timesteps() each mirrors.
PLAN_KINDS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler (skip_prk_steps=True, i.e. PLMS)",
    "euler": "EulerDiscreteScheduler / EulerAncestralDiscreteScheduler / HeunDiscreteScheduler / LMSDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler / UniPCMultistepScheduler",
    "kdpm2": "KDPM2DiscreteScheduler",
    "kdpm2_a": "KDPM2AncestralDiscreteScheduler",
    "deis": "DEISMultistepScheduler",
    "dpm_sde": "DPMSolverSDEScheduler",
    "lcm": "LCMScheduler",
}

#: A1111's schedule types for the k-samplers (id -> display name).  ``None`` is each sampler's own
#: default (the spaced training sigmas).  "karras" and "exponential" are diffusers'
#: ``use_karras_sigmas`` / ``use_exponential_sigmas``; "sgm_uniform" is A1111's: timesteps evenly
#: spaced from sigma_max's to sigma_min's, read back through k-diffusion's log-sigma interpolation.
SIGMA_SCHEDULES: dict[str, str] = {"karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform"}


def check_sigma_schedule(name: str | None) -> str | None:
    """Normalise a schedule type (id or display name, any case); None and "default"/"automatic" mean None."""
    if name is None:
        return None
    key = str(name).strip().lower().replace(" ", "_")
    if key in ("", "default", "automatic"):
        return None
    if key in SIGMA_SCHEDULES:
        return key
    valid = ", ".join(repr(k) for k in SIGMA_SCHEDULES)
    raise BadArgument(f"unknown schedule type {name!r}; valid: {valid} (or 'automatic')")


def img2img_start(steps: int, strength: float) -> int:
    """Index of the first step run by img2img, as diffusers' ``get_timesteps``:
    ``init_timestep = min(int(steps * strength), steps); t_start = max(steps - init_timestep, 0)``."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    init_timestep = min(int(steps * strength), steps)
    return max(steps - init_timestep, 0)


def kdpm2_step_levels(sigma: Tensor, sigma_next: Tensor, ancestral: bool = False, *,
                      exact_mid: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``(sigma_mid, sigma_up, sigma_down)`` of one KDPM2 step from ``sigma`` to ``sigma_next``
    (0-d tensors; float32 in plans).

    DPM2 (diffusers' KDPM2DiscreteScheduler) lands at ``sigma_down = sigma_next`` with no noise
    (``sigma_up = 0``); DPM2 a (KDPM2AncestralDiscreteScheduler) lands at
    ``sigma_down = sqrt(s'^2 - sigma_up^2)`` and adds noise of std
    ``sigma_up = sqrt(s'^2 (s^2 - s'^2) / s^2)``.  ``sigma_mid``, where the second model call
    is made, is the geometric mean of ``sigma`` and ``sigma_down``, computed in diffusers'
    operation order (``exp(lerp(log a, log b, 0.5))`` with the lower level first for DPM2, the
    upper first for DPM2 a), so it equals its ``sigmas_interpol`` to the bit.  Except with
    ``exact_mid``, DPM2 a's is moved one float32 ulp up where it rounds to ``sigma_next``: it is
    ``sqrt(s * s'^2 / s) = s'`` in exact arithmetic, and diffusers feeds that call and the next
    step's first call different timesteps, which the plan's ``{sigma: timestep}`` table can then
    tell apart (a 6e-8 relative change of that level).  A step to sigma 0 has ``sigma_mid = 0``:
    its first-order part already lands at x0, no second call."""
    zero = torch.zeros_like(sigma)
    if float(sigma_next) == 0:
        return zero, zero, zero
    if not ancestral:
        return sigma_next.log().lerp(sigma.log(), 0.5).exp(), zero, sigma_next
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    sigma_mid = sigma.log().lerp(sigma_down.log(), 0.5).exp()
    if not exact_mid and sigma_mid == sigma_next:
        sigma_mid = torch.nextafter(sigma_mid, sigma)
    return sigma_mid, sigma_up, sigma_down


def lcm_boundary_scalings(timestep: float | Tensor, timestep_scaling: float = 10.0,
                          sigma_data: float = 0.5) -> tuple[Tensor, Tensor]:
    """LCM's consistency boundary conditions ``(c_skip, c_out)`` at a discrete timestep, float32
    0-d tensors computed as diffusers' LCMScheduler does: with ``u = timestep * timestep_scaling``,
    ``c_skip = sigma_data^2 / (u^2 + sigma_data^2)`` and ``c_out = u / sqrt(u^2 + sigma_data^2)``
    (so c_skip -> 1, c_out -> 0 at t = 0: the consistency function is the identity there)."""
    u = torch.as_tensor(timestep, dtype=torch.float32) * timestep_scaling
    c_skip = sigma_data**2 / (u**2 + sigma_data**2)
    c_out = u / (u**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def sde_midpoint_sigma(sigma: Tensor, sigma_next: Tensor, r: float = 0.5) -> Tensor:
    """The level between ``sigma`` and ``sigma_next`` (0-d tensors, both > 0) where DPM++ SDE makes
    its second model call: ``exp(-(t + r (t' - t)))`` with ``t = -log sigma``, in the sigmas'
    dtype with the operations diffusers' DPMSolverSDEScheduler and k-diffusion's
    ``sample_dpmpp_sde`` use, so a plan's table and the sampler agree to the bit."""
    t, t_next = sigma.log().neg(), sigma_next.log().neg()
    return (t + (t_next - t) * r).neg().exp()


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
    increasing), ``log_sigmas`` (their float32 logs, as float64).

    ``config`` is resolved for scheduler class ``class_name`` (:meth:`ScheduleConfig.resolve`):
    the sampler's class at inference, DDPM's (the forward process) in training.
    """

    def __init__(self, config: ScheduleConfig | None = None, class_name: str = TRAINING_CLASS) -> None:
        self.config = config = (config or ScheduleConfig()).resolve(class_name)
        self.class_name = class_name
        n = config.num_train_timesteps
        if config.trained_betas is not None and len(config.trained_betas) != n:
            raise ValueError(f"scheduler config: trained_betas has {len(config.trained_betas)} values "
                             f"for num_train_timesteps={n}")
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
        # float32 logs, held in float64: diffusers takes np.log of its float32 sigmas (numpy's float32
        # log can differ from torch's by an ulp, so numpy's is used)
        self.log_sigmas = torch.from_numpy(np.log(self.sigmas.numpy())).double()
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
    def sigma_to_t(self, sigma: Tensor | float, *, quantize: bool = False,
                   dtype: torch.dtype = torch.float32) -> Tensor:
        """Timestep for a sigma by linear interpolation in log-sigma between neighbouring
        training sigmas (diffusers' ``_sigma_to_t``, to the bit: float64 log of the input, the
        float32 log table), clipped to [0, T-1].  Within ~1e-5 of an integer at training sigmas
        (exact once ``quantize``d).  Returns ``dtype`` on the input's device; ``quantize`` rounds
        half-to-even as diffusers' ``.round()`` does."""
        sigma = torch.as_tensor(sigma)
        device = sigma.device
        log_sigma = sigma.detach().to("cpu", torch.float64).clamp(min=1e-10).log()
        ls = self.log_sigmas
        low = (torch.searchsorted(ls, log_sigma.reshape(-1), right=True) - 1).clamp(0, len(ls) - 2)
        low = low.reshape(log_sigma.shape)
        lo, hi = ls[low], ls[low + 1]
        # float64 numerator over a float32 denominator: numpy's promotion in diffusers' _sigma_to_t
        w = ((lo - log_sigma) / (lo.float() - hi.float()).double()).clamp(0, 1)
        t = (1 - w) * low + w * (low + 1)
        if quantize:
            t = t.round()
        return t.to(device=device, dtype=dtype)

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
                if ratio == 0:  # every timestep would be steps_offset
                    raise ValueError(f"{steps} steps with 'leading' spacing put every step at one timestep: "
                                     f"this sampler takes at most {T - 1} steps with it (or use another spacing)")
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
        if style == "discrete" and int(ts.max()) > T - 1:  # diffusers: an IndexError
            raise ValueError(f"{steps} steps with {sp!r} spacing and steps_offset {cfg.steps_offset} reach timestep "
                             f"{int(ts.max())}, past the schedule's last ({T - 1}): use fewer steps or another spacing")
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
        inference timesteps; :meth:`plan` with kind "euler" and ``sigma_schedule="karras"`` does that.
        """
        lo = self.sigma_min if sigma_min is None else float(sigma_min)
        hi = self.sigma_max if sigma_max is None else float(sigma_max)
        ramp = _np_linspace(0.0, 1.0, steps)
        min_inv, max_inv = lo ** (1 / rho), hi ** (1 / rho)
        return (max_inv + ramp * (min_inv - max_inv)) ** rho

    # -- plans -----------------------------------------------------------------------
    def plan(self, kind: str, steps: int, *, strength: float | None = None,
             sigma_schedule: str | None = None) -> SigmaPlan:
        """Sigma plan mirroring ``<diffusers scheduler>.set_timesteps(steps)`` (see
        :data:`PLAN_KINDS`); ``sigma_schedule`` (:data:`SIGMA_SCHEDULES`) replaces the spaced
        sigmas as diffusers' ``use_karras_sigmas`` / ``use_exponential_sigmas`` do for that class.

        With ``strength`` (img2img/inpainting), the plan is cut to the tail that diffusers runs
        (:func:`img2img_start`) and ``init_noise_sigma`` is ``sigmas[0]``: the starting sample
        is ``x0 + plan.sigmas[0] * noise``, which is what diffusers' ``add_noise`` gives in
        every scheduler, in sigma space."""
        sigma_schedule = check_sigma_schedule(sigma_schedule)
        if kind not in PLAN_KINDS:
            raise ValueError(f"unknown plan kind {kind!r}; valid: {sorted(PLAN_KINDS)}")
        if sigma_schedule is not None and kind in ("ddim", "ddpm", "pndm", "lcm"):
            raise ValueError(f"schedule type {sigma_schedule!r} does not apply to the {PLAN_KINDS[kind]} sampler")
        if kind == "ddim":
            plan = self._plan_ddim(steps)
        elif kind == "ddpm":
            plan = self._plan_ddpm(steps)
        elif kind == "pndm":
            plan = self._plan_pndm(steps)
        elif kind == "euler":
            plan = self._plan_euler(steps, sigma_schedule)
        elif kind in ("kdpm2", "kdpm2_a"):
            plan = self._plan_kdpm2(steps, sigma_schedule, ancestral=kind == "kdpm2_a")
        elif kind == "deis":
            plan = self._plan_deis(steps, sigma_schedule)
        elif kind == "dpm_sde":
            plan = self._plan_dpm_sde(steps, sigma_schedule)
        elif kind == "lcm":
            plan = self._plan_lcm(steps)
        else:
            plan = self._plan_dpm(steps, sigma_schedule)
        plan.kind = kind
        if not plan.timesteps:  # integer timesteps at training sigmas: exact by lookup
            t = self.sigma_to_t(plan.sigmas[:-1], quantize=plan.discrete_timesteps)
            plan.timesteps = _timestep_table(plan.sigmas[:-1], t)
        if strength is not None:
            start = img2img_start(steps, strength)
            if start >= steps:
                raise ValueError(f"strength={strength} with {steps} steps leaves no step to run")
            plan = plan.tail(start)
        return plan

    def lcm_timesteps(self, steps: int, strength: float = 1.0) -> Tensor:
        """LCMScheduler's ``set_timesteps(steps, strength=strength)`` (int64, decreasing): the
        DDIM timesteps of ``original_inference_steps`` steps (``k = T // original``, timesteps
        ``k * i - 1`` for i = 1 .. int(original * strength)), of which ``steps`` are taken at
        evenly spaced indices from the top ("skipping step").  ``strength < 1`` is what diffusers'
        LatentConsistencyModelImg2ImgPipeline asks for; the other img2img pipelines (and
        :meth:`plan`) cut the tail of the full list instead (:func:`img2img_start`)."""
        cfg = self.config
        T, original = cfg.num_train_timesteps, cfg.original_inference_steps
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if original > T:
            raise ValueError(f"original_inference_steps ({original}) cannot exceed num_train_timesteps ({T})")
        k = T // original
        origin = torch.arange(1, int(original * strength) + 1, dtype=torch.int64) * k - 1
        if len(origin) // steps < 1:
            raise ValueError(f"LCM takes at most {len(origin)} steps here (original_inference_steps {original} "
                             f"x strength {strength}), got {steps}")
        if steps > original:
            raise ValueError(f"LCM takes at most original_inference_steps ({original}) steps, got {steps}")
        origin = origin.flip(0)
        index = _np_linspace(0, len(origin), steps + 1)[:-1].floor().long()  # np.linspace(endpoint=False)
        return origin[index]

    def _plan_lcm(self, steps: int) -> SigmaPlan:
        """LCMScheduler: its timesteps' training sigmas, a final 0 (the last step returns its
        denoised sample, no noise), unit VP noise to start; ``options["timesteps"]`` are the
        timesteps of the boundary conditions (:func:`lcm_boundary_scalings`) and
        ``options["timestep_scaling"]`` the config's factor."""
        ts = self.lcm_timesteps(steps)
        sig = torch.cat([self.sigmas[ts], torch.zeros(1)])
        options = {"timesteps": [float(t) for t in ts.tolist()], "timestep_scaling": float(self.config.timestep_scaling)}
        return SigmaPlan(sig, self._vp_init(float(sig[0])), True, options,
                         timesteps=_timestep_table(sig[:-1], ts.double()))

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

    def exponential_sigmas(self, steps: int, sigma_min: float | None = None,
                           sigma_max: float | None = None) -> Tensor:
        """``steps`` sigmas evenly spaced in log sigma, decreasing, float64 (diffusers'
        ``use_exponential_sigmas``; same default span as :meth:`karras_sigmas`)."""
        lo = self.sigma_min if sigma_min is None else float(sigma_min)
        hi = self.sigma_max if sigma_max is None else float(sigma_max)
        return _np_linspace(math.log(hi), math.log(lo), steps).exp()

    def sgm_uniform_sigmas(self, steps: int) -> Tensor:
        """A1111's "SGM Uniform": ``steps`` timesteps evenly spaced from t(sigma_max) to
        t(sigma_min) with the last point dropped (``linspace(start, end, steps + 1)[:-1]``),
        each read back as a sigma by k-diffusion's interpolation in log sigma; float64."""
        start = float(self.sigma_to_t(self.sigma_max))
        end = float(self.sigma_to_t(self.sigma_min))
        ts = torch.linspace(start, end, steps + 1)[:-1].double()  # float32 linspace, as torch's default
        ls = self.log_sigmas
        low = ts.floor().long().clamp(max=len(ls) - 2)
        w = ts - low
        return ((1 - w) * ls[low] + w * ls[low + 1]).exp()

    def _scheduled_sigmas(self, steps: int, sigma_schedule: str, lo: float | None = None,
                          hi: float | None = None) -> Tensor:
        """The sigmas of a schedule type spanning [lo, hi] (default: the training sigmas)."""
        if sigma_schedule == "karras":
            return self.karras_sigmas(steps, lo, hi)
        if sigma_schedule == "exponential":
            return self.exponential_sigmas(steps, lo, hi)
        return self.sgm_uniform_sigmas(steps)

    def _plan_euler(self, steps: int, sigma_schedule: str | None) -> SigmaPlan:
        """Euler/Euler a/Heun/LMS (k-diffusion-style discrete schedulers): sigmas interpolated
        at float timesteps, a final 0.  Heun's doubled list in diffusers is the same sigmas
        with two model calls per step.  Karras / exponential sigmas span the sigmas of the first
        and last spaced timesteps (diffusers' Euler family)."""
        ts = self.timesteps(steps, "continuous")
        sig = self._sigmas_at(ts)
        if sigma_schedule is not None:
            sig = self._scheduled_sigmas(steps, sigma_schedule, float(sig[-1]), float(sig[0]))
            ts = self.sigma_to_t(sig, dtype=torch.float64)  # from the float64 sigmas, as diffusers does
        sig = torch.cat([sig.float(), torch.zeros(1)])
        return SigmaPlan(sig, self._euler_init(float(sig[0])), False, {}, timesteps=_timestep_table(sig[:-1], ts))

    def _plan_dpm(self, steps: int, sigma_schedule: str | None) -> SigmaPlan:
        """DPM-Solver(++) multistep / UniPC: ``steps + 1``-point spacing, final sigma 0
        (``final_sigmas_type="zero"``); Karras / exponential sigmas span the training sigmas and
        the model gets the rounded timesteps."""
        if sigma_schedule is not None:
            sig = self._scheduled_sigmas(steps, sigma_schedule)
            t64 = self.sigma_to_t(sig, dtype=torch.float64)
            # diffusers rounds Karras timesteps and truncates exponential ones (its int64 cast)
            ts = t64.round() if sigma_schedule == "karras" else t64.trunc()
        else:
            ts = self.timesteps(steps, "multistep")
            sig = self._sigmas_at(ts)
        sig = torch.cat([sig.float(), torch.zeros(1)])
        return SigmaPlan(sig, self._vp_init(float(sig[0])), True, {}, timesteps=_timestep_table(sig[:-1], ts))

    def _plan_kdpm2(self, steps: int, sigma_schedule: str | None, ancestral: bool) -> SigmaPlan:
        """KDPM2DiscreteScheduler / KDPM2AncestralDiscreteScheduler: the Euler family's sigmas and
        spans, a final 0, Karras timesteps rounded (as these two classes do).  The table also
        lists each step's midpoint (:func:`kdpm2_step_levels`) with the timestep diffusers feeds
        there: its ``_sigma_to_t`` run on float32 tensors (:meth:`_sigma_to_t_float32`)."""
        ts = self.timesteps(steps, "continuous")
        sig = self._sigmas_at(ts)
        if sigma_schedule is not None:
            sig = self._scheduled_sigmas(steps, sigma_schedule, float(sig[-1]), float(sig[0]))
            ts = self.sigma_to_t(sig, dtype=torch.float64)
            if sigma_schedule == "karras":
                ts = ts.round()
        sig = torch.cat([sig.float(), torch.zeros(1)])
        keys, exact = (torch.stack([kdpm2_step_levels(sig[i], sig[i + 1], ancestral, exact_mid=e)[0]
                                    for i in range(steps)]) for e in (False, True))
        called = keys > 0  # (steps,): the last step makes no midpoint call
        mid_table = _timestep_table(keys[called], self._sigma_to_t_float32(exact[called]))
        # the steps' own sigmas win a (degenerate) tie with the midpoint of two equal sigmas
        table = {**mid_table, **_timestep_table(sig[:-1], ts)}
        return SigmaPlan(sig, self._euler_init(float(sig[0])), False, {}, timesteps=table)

    def _sigma_to_t_float32(self, sigma: Tensor) -> Tensor:
        """:meth:`sigma_to_t` of a 1-D float32 tensor as diffusers' ``_sigma_to_t`` computes it when
        handed torch float32 tensors (KDPM2's midpoint timesteps): numpy's float32 log of the
        input, then float32 arithmetic on the float32 log table."""
        log_sigma = torch.from_numpy(np.log(sigma.float().numpy()))
        ls = self.log_sigmas.float()
        low = (torch.searchsorted(ls, log_sigma, right=True) - 1).clamp(0, len(ls) - 2)
        lo, hi = ls[low], ls[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return (1 - w) * low + w * (low + 1)

    def _plan_deis(self, steps: int, sigma_schedule: str | None) -> SigmaPlan:
        """DEISMultistepScheduler: DPM-Solver's ``steps + 1``-point spacing, but the run ends at
        sigma(t=0), not 0.  Schedule types span the training sigmas with rounded timesteps
        (exponential ones truncated: diffusers' int64 cast); Karras / exponential runs end on
        their own last sigma, repeated: diffusers' last step is then a no-op after a wasted model
        call (mirrored).  Deviation: with one step that would return the starting noise, so the
        step goes to sigma(t=0) instead, as "sgm_uniform" (no diffusers reference) always does.
        ``lower_order_final`` is diffusers' rule on the whole run (fewer than 15 steps), kept by
        img2img tails."""
        last = self.sigmas[:1]
        if sigma_schedule is None:
            T = self.config.num_train_timesteps
            if self.config.timestep_spacing == "leading" and T // (steps + 1) == 0:
                raise ValueError(f"DEIS with 'leading' timestep spacing takes at most {T - 1} steps (got {steps}): "
                                 f"its spacing T // (steps + 1) would put every step at one timestep")
            ts = self.timesteps(steps, "multistep")
            sig = self._sigmas_at(ts)
        else:
            sig = self._scheduled_sigmas(steps, sigma_schedule)
            t64 = self.sigma_to_t(sig, dtype=torch.float64)
            ts = t64.trunc() if sigma_schedule == "exponential" else t64.round()
            if steps > 1 and sigma_schedule != "sgm_uniform":
                last = sig[-1:].float()
        sig = torch.cat([sig.float(), last])
        return SigmaPlan(sig, self._vp_init(float(sig[0])), True, {"lower_order_final": steps < 15},
                         timesteps=_timestep_table(sig[:-1], ts))

    def _plan_dpm_sde(self, steps: int, sigma_schedule: str | None) -> SigmaPlan:
        """DPMSolverSDEScheduler: the Euler family's spacing, but "linspace" timesteps in float64
        (its ``np.linspace(..., dtype=float)``), sigmas interpolated at them, a final 0; Karras /
        exponential sigmas span the first and last spaced sigmas.  Its doubled list is these
        sigmas with a second model call per step at :func:`sde_midpoint_sigma`, which the table
        lists with diffusers' ``_second_order_timesteps`` (float64 log-midpoints of the float64
        sigmas).  ``brownian_range`` is the whole schedule's (smallest positive, largest) sigma,
        the interval diffusers' (and A1111's) Brownian tree spans, also for an img2img tail."""
        ts = self.timesteps(steps, "continuous")
        if self.config.timestep_spacing == "linspace":
            ts = _np_linspace(0, self.config.num_train_timesteps - 1, steps).flip(0)
        sig = self._sigmas_at(ts.double())
        if sigma_schedule is not None:
            sig = self._scheduled_sigmas(steps, sigma_schedule, float(sig[-1]), float(sig[0]))
            ts = self.sigma_to_t(sig, dtype=torch.float64)
        t = -sig.log()
        mid_ts = self.sigma_to_t((-(t[:-1] + (t[1:] - t[:-1]) * 0.5)).exp(), dtype=torch.float64)
        sig = torch.cat([sig.float(), torch.zeros(1)])
        table = _timestep_table(sig[:-1], ts)
        if steps > 1:  # (steps - 1,) midpoints: the last step, to sigma 0, makes no second call
            mids = torch.stack([sde_midpoint_sigma(sig[i], sig[i + 1]) for i in range(steps - 1)])
            # the steps' own sigmas win a (degenerate) tie with the midpoint of two equal sigmas
            table = {**_timestep_table(mids, mid_ts), **table}
        options = {"brownian_range": (float(sig[:-1].min()), float(sig.max()))}
        return SigmaPlan(sig, self._euler_init(float(sig[0])), False, options, timesteps=table)


def _timestep_table(sigmas: Tensor, timesteps: Tensor) -> dict[float, float]:
    """``{float32 sigma: float32 timestep}`` for a plan's model-evaluated sigmas."""
    ts = torch.as_tensor(timesteps).float().tolist()
    return {float(s): t for s, t in zip(sigmas.float().tolist(), ts)}


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
