"""The sampler registry: ids, AUTOMATIC1111 names, the diffusers scheduler each reproduces."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

from torch import Tensor

from ..errors import BadArgument
from ..schedule import SIGMA_SCHEDULES, NoiseSchedule, ScheduleConfig, SigmaPlan, check_sigma_schedule
from .base import Denoiser
from .dpm2 import sample_dpm2, sample_dpm2_ancestral
from .k import sample_euler, sample_euler_ancestral, sample_heun, sample_lms
from .lcm import sample_lcm
from .multistep import sample_deis, sample_dpmpp_2m, sample_unipc
from .sde import sample_dpmpp_2m_sde, sample_dpmpp_2s_ancestral, sample_dpmpp_sde
from .vp import sample_ddim, sample_ddpm, sample_plms

@dataclass(frozen=True)
class SamplerSpec:
    """A sampler: its function, A1111 display name, the diffusers scheduler it reproduces
    (class and extra config), the :meth:`NoiseSchedule.plan` kind giving its sigmas, and the
    schedule type it runs with (``sigma_schedule``: None = the sampler's own spaced sigmas, or
    one of :data:`~latentdiff.schedule.SIGMA_SCHEDULES`; see :meth:`with_schedule`)."""

    id: str
    name: str
    fn: Callable[..., Tensor]
    #: "" where diffusers has no such scheduler (see :attr:`schedule_class`)
    diffusers_class: str
    plan_kind: str
    diffusers_config: dict[str, Any] = field(default_factory=dict)
    stochastic: bool = False
    sigma_schedule: str | None = None
    #: the schedule types diffusers' class (or k-diffusion, where diffusers has none) supports
    schedules: tuple[str, ...] = ()
    #: the solver cannot step between equal sigmas (a multistep history would divide by zero):
    #: a plan that repeats one (1000 steps, some spacings) runs its distinct sigmas only
    distinct_sigmas: bool = False

    def with_schedule(self, sigma_schedule: str | None) -> "SamplerSpec":
        """This sampler with a schedule type ("karras", "exponential", "sgm_uniform" or None)."""
        sigma_schedule = check_sigma_schedule(sigma_schedule)
        if sigma_schedule is not None and sigma_schedule not in self.schedules:
            valid = ", ".join(repr(s) for s in self.schedules) or "none"
            raise BadArgument(f"sampler {self.name!r} does not take schedule type {sigma_schedule!r}; it takes: {valid}")
        return self if sigma_schedule == self.sigma_schedule else replace(self, sigma_schedule=sigma_schedule)

    @property
    def schedule_name(self) -> str:
        """A1111's "Schedule type" of this sampler ("Karras", ..., or "Automatic")."""
        return SIGMA_SCHEDULES[self.sigma_schedule] if self.sigma_schedule else "Automatic"

    @property
    def reference_config(self) -> dict[str, Any]:
        """The extra diffusers config giving this sampler and schedule type (``use_karras_sigmas`` ...)."""
        extra = {"karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True}}
        return {**self.diffusers_config, **extra.get(self.sigma_schedule or "", {})}

    def schedule(self, config: ScheduleConfig) -> NoiseSchedule:
        """The noise schedule this sampler runs on: ``config`` with the absent keys taking the
        defaults of its diffusers class and this sampler's own settings on top (what
        ``<class>.from_config(config, **diffusers_config)`` gives)."""
        own = {k: v for k, v in self.diffusers_config.items() if k in _SCHEDULE_FIELDS}
        return NoiseSchedule(replace(config, **own) if own else config, self.schedule_class)

    @property
    def schedule_class(self) -> str:
        """The diffusers class whose defaults fill absent config keys: its own, or, for a sampler
        diffusers lacks (``diffusers_class == ""``, checked against k-diffusion instead),
        EulerDiscreteScheduler's (what k-diffusion's discrete schedule of the model equals)."""
        return self.diffusers_class or "EulerDiscreteScheduler"

    def plan(self, schedule: NoiseSchedule, steps: int, *, strength: float | None = None) -> SigmaPlan:
        """Sigmas (and options) for ``steps`` steps, optionally the img2img tail."""
        plan = schedule.plan(self.plan_kind, steps, strength=strength, sigma_schedule=self.sigma_schedule)
        if self.id in ("ddim", "ddpm", "lcm") and schedule.config.clip_sample:
            plan.options["clip_sample"] = schedule.config.clip_sample_range
        return plan.distinct() if self.distinct_sigmas else plan

    def __call__(self, denoise: Denoiser, x: Tensor, sigmas: Tensor, **kwargs: Any) -> Tensor:
        return self.fn(denoise, x, sigmas, **kwargs)


ALL_SCHEDULES = tuple(SIGMA_SCHEDULES)
_SCHEDULE_FIELDS = {f.name for f in fields(ScheduleConfig)}


def _spec(id: str, name: str, fn: Callable[..., Tensor], cls: str, kind: str, stochastic: bool = False,
          schedules: tuple[str, ...] = ALL_SCHEDULES, **config: Any) -> SamplerSpec:
    return SamplerSpec(id, name, fn, cls, kind, dict(config), stochastic, None, schedules)


SAMPLERS: dict[str, SamplerSpec] = {
    s.id: s
    for s in [
        _spec("ddim", "DDIM", sample_ddim, "DDIMScheduler", "ddim", schedules=()),
        _spec("ddpm", "DDPM", sample_ddpm, "DDPMScheduler", "ddpm", stochastic=True, schedules=()),
        _spec("plms", "PLMS", sample_plms, "PNDMScheduler", "pndm", schedules=(), skip_prk_steps=True),
        _spec("euler", "Euler", sample_euler, "EulerDiscreteScheduler", "euler"),
        _spec("euler_a", "Euler a", sample_euler_ancestral, "EulerAncestralDiscreteScheduler", "euler",
              stochastic=True),
        _spec("heun", "Heun", sample_heun, "HeunDiscreteScheduler", "euler"),
        replace(_spec("lms", "LMS", sample_lms, "LMSDiscreteScheduler", "euler"), distinct_sigmas=True),
        replace(_spec("dpmpp_2m", "DPM++ 2M", sample_dpmpp_2m, "DPMSolverMultistepScheduler", "dpm"),
                distinct_sigmas=True),
        replace(_spec("unipc", "UniPC", sample_unipc, "UniPCMultistepScheduler", "dpm"), distinct_sigmas=True),
        _spec("dpm2", "DPM2", sample_dpm2, "KDPM2DiscreteScheduler", "kdpm2"),
        _spec("dpm2_a", "DPM2 a", sample_dpm2_ancestral, "KDPM2AncestralDiscreteScheduler", "kdpm2_a",
              stochastic=True),
        _spec("deis", "DEIS", sample_deis, "DEISMultistepScheduler", "deis"),
        _spec("dpmpp_2m_sde", "DPM++ 2M SDE", sample_dpmpp_2m_sde, "DPMSolverMultistepScheduler", "dpm",
              stochastic=True, algorithm_type="sde-dpmsolver++"),
        _spec("dpmpp_sde", "DPM++ SDE", sample_dpmpp_sde, "DPMSolverSDEScheduler", "dpm_sde", stochastic=True),
        # diffusers has no DPM++ 2S a: "" (its reference is k-diffusion's sample_dpmpp_2s_ancestral)
        _spec("dpmpp_2s_a", "DPM++ 2S a", sample_dpmpp_2s_ancestral, "", "euler", stochastic=True),
        # for LCM-distilled UNets and LCM-LoRA; draws fresh noise after every step but the last
        _spec("lcm", "LCM", sample_lcm, "LCMScheduler", "lcm", stochastic=True, schedules=()),
    ]
}


def _split_schedule(key: str) -> tuple[str, str | None]:
    """"dpm++ 2m karras" -> ("dpm++ 2m", "karras"); "lms_karras" -> ("lms", "karras")."""
    for sched, display in SIGMA_SCHEDULES.items():
        for suffix in (" " + display.lower(), "_" + sched):
            if key.endswith(suffix) and len(key) > len(suffix):
                return key[: -len(suffix)], sched
    return key, None


def get_sampler(name: str, schedule: str | None = None) -> SamplerSpec:
    """Look a sampler up by id ("euler_a") or A1111 name ("Euler a"), case-insensitively, with
    an optional schedule type.  A1111's older combined names ("DPM++ 2M Karras", "LMS Karras",
    "dpmpp_2m_karras") resolve to the sampler with that schedule type."""
    if not isinstance(name, str):
        raise BadArgument(f"sampler must be a string (an id or A1111 name), got {type(name).__name__}")
    key = name.strip().lower()
    schedule = check_sigma_schedule(schedule)
    for candidate, named in ((key, None), _split_schedule(key)):
        for spec in SAMPLERS.values():
            if candidate in (spec.id, spec.name.lower()):
                if named is not None and schedule is not None and named != schedule:
                    raise BadArgument(f"sampler {name!r} names schedule type {named!r} but {schedule!r} was asked for")
                return spec.with_schedule(named or schedule)
    valid = ", ".join(f"{s.id!r} ({s.name!r})" for s in SAMPLERS.values())
    raise BadArgument(f"unknown sampler {name!r}; valid ids (A1111 names): {valid}; "
                     f"a schedule type may follow the name (e.g. 'DPM++ 2M Karras')")
