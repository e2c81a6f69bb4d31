"""Tiny autoencoder (TAESD) training: distil any model's VAE into an ``AutoencoderTiny``.

    from latentdiff.train.taesd import TAESDTrainConfig, train_taesd
    train_taesd(TAESDTrainConfig(teacher="models/sd15", model="sd", max_steps=20000))
    # result.exported: a diffusers AutoencoderTiny folder, usable as vae= or for previews

The teacher's latent space is kept: per image ``x`` (B, 3, H, W) in [-1, 1], with the
frozen teacher's posterior mean ``mu`` and scaling factor ``s`` (TAESD works on the scaled
latents a sampler produces, so its own scaling factor is 1):

    z = s * mu                                              (B, c, H/f, W/f)
    encoder loss = mean (enc(x) - z) ** 2                   (matches the teacher's latents)
    decoder loss = mean max(|x - dec(z)| - l1_tolerance, 0)  (reconstructs the image)
    loss = encoder_weight * encoder loss + decoder loss

The decoder learns from the teacher's latents, not its own encoder's, so either half can
be trained alone (``train_encoder = false`` for a preview decoder). madebyollin's TAESD
adds adversarial and perceptual terms for photographs; they are left out here (LPIPS
needs weights latentdiff does not ship), which is enough for flat-coloured worlds and
makes the decoder a little softer on photographs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor

from ..checkpoints.diffusers_folder import save_component
from ..models.taesd import TAESDConfig, TinyAutoencoder
from ..models.vae import AutoencoderKL
from .build import load_vae, model_config, resolve_device, seeded
from .config import TrainConfig, TrainConfigError
from .data import EpochOrder, ImageCaptionSource, load_batch, open_source
from .distributed import average_gradients, broadcast_parameters, join_world, training_device
from .ema import EMA
from .grid import save_grid
from .loop import TrainResult, TrainTask, average_over_image_batches, run_training
from .optim import autocast, clipped_step, make_adamw, set_lr


@dataclasses.dataclass
class TAESDTrainConfig(TrainConfig):
    """Distil ``teacher``'s VAE into a tiny autoencoder built from ``model``."""

    out_dir: str = "runs/taesd"
    teacher: str = ""  # a pipeline folder (its vae/), a VAE component folder or file: the frozen teacher
    # TAESD preset ("sd": madebyollin's SD 1.x layout; "tiny": for tests) or an AutoencoderTiny config.json;
    # its latent_channels must equal the teacher's and its factor f the teacher's
    model: str = "sd"
    lr: float = 1e-3
    warmup_steps: int = 0
    weight_decay: float = 0.0
    train_encoder: bool = True
    train_decoder: bool = True
    encoder_weight: float = 1.0
    l1_tolerance: float = 0.0  # decoder errors up to this (pixels in [-1, 1]) cost nothing
    num_sample_images: int = 8  # originals | teacher decodes | tiny decodes

    def validate(self) -> None:
        super().validate()
        if not self.teacher:
            raise TrainConfigError("teacher must name the model whose VAE is distilled (a pipeline or VAE folder)")
        if not (self.train_encoder or self.train_decoder):
            raise TrainConfigError("train_encoder and train_decoder are both false: nothing to train")
        if self.encoder_weight < 0 or self.l1_tolerance < 0:
            raise TrainConfigError("encoder_weight and l1_tolerance must be >= 0")


def fresh_taesd(spec: str, seed: int) -> TinyAutoencoder:
    """A randomly initialised tiny autoencoder from a preset or an ``AutoencoderTiny`` config.json."""
    config = model_config(spec, TAESDConfig)
    with seeded(seed):
        return TinyAutoencoder(config)  # type: ignore[arg-type]


def check_student_fits(student: TinyAutoencoder, teacher: AutoencoderKL) -> None:
    """The tiny autoencoder must have the teacher's latent channels and factor f."""
    for what, mine, theirs in (
        ("latent channels", student.latent_channels, teacher.config.latent_channels),
        ("downsampling factor", student.downsample_factor, teacher.downsample_factor),
    ):
        if mine != theirs:
            raise TrainConfigError(f"the tiny autoencoder has {mine} {what}, the teacher's VAE {theirs}")


class TAESDTrainer(TrainTask):
    """The tiny autoencoder as a :class:`~latentdiff.train.loop.TrainTask`."""

    kind = "taesd"
    loss_names = ("loss", "encoder_mse", "decoder_l1", "grad_norm")

    def __init__(
        self,
        config: TAESDTrainConfig,
        source: ImageCaptionSource | None = None,
        teacher: AutoencoderKL | None = None,
        student: TinyAutoencoder | None = None,
    ) -> None:
        config.validate()
        self.config = cfg = config
        self.ranks = join_world(resolve_device(cfg.device))
        self.device = resolve_device(training_device(cfg.device, self.ranks))
        self.source = source if source is not None else open_source(
            cfg.data, cfg.resolution, cfg.world_seed, cfg.world_length
        )
        teacher = teacher if teacher is not None else load_vae(cfg.teacher)
        if not isinstance(teacher, AutoencoderKL):
            raise TrainConfigError("the teacher must be a KL autoencoder (AutoencoderKL)")
        self.teacher = teacher.to(self.device, torch.float32).eval().requires_grad_(False)
        student = student if student is not None else fresh_taesd(cfg.model, cfg.seed)
        check_student_fits(student, self.teacher)
        self.taesd = student.to(self.device, torch.float32).train()
        self.taesd.requires_grad_(False)
        for half, on in ((self.taesd.encoder, cfg.train_encoder), (self.taesd.decoder, cfg.train_decoder)):
            half.requires_grad_(on)
        params = [p for p in self.taesd.parameters() if p.requires_grad]
        self.modules = {"taesd": self.taesd}
        self.optimizers = {"taesd": make_adamw(params, cfg.lr, (cfg.adam_beta1, cfg.adam_beta2), cfg.weight_decay)}
        self.emas = {"taesd": EMA(self.taesd, cfg.ema_decay, cfg.ema_warmup, cfg.ema_power)} if cfg.ema_decay > 0 else {}
        self.generators = {}
        self.order = EpochOrder(len(self.source), cfg.seed)
        broadcast_parameters(self.modules, self.ranks)

    @property
    def export_name(self) -> str:
        return "taesd"

    @torch.no_grad()
    def teacher_latents(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) -> the teacher's scaled posterior means (B, c, H/f, W/f)."""
        return self.teacher.scale_latents(self.teacher.encode(images).mean)

    def _micro_step(self, images: Tensor, accum: int) -> dict[str, float]:
        cfg = self.config
        z = self.teacher_latents(images)  # (B, c, h, w)
        zero = torch.zeros((), device=self.device)
        enc_mse = dec_l1 = zero
        with autocast(self.device, cfg.bf16):
            if cfg.train_encoder:
                enc_mse = (self.taesd.encoder(images).float() - z).pow(2).mean()
            if cfg.train_decoder:
                recon = self.taesd.decoder(z).float()  # (B, 3, H, W)
                dec_l1 = ((images - recon).abs() - cfg.l1_tolerance).clamp(min=0).mean()
        loss = cfg.encoder_weight * enc_mse + dec_l1
        (loss / accum).backward()
        return {"loss": loss.item(), "encoder_mse": enc_mse.item(), "decoder_l1": dec_l1.item()}

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.config
        lr = cfg.lr_at(step)
        set_lr(self.optimizers["taesd"], lr)
        totals = average_over_image_batches(self, step, lambda images, ids: self._micro_step(images, cfg.grad_accum))
        average_gradients(self.taesd.parameters(), self.ranks)
        totals["grad_norm"] = float(clipped_step(self.optimizers["taesd"], cfg.grad_clip))
        for ema in self.emas.values():
            ema.update(self.taesd)
        return {**totals, "lr": lr}

    @torch.no_grad()
    def write_samples(self, step: int, path: Path) -> None:
        """Rows: originals | the teacher's decodes | the tiny decoder's decodes of the teacher's latents."""
        n = min(self.config.num_sample_images, len(self.source))
        images, _ = load_batch(self.source, range(n))
        images = images.to(self.device)
        z = self.teacher_latents(images)
        teacher = self.teacher.decode(self.teacher.unscale_latents(z)).float()
        tiny = self.inference_model("taesd").decoder(z).float()
        save_grid(torch.cat([images, teacher, tiny]).cpu(), path, nrow=n,
                  text={"step": str(step), "rows": "originals | teacher decodes | tiny decodes"})

    def export(self, folder: Path) -> Path:
        """``folder`` = a diffusers ``AutoencoderTiny`` folder (EMA weights when EMA is on)."""
        save_component(self.inference_model("taesd"), folder, "vae")
        return folder


def train_taesd(
    config: TAESDTrainConfig,
    *,
    source: ImageCaptionSource | None = None,
    teacher: AutoencoderKL | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Distil a tiny autoencoder; see :class:`TAESDTrainConfig` for every setting."""
    return run_training(TAESDTrainer(config, source=source, teacher=teacher), resume=resume, progress=progress)
