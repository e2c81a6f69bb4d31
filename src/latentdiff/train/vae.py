"""Autoencoder (AutoencoderKL, or VQModel) training: L1 + KL + PatchGAN hinge loss (+ LPIPS when weights are given).

    from latentdiff.train import VAETrainConfig, train_vae
    result = train_vae(VAETrainConfig(data="photos/", resolution=64, max_steps=2000))
    # result.exported: a diffusers ``vae/`` folder (config.json + safetensors)

Per optimizer step and micro-batch (LDM's ``LPIPSWithDiscriminator``, both
optimizers on the same batch, as taming/LDM do):

1. generator: ``x_hat = decode(z)``, z a posterior sample (``sample_posterior``) or its mean;
   ``rec = sum max(|x - x_hat| - l1_tolerance, 0) (+ perceptual_weight * LPIPS * pixels)`` per
   image, batch mean;
   ``loss = rec + kl_weight * KL + w * disc_factor * (-D(x_hat))`` with ``w`` the adaptive
   weight times ``disc_weight``; the discriminator is frozen for this backward pass;
2. discriminator: ``disc_factor * hinge(D(x), D(x_hat.detach()))``.

``disc_factor`` is 0 until ``disc_start`` steps (the autoencoder first learns to
reconstruct, then the GAN sharpens it).

``regularization = "vq"`` trains a VQ-GAN (:class:`~latentdiff.models.vq.VQModel`) instead: the
KL term becomes ``commitment_weight * commitment (+ codebook)`` of the quantiser
(:mod:`latentdiff.train.codebook`), the decoder reconstructs from the codes (straight-through
gradient), and each step logs the codebook's perplexity, share of codes used and restarts
(``samples/codebook.png`` plots them). Not done here: LDM's learned output log-variance
(fixed at 0, which leaves the loss above).
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from torch import Tensor

from ..checkpoints.diffusers_folder import save_component
from ..checkpoints.io import atomic_path
from ..models.vae import AutoencoderKL
from ..models.vq import VQModel
from .build import fresh_vae, fresh_vq, load_vae, resolve_device
from .codebook import CodebookState, quantisation_losses, usage
from .config import TrainConfigError, VAETrainConfig
from .data import EpochOrder, ImageCaptionSource, load_batch, open_source
from .distributed import (
    all_reduce_mean_tensor, average_gradients, broadcast_parameters, gather_with_grad, globalise_batch_norms, join_world,
    training_device,
)
from .draws import CODEBOOK, POSTERIOR, sample_generator
from .ema import EMA
from .grid import save_grid
from .loop import LOG_NAME, TrainResult, TrainTask, average_over_image_batches, run_training
from .losses import (
    NLayerDiscriminator, adaptive_weight, disc_factor, generator_adv_loss, hinge_d_loss, kl_loss, l1_error,
)
from .lpips import LPIPS
from .optim import autocast, clipped_step, make_adamw, set_lr


class VAETrainer(TrainTask):
    """The autoencoder as a :class:`~latentdiff.train.loop.TrainTask`."""

    kind = "vae"
    loss_names = ("loss", "l1", "kl", "lpips", "g_loss", "d_loss", "d_weight", "grad_norm")

    def __init__(
        self,
        config: VAETrainConfig,
        source: ImageCaptionSource | None = None,
        vae: AutoencoderKL | VQModel | None = None,
    ) -> None:
        config.validate()
        self.config = cfg = config
        self.ranks = join_world(resolve_device(cfg.device))
        self.device = resolve_device(training_device(cfg.device, self.ranks))
        self.source = source if source is not None else open_source(
            cfg.data, cfg.resolution, cfg.world_seed, cfg.world_length
        )
        self.vq = cfg.regularization == "vq"
        if vae is None:
            if cfg.pretrained:
                vae = load_vae(cfg.pretrained)
            elif self.vq:
                vae = fresh_vq(cfg.model, cfg.seed, cfg.num_codes, cfg.code_dim)
            else:
                vae = fresh_vae(cfg.model, cfg.seed)
                if cfg.init_logvar is not None:
                    start_with_small_variance(vae, cfg.init_logvar)
        if isinstance(vae, VQModel) != self.vq:
            raise TrainConfigError(f"regularization = {cfg.regularization!r} does not fit a {type(vae).__name__}")
        self.vae = vae.to(self.device, torch.float32).train().requires_grad_(True)
        if cfg.train_decoder_only:  # keep the latent space (and every UNet trained on it) unchanged
            for frozen in (self.vae.encoder, self.vae.quant_conv, getattr(self.vae, "quantize", None)):
                if frozen is not None:
                    frozen.requires_grad_(False)
        if self.vq:
            if cfg.codebook_update == "ema":
                self.vae.quantize.embedding.requires_grad_(False)  # moved by running means, not by gradients
            self.codebook = CodebookState(self.vae.quantize).to(self.device)
            self.loss_names = (*self.loss_names[:2], "vq_loss", "perplexity", "codes_used", "restarts",
                               *self.loss_names[3:])
        self.vae.set_gradient_checkpointing(cfg.gradient_checkpointing)
        self.disc = globalise_batch_norms(NLayerDiscriminator(  # batch statistics over all ranks
            vae.config.out_channels, cfg.disc_channels, cfg.disc_layers,
            generator=torch.Generator().manual_seed(cfg.seed + 1),
        ).to(self.device), self.ranks)
        self.lpips = (
            LPIPS.from_files(cfg.lpips_vgg, cfg.lpips_lin).to(self.device)  # type: ignore[arg-type]
            if cfg.perceptual_weight > 0 else None
        )
        betas = (cfg.adam_beta1, cfg.adam_beta2)
        self.modules = {"vae": self.vae, "discriminator": self.disc}
        if self.vq:
            self.modules["codebook"] = self.codebook
        self._seen: list[tuple[Tensor, Tensor]] = []  # VQ: each micro-batch's (latents, codes) for the codebook update
        self.optimizers = {
            "vae": make_adamw([p for p in self.vae.parameters() if p.requires_grad], cfg.lr, betas, cfg.weight_decay),
            "discriminator": make_adamw(self.disc.parameters(), cfg.disc_lr or cfg.lr, betas, cfg.weight_decay),
        }
        self.emas = {"vae": EMA(self.vae, cfg.ema_decay, cfg.ema_warmup, cfg.ema_power)} if cfg.ema_decay > 0 else {}
        self.generators: dict[str, torch.Generator] = {}  # posterior samples: per-sample draws (draws.py)
        self.order = EpochOrder(len(self.source), cfg.seed)
        broadcast_parameters(self.modules, self.ranks)

    @property
    def export_name(self) -> str:
        return "vae"

    # ------------------------------------------------------------------ one step
    def _micro_step(self, images: Tensor, ids: list[int], factor: float, accum: int) -> dict[str, float]:
        cfg, vae, disc = self.config, self.vae, self.disc
        batch = images.shape[0]
        disc.requires_grad_(False)  # the generator loss must not train the discriminator
        if self.vq:
            with autocast(self.device, cfg.bf16):
                h = vae._latents(images).float()  # (B, e, h, w) pre-quantisation
                quantized = vae.quantize(h)
                recon = vae.decoder(vae.post_quant_conv(quantized.latents)).float()  # (B, 3, H, W)
            commitment, codebook = quantisation_losses(h, vae.quantize, quantized.indices)
            reg = cfg.commitment_weight * commitment + (codebook if cfg.codebook_update == "loss" else 0.0)
            e = h.shape[1]
            self._seen.append((h.detach().permute(0, 2, 3, 1).reshape(-1, e), quantized.indices))
        else:
            noise = [sample_generator(cfg.seed, POSTERIOR, n) for n in ids] if cfg.sample_posterior else None
            with autocast(self.device, cfg.bf16):
                out = vae(images, generator=noise, sample_posterior=cfg.sample_posterior)
            recon = out.sample.float()  # (B, 3, H, W)
            kl = kl_loss(out.posterior).float()
            reg = cfg.kl_weight * kl
        abs_err = (images - recon).abs()
        rec = l1_error(images, recon, cfg.l1_tolerance)
        p_loss = torch.zeros((), device=self.device)
        if self.lpips is not None:
            p = self.lpips(images, recon)  # (B, 1, 1, 1)
            p_loss = p.mean()
            rec = rec + cfg.perceptual_weight * p
        nll = rec.sum() / batch
        if factor > 0:
            with autocast(self.device, cfg.bf16):
                logits_fake = disc(recon)
            g_loss = generator_adv_loss(logits_fake.float())
            d_weight = adaptive_weight(nll, g_loss, vae.decoder.conv_out.weight,
                                       reduce=lambda g: all_reduce_mean_tensor(g, self.ranks)) * cfg.disc_weight
        else:
            g_loss = d_weight = torch.zeros((), device=self.device)
        loss = nll + reg + d_weight * factor * g_loss
        (loss / accum).backward()
        disc.requires_grad_(True)

        d_loss = torch.zeros((), device=self.device)
        if factor > 0:
            with autocast(self.device, cfg.bf16):
                logits_real = disc(images)
                logits_fake = disc(recon.detach())
            d_loss = factor * hinge_d_loss(logits_real.float(), logits_fake.float())
            (d_loss / accum).backward()
        terms = {"vq_loss": (commitment + codebook).item()} if self.vq else {"kl": kl.item()}
        return {
            "loss": loss.item(), "l1": abs_err.mean().item(), **terms, "lpips": p_loss.item(),
            "g_loss": g_loss.item(), "d_loss": d_loss.item(), "d_weight": float(d_weight),
        }

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.config
        lr = cfg.lr_at(step)
        set_lr(self.optimizers["vae"], lr)
        set_lr(self.optimizers["discriminator"], cfg.lr_at(step, cfg.disc_lr or cfg.lr))
        factor = disc_factor(step, cfg.disc_start)
        totals = average_over_image_batches(
            self, step, lambda images, ids: self._micro_step(images, ids, factor, cfg.grad_accum))
        average_gradients([*self.vae.parameters(), *self.disc.parameters()], self.ranks)
        totals["grad_norm"] = float(clipped_step(self.optimizers["vae"], cfg.grad_clip))
        clipped_step(self.optimizers["discriminator"], cfg.grad_clip)
        if self.vq:
            totals.update(self.update_codebook(step))
        for ema in self.emas.values():
            ema.update(self.vae)
        return {**totals, "lr": lr}

    def update_codebook(self, step: int) -> dict[str, float]:
        """EMA moves and dead-code restarts on the step's global batch (micro-batch by micro-batch, each
        gathered over the ranks in rank order: the order of one process); its usage for the log."""
        cfg = self.config
        latents = torch.cat([gather_with_grad(h, self.ranks) for h, _ in self._seen])  # (N, e)
        indices = torch.cat([gather_with_grad(i, self.ranks) for _, i in self._seen])  # (N,)
        self._seen.clear()
        restarts = self.codebook.update(
            self.vae.quantize, latents, indices, ema=cfg.codebook_update == "ema", decay=cfg.codebook_ema_decay,
            dead_code_steps=cfg.dead_code_steps, generator=sample_generator(cfg.seed, CODEBOOK, step),
        )
        perplexity, share = usage(indices, self.vae.quantize.embedding.num_embeddings)
        return {"perplexity": perplexity, "codes_used": share, "restarts": float(restarts)}

    # ------------------------------------------------------------------ previews and export
    @torch.no_grad()
    def write_samples(self, step: int, path: Path) -> None:
        """Originals (top row) | reconstructions from the posterior mean (bottom row)."""
        n = min(self.config.num_sample_images, len(self.source))
        images, _ = load_batch(self.source, range(n))
        model = self.inference_model("vae")
        was_training = model.training
        model.eval()
        try:
            recon = model(images.to(self.device)).sample.float().cpu()
        finally:
            model.train(was_training)
        save_grid(torch.cat([images, recon]), path, nrow=n, text={"step": str(step), "rows": "originals | reconstructions"})
        if self.vq:
            self._plot_codebook_usage(path.parent / "codebook.png")

    def _plot_codebook_usage(self, path: Path) -> None:
        """``samples/codebook.png``: perplexity / codebook size and the share of codes used, per logged step."""
        from ..eval.plot import Series, line_plot

        log = Path(self.config.out_dir) / LOG_NAME
        with log.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            return
        size = self.vae.quantize.embedding.num_embeddings
        steps = [float(r["step"]) for r in rows]
        series = [Series("share of codes used", steps, [float(r["codes_used"]) for r in rows]),
                  Series(f"perplexity / {size}", steps, [float(r["perplexity"]) / size for r in rows])]
        image = line_plot(series, "codebook usage per step", "step", "fraction of the codebook")
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")

    def export(self, folder: Path) -> Path:
        """``folder`` = a diffusers ``vae/`` component (EMA weights when EMA is on)."""
        save_component(self.inference_model("vae"), folder, "vae")
        return folder


def start_with_small_variance(vae: AutoencoderKL, logvar: float) -> None:
    """Make a fresh encoder's posterior start narrow: log-variance = ``logvar`` everywhere.

    At random init the posterior std is about 1, as large as the means, so sampled latents
    are mostly noise and the decoder cannot localise anything; with the tiny KL weight of
    LDM the variance only shrinks after very many steps (a 64x64 probe still decoded
    blurred blobs in the wrong place after 1000 steps). Zeroing the log-variance rows of
    the last projection and setting their bias removes that slow phase.
    """
    c = vae.config.latent_channels
    last = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
    with torch.no_grad():
        last.weight[c:].zero_()
        last.bias[c:].fill_(logvar)


def train_vae(
    config: VAETrainConfig,
    *,
    source: ImageCaptionSource | None = None,
    vae: AutoencoderKL | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train (or fine-tune) an autoencoder; see :class:`VAETrainConfig` for every setting.

    ``source`` overrides ``config.data``; ``vae`` overrides ``config.model``/``pretrained``.
    """
    return run_training(VAETrainer(config, source=source, vae=vae), resume=resume, progress=progress)
