"""Latent consistency distillation into an LCM-LoRA (Luo et al. 2023, "LCM" and "LCM-LoRA").

    from latentdiff.train import LCMTrainConfig, train_lcm
    result = train_lcm(LCMTrainConfig(pretrained="my-sd15", data="photos/", max_steps=1000))
    pipe.load_lora(result.exported)          # then sampler="lcm", steps=4, guidance_scale=1

The teacher is a pipeline's UNet, frozen; the student is that same UNet with trainable LoRA
adapters (rank ``lora_rank``, scale ``lora_alpha / lora_rank``) on ``lora_targets`` (default: the
attention projections, feed-forward linears and proj_in / proj_out), ``up`` zero-initialised so
the student starts as the teacher. The target network is the same UNet with an EMA of the
student's LoRA weights (``ema_decay``; 0 makes the target the online student, as diffusers'
LCM-LoRA script does). The teacher and the target share the student's frozen base weights: no
UNet is copied.

What one micro-batch does (the "skipping-step" consistency distillation of the LCM paper):

    x0    = cached latent * scaling_factor,  c = text(caption),  u = text("")
    T, N  = num_train_timesteps, num_ddim_timesteps;  k = T // N
    tau_i = k * (i + 1) - 1,  i = 0 .. N-1                       (the teacher's DDIM timesteps)
    i ~ U{0, ..., N-1};   t = tau_i;   s = max(t - k, 0)
    w ~ U[w_min, w_max];  eps ~ N(0, I)
    x_t   = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    f(x, t) = c_skip(t) x + c_out(t) x0_pred(x, t)   (consistency function, boundary conditions
              c_skip = sd^2 / ((10 t)^2 + sd^2), c_out = 10 t / sqrt((10 t)^2 + sd^2), sd = 0.5,
              10 = timestep_scaling; x0_pred from the eps or v prediction of the UNet)
    student = f_student(x_t, t)
    teacher: (x0^, eps^) = cond + w (cond - uncond) of the frozen UNet's (x0_pred, eps_pred)
             at x_t, t, with c and with u   (guidance scale 1 + w)
    x_s   = sqrt(abar_s) x0^ + sqrt(1 - abar_s) eps^                  (one DDIM step t -> s)
    target = f_target(x_s, s)                                        (EMA LoRA, no gradient)
    loss  = mean(sqrt((student - target)^2 + huber_c^2) - huber_c)  (loss_type "huber")
            or MSE(student, target)                                  (loss_type "l2")

AdamW on the LoRA weights only, with the shared warm-up / decay of the learning rate; after each
optimizer step target <- d target + (1 - d) student. Every random draw of a sample comes from
its global index (:mod:`latentdiff.train.draws`: DDIM index, guidance weight, noise), so the
distillation learns the same LoRA in one process or over torchrun ranks. Latents and text
embeddings are cached as :mod:`latentdiff.train.unet` caches them.

Export: ``out_dir/lcm_lora.safetensors``, a kohya-format LoRA (``lora_unet_<layer>.lora_down.weight``,
``.lora_up.weight``, ``.alpha``) of the student, which ``Pipeline.load_lora`` and diffusers'
``load_lora_weights`` read. Sample grids use the ``lcm`` sampler (``sample_steps`` 4, guidance 1)
with the LoRA merged into a copy of the UNet.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..checkpoints.io import write_safetensors
from ..models.unet import UNet2DCondition
from ..pipeline import Pipeline
from ..schedule import NoiseSchedule, lcm_boundary_scalings
from .build import base_pipeline
from .config import TrainConfig, TrainConfigError
from .data import ImageCaptionSource
from .draws import LCM, stacked
from .ema import ema_decay_at
from .grid import save_grid
from .lora_layers import DEFAULT_TARGETS, LoRANetwork, merge_into, merged_copy
from .loop import TrainResult, run_training
from .optim import autocast, make_adamw
from .unet import DiffusionTrainer

EXPORT_NAME = "lcm_lora.safetensors"


@dataclasses.dataclass
class LCMTrainConfig(TrainConfig):
    """Consistency distillation of a pipeline's UNet into an LCM-LoRA (see the module docstring)."""

    out_dir: str = "runs/lcm"
    pretrained: str | None = None  # the teacher pipeline (folder or single file); default: the built-in model
    latent_mode: str = "mean"  # "mean" (posterior mode) or "sample" (one fixed draw per image)
    cache_text: bool = True  # encode each unique caption (and "") once
    # ---- LoRA ----
    lora_rank: int = 64
    lora_alpha: float = 64.0  # the update is scaled by lora_alpha / lora_rank
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_TARGETS))  # module-name suffixes
    # ---- distillation ----
    num_ddim_timesteps: int = 50  # N: the teacher's DDIM solver skips k = T // N timesteps per step
    w_min: float = 3.0  # guidance weight w ~ U[w_min, w_max]; the teacher's CFG scale is 1 + w
    w_max: float = 15.0
    timestep_scaling: float = 10.0  # of the boundary conditions c_skip, c_out
    loss_type: str = "huber"  # "huber" (pseudo-Huber) or "l2"
    huber_c: float = 0.001
    ema_decay: float = 0.95  # target LoRA = EMA of the student's; 0: the target is the online student
    ema_warmup: bool = False  # constant decay, as the LCM scripts
    # ---- optimisation (the LCM-LoRA script's) ----
    lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.0
    # ---- sample grids (the lcm sampler with the LoRA merged) ----
    sample_prompts: list[str] = dataclasses.field(default_factory=list)  # default: the first data captions
    num_sample_images: int = 4
    sample_steps: int = 4
    guidance_scale: float = 1.0
    sample_seed: int = 0

    def validate(self) -> None:
        super().validate()
        if self.latent_mode not in ("mean", "sample"):
            raise TrainConfigError(f"latent_mode must be 'mean' or 'sample', got {self.latent_mode!r}")
        if self.lora_rank < 1:
            raise TrainConfigError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if not self.lora_alpha > 0:
            raise TrainConfigError(f"lora_alpha must be positive, got {self.lora_alpha}")
        if not self.lora_targets:
            raise TrainConfigError("lora_targets must name at least one module (e.g. 'to_q')")
        if self.num_ddim_timesteps < 1:
            raise TrainConfigError(f"num_ddim_timesteps must be >= 1, got {self.num_ddim_timesteps}")
        if not 0.0 <= self.w_min <= self.w_max:
            raise TrainConfigError(f"w_min and w_max must satisfy 0 <= w_min <= w_max, got {self.w_min} and {self.w_max}")
        if not self.timestep_scaling > 0:
            raise TrainConfigError(f"timestep_scaling must be positive, got {self.timestep_scaling}")
        if self.loss_type not in ("huber", "l2"):
            raise TrainConfigError(f"loss_type must be 'huber' or 'l2', got {self.loss_type!r}")
        if not self.huber_c > 0:
            raise TrainConfigError(f"huber_c must be positive, got {self.huber_c}")
        if self.sample_steps < 1:
            raise TrainConfigError(f"sample_steps must be >= 1, got {self.sample_steps}")
        if self.num_sample_images < 1:
            raise TrainConfigError(f"num_sample_images must be >= 1, got {self.num_sample_images}")


# ---------------------------------------------------------------------------- the math
def ddim_timesteps(num_train_timesteps: int, num_ddim_timesteps: int) -> Tensor:
    """The teacher solver's timesteps, increasing (int64): ``k * (i + 1) - 1`` for i < N, k = T // N."""
    if not 1 <= num_ddim_timesteps <= num_train_timesteps:
        raise ValueError(f"num_ddim_timesteps must be in [1, {num_train_timesteps}], got {num_ddim_timesteps}")
    k = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1, dtype=torch.int64) * k - 1


def _col(v: Tensor, like: Tensor) -> Tensor:
    return v.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def predicted_x0_and_eps(output: Tensor, x_t: Tensor, abar: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
    """(x0, eps) implied by a UNet output at x_t with alphas_cumprod ``abar`` (B,)."""
    a, s = _col(abar, x_t).sqrt(), (1 - _col(abar, x_t)).sqrt()
    if prediction_type == "epsilon":
        return (x_t - s * output) / a, output
    if prediction_type == "v_prediction":
        return a * x_t - s * output, a * output + s * x_t
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def consistency_output(x_t: Tensor, x0: Tensor, t: Tensor, timestep_scaling: float) -> Tensor:
    """``c_skip(t) x_t + c_out(t) x0`` with LCM's boundary conditions at timesteps ``t`` (B,)."""
    c_skip, c_out = lcm_boundary_scalings(t, timestep_scaling)
    return _col(c_skip, x_t) * x_t + _col(c_out, x_t) * x0


def ddim_step(x0: Tensor, eps: Tensor, abar_prev: Tensor) -> Tensor:
    """Deterministic DDIM to the level ``abar_prev`` (B,): ``sqrt(abar) x0 + sqrt(1 - abar) eps``."""
    return _col(abar_prev, x0).sqrt() * x0 + (1 - _col(abar_prev, x0)).sqrt() * eps


def consistency_loss(pred: Tensor, target: Tensor, loss_type: str, huber_c: float) -> Tensor:
    """Pseudo-Huber ``mean(sqrt(d^2 + c^2) - c)`` or MSE, in float32."""
    d = pred.float() - target.float()
    if loss_type == "huber":
        return (torch.sqrt(d * d + huber_c**2) - huber_c).mean()
    if loss_type == "l2":
        return (d * d).mean()
    raise ValueError(f"unknown loss_type {loss_type!r}")


# ---------------------------------------------------------------------------- the trainer
class LCMTrainer(DiffusionTrainer):
    """LCM-LoRA distillation as a :class:`~latentdiff.train.loop.TrainTask` (pipeline, caches, data
    order and the step are the diffusion trainers')."""

    kind = "lcm"

    def __init__(self, config: LCMTrainConfig, source: ImageCaptionSource | None = None,
                 pipeline: Pipeline | None = None) -> None:
        super().__init__(config, source=source, pipeline=pipeline)  # type: ignore[arg-type]
        self._merged: UNet2DCondition | None = None

    def build_pipeline(self) -> Pipeline:
        return base_pipeline(self.config.pretrained)  # type: ignore[attr-defined]

    def prepare_pipeline(self, pipe: Pipeline) -> Pipeline:
        """The teacher as it is; its prediction type and timesteps must suit the distillation."""
        cfg = self.config
        schedule = NoiseSchedule(pipe.schedule)
        self.prediction_type = schedule.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise TrainConfigError(f"the teacher predicts {self.prediction_type!r}; LCM distillation needs "
                                   "'epsilon' or 'v_prediction'")
        T = schedule.num_train_timesteps
        if cfg.num_ddim_timesteps > T:  # type: ignore[attr-defined]
            raise TrainConfigError(f"num_ddim_timesteps ({cfg.num_ddim_timesteps}) cannot exceed the teacher's "  # type: ignore[attr-defined]
                                   f"num_train_timesteps ({T})")
        self.ddim_timesteps = ddim_timesteps(T, cfg.num_ddim_timesteps)  # type: ignore[attr-defined]
        self.skip = T // cfg.num_ddim_timesteps  # type: ignore[attr-defined]
        return pipe

    def setup_training(self) -> None:
        """The student LoRA (trained) and the target LoRA (its EMA), both hooked into the frozen UNet."""
        cfg: LCMTrainConfig = self.config  # type: ignore[assignment]
        try:
            self.lora = LoRANetwork(self.unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, seed=cfg.seed + 4)
        except ValueError as err:
            raise TrainConfigError(f"lora_targets: {err}") from None
        self.target = LoRANetwork(self.unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, seed=cfg.seed + 4)
        self.target.load_state_dict(self.lora.state_dict())
        self.target.requires_grad_(False)
        self.lora.attach(self.unet)
        self.target.attach(self.unet)
        self.target.enabled = False
        self.modules = {"lora": self.lora, "target": self.target}
        self.optimizers = {
            "lora": make_adamw(self.lora.parameters(), cfg.lr, (cfg.adam_beta1, cfg.adam_beta2), cfg.weight_decay)
        }

    # ------------------------------------------------------------------ which network runs
    @contextlib.contextmanager
    def using(self, which: str) -> Iterator[None]:
        """The UNet as "student" (online LoRA), "target" (EMA LoRA) or "teacher" (no LoRA)."""
        before = (self.lora.enabled, self.target.enabled)
        self.lora.enabled, self.target.enabled = which == "student", which == "target"
        try:
            yield
        finally:
            self.lora.enabled, self.target.enabled = before

    def _x0_eps(self, x: Tensor, t: Tensor, emb: Tensor) -> tuple[Tensor, Tensor]:
        with autocast(self.device, self.config.bf16):
            out = self.unet(x, t.to(self.device), emb).float()
        return predicted_x0_and_eps(out, x, self.schedule.alphas_cumprod[t], self.prediction_type)

    # ------------------------------------------------------------------ one step
    def distillation_terms(self, x0: Tensor, emb: Tensor, uncond: Tensor, index: Tensor, w: Tensor,
                           noise: Tensor) -> tuple[Tensor, Tensor]:
        """(student output, target output) for one batch: latents ``x0`` (B, c, h, w), text ``emb``
        and ``uncond`` (B, 77, D), DDIM indices ``index`` (B,), guidance ``w`` (B,), ``noise``."""
        cfg = self.config
        t = self.ddim_timesteps[index]
        s = (t - self.skip).clamp(min=0)
        abar = self.schedule.alphas_cumprod
        x_t = ddim_step(x0, noise, abar[t])  # q_sample: sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
        with self.using("student"):
            x0_s, _ = self._x0_eps(x_t, t, emb)
        student = consistency_output(x_t, x0_s, t, cfg.timestep_scaling)
        with torch.no_grad():
            with self.using("teacher"):
                both_x0, both_eps = self._x0_eps(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([emb, uncond]))
            (c_x0, u_x0), (c_eps, u_eps) = both_x0.chunk(2), both_eps.chunk(2)
            wc = _col(w, x0)
            x_s = ddim_step(c_x0 + wc * (c_x0 - u_x0), c_eps + wc * (c_eps - u_eps), abar[s])
            with self.using("target"):
                x0_t, _ = self._x0_eps(x_s, s, emb)
            target = consistency_output(x_s, x0_t, s, cfg.timestep_scaling)
        return student, target

    def _micro_step(self, indices: list[int], ids: list[int], accum: int) -> float:
        cfg: LCMTrainConfig = self.config  # type: ignore[assignment]
        x0 = self.latents[indices].to(self.device)  # (B, c, h, w)
        batch = x0.shape[0]

        def draw(g: torch.Generator) -> tuple[Tensor, ...]:
            index = torch.randint(0, cfg.num_ddim_timesteps, (), generator=g)
            w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand((), generator=g)
            return index, w, torch.randn(x0.shape[1:], generator=g)

        index, w, noise = stacked(ids, cfg.seed, LCM, draw)
        emb = self.embed([self.captions[i] for i in indices])
        uncond = self.embed([""] * batch)
        student, target = self.distillation_terms(x0, emb, uncond, index, w, noise.to(self.device))
        loss = consistency_loss(student, target, cfg.loss_type, cfg.huber_c)
        (loss / accum).backward()
        return loss.item()

    @torch.no_grad()
    def update_target(self, step: int) -> None:
        """target <- d target + (1 - d) student, d the EMA decay of update ``step``."""
        cfg = self.config
        d = ema_decay_at(step, cfg.ema_decay, cfg.ema_warmup, cfg.ema_power)
        for p, q in zip(self.lora.parameters(), self.target.parameters()):
            q.lerp_(p.detach(), 1.0 - d)

    def train_step(self, step: int) -> dict[str, float]:
        values = super().train_step(step)
        self.update_target(step)
        return values

    # ------------------------------------------------------------------ previews and export
    def merged_unet(self) -> UNet2DCondition:
        """A hook-free copy of the UNet with the student's current LoRA merged in (one copy, reused)."""
        if self._merged is None:
            self._merged = merged_copy(self.unet, self.lora, self.target)  # type: ignore[assignment]
        else:
            with torch.no_grad():
                for p, q in zip(self.unet.parameters(), self._merged.parameters()):
                    q.copy_(p)
            merge_into(self._merged, self.lora)
        return self._merged.eval()  # type: ignore[union-attr]

    @torch.no_grad()
    def generate(self, prompts: list[str]) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1]: the ``lcm`` sampler, ``sample_steps`` steps, guidance
        ``guidance_scale``, the LoRA merged; image i is seeded with ``sample_seed + i``."""
        cfg = self.config
        pipe = dataclasses.replace(self.pipe, unet=self.merged_unet())
        h, w = self.latents.latent_size
        images = pipe.txt2img(prompts, width=w * pipe.vae_factor, height=h * pipe.vae_factor,
                              steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale, sampler="lcm",
                              seed=cfg.sample_seed)
        array = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)
        return array.float() / 127.5 - 1.0

    def write_samples(self, step: int, path: Path) -> None:
        images = self.generate(self.prompts)
        save_grid(images, path, nrow=len(self.prompts),
                  text={"step": str(step), "prompts": "\n".join(self.prompts), "sampler": "lcm"})

    @property
    def export_name(self) -> str:
        return EXPORT_NAME

    def export(self, folder: Path) -> Path:
        """The student's LoRA as one kohya-format safetensors file at ``folder`` (a file path)."""
        cfg = self.config
        write_safetensors(self.lora.kohya_state_dict(), folder, metadata={
            "ss_network_module": "networks.lora", "ss_network_dim": str(cfg.lora_rank),
            "ss_network_alpha": str(cfg.lora_alpha), "latentdiff_lora": "lcm",
        })
        return folder


def train_lcm(
    config: LCMTrainConfig,
    *,
    source: ImageCaptionSource | None = None,
    pipeline: Pipeline | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Distill ``config.pretrained`` (default the built-in model) into an LCM-LoRA; see :class:`LCMTrainConfig`.

    ``source`` overrides ``config.data``; ``pipeline`` overrides the teacher (its UNet gets LoRA hooks
    and stays frozen). ``result.exported`` is the kohya-format LoRA file.
    """
    return run_training(LCMTrainer(config, source=source, pipeline=pipeline), resume=resume, progress=progress)
