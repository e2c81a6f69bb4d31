"""The sampler registry: ids, AUTOMATIC1111 names, the diffusers scheduler each reproduces."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import Tensor

from ..schedule import NoiseSchedule, SigmaPlan
from .base import Denoiser
from .k import sample_euler, sample_euler_ancestral, sample_heun, sample_lms
from .multistep import sample_dpmpp_2m, sample_unipc
from .vp import sample_ddim, sample_ddpm, sample_plms

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
