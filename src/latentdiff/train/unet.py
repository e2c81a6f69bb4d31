"""Latent diffusion training of the UNet (from scratch, or fine-tuning a pipeline with the same loop).

    from latentdiff.train import UNetTrainConfig, train_unet
    cfg = UNetTrainConfig(vae="runs/vae/vae", text_encoder="runs/clip/text_encoder",
                          tokenizer="runs/clip/tokenizer", max_steps=5000)
    result = train_unet(cfg)            # result.exported: a diffusers pipeline folder
    train_unet(UNetTrainConfig(pretrained="my-sd15", data="photos/"))   # fine-tuning

What one micro-batch does (the DDPM objective of SD):

    x0    = cached latent * scaling_factor            (encoded ONCE by the frozen VAE)
    c     = caption, replaced by "" with probability caption_dropout (for CFG)
    t     ~ U{0, ..., T-1},  eps ~ N(0, I)
    x_t   = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps     (scaled_linear schedule)
    loss  = MSE(unet(x_t, t, text(c)), eps)            or v = sqrt(abar) eps - sqrt(1-abar) x0

Options of common fine-tuning recipes (as diffusers' ``train_text_to_image``):
``noise_offset`` adds ``noise_offset * N(0, 1)`` of shape (B, c, 1, 1) to eps (drawn after eps);
``min_snr_gamma`` weights each sample's MSE by ``min(snr, gamma) / snr`` (epsilon) or
``min(snr, gamma) / (snr + 1)`` (v-prediction), snr = abar / (1 - abar), before the batch mean.

Caches (both exact, neither changes results):

- latents: ``out_dir/cache/latents.safetensors`` holds every image's latent (posterior mean, or
  one fixed posterior sample with ``latent_mode="sample"``) times the scaling factor, plus the
  captions; it is reused when its fingerprint (VAE weights, data settings, first and last item)
  matches, else rebuilt. Delete ``cache/`` to force re-encoding.
- text: with ``cache_text`` (default) every unique caption (and "") is encoded once, in memory,
  before training; without it each batch's captions go through the frozen text encoder. Use
  ``cache_text=False`` when captions are too many to hold their (77, D) embeddings in memory.

All randomness (data order aside, see EpochOrder) comes from one CPU generator ``noise``
saved in checkpoints, drawn in a fixed order per micro-batch: dropout mask, timesteps, noise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor
from tqdm.auto import tqdm

from ..checkpoints.errors import CheckpointError
from ..checkpoints.io import write_safetensors
from ..models.clip import CLIPTextModel
from ..models.tokenizer import CLIPTokenizer
from ..models.unet import UNet2DCondition
from ..models.vae import AutoencoderKL
from ..pipeline import Pipeline
from ..schedule import NoiseSchedule, ScheduleConfig
from .build import load_vae, resolve_device, seeded, unet_config
from .config import UNetTrainConfig
from .data import EpochOrder, ImageCaptionSource, load_batch, open_source
from .ema import EMA
from .grid import save_grid
from .loop import TrainResult, TrainTask, run_training
from .optim import autocast, clipped_step, make_adamw, set_lr

_TEXT_CHUNK = 64  # captions per text-encoder call when filling the cache


def build_pipeline(config: UNetTrainConfig) -> Pipeline:
    """The pipeline a run starts from: ``pretrained``, or frozen parts + a fresh UNet."""
    from ..loading import load, load_component

    if config.pretrained:
        return load(config.pretrained, device="cpu", dtype=torch.float32)
    missing = [k for k in ("vae", "text_encoder", "tokenizer") if not getattr(config, k)]
    if missing:
        raise ValueError(
            f"training a UNet from scratch needs trained {', '.join(missing)} (paths in the config), "
            "or set pretrained to a pipeline to fine-tune"
        )
    vae = load_vae(config.vae)  # type: ignore[arg-type]
    text = load_component(config.text_encoder, device="cpu", dtype=torch.float32)  # type: ignore[arg-type]
    if not isinstance(text, CLIPTextModel):
        raise CheckpointError(f"{config.text_encoder} is not a CLIP text encoder")
    tokenizer = CLIPTokenizer.from_folder(config.tokenizer)  # type: ignore[arg-type]
    ucfg = unet_config(config.unet)
    width = text.config.hidden_size
    if any(d != width for d in ucfg.cross_dim_per_level()):
        ucfg = ucfg.replace(cross_attention_dim=width)  # the UNet reads what this text encoder writes
    if ucfg.in_channels != vae.latent_channels or ucfg.out_channels != vae.latent_channels:
        ucfg = ucfg.replace(in_channels=vae.latent_channels, out_channels=vae.latent_channels)
    with seeded(config.seed):
        unet = UNet2DCondition(ucfg)
    return Pipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, schedule=ScheduleConfig())


def drop_captions(captions: list[str], p: float, generator: torch.Generator) -> list[str]:
    """Each caption replaced by "" with probability ``p`` (one uniform draw per caption, always drawn)."""
    drop = (torch.rand(len(captions), generator=generator) < p).tolist()
    return ["" if d else c for c, d in zip(captions, drop)]


def noisy_latents_and_target(x0: Tensor, eps: Tensor, abar: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
    """Forward process and regression target for latents x0 (B, c, h, w), noise eps, abar (B,).

    x_t = sqrt(abar) x0 + sqrt(1 - abar) eps; target eps ("epsilon") or
    v = sqrt(abar) eps - sqrt(1 - abar) x0 ("v_prediction").
    """
    a = abar.reshape(-1, *([1] * (x0.ndim - 1)))  # (B, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    if prediction_type == "epsilon":
        return x_t, eps
    if prediction_type == "v_prediction":
        return x_t, a.sqrt() * eps - (1 - a).sqrt() * x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def min_snr_weights(abar: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-gamma loss weights (B,) for abar (B,): min(snr, gamma) / snr, or / (snr + 1) for v."""
    snr = abar / (1 - abar)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def _state_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class UNetTrainer(TrainTask):
    """The UNet as a :class:`~latentdiff.train.loop.TrainTask`."""

    kind = "unet"
    loss_names = ("loss", "grad_norm")

    def __init__(
        self,
        config: UNetTrainConfig,
        source: ImageCaptionSource | None = None,
        pipeline: Pipeline | None = None,
    ) -> None:
        config.validate()
        self.config = cfg = config
        self.device = resolve_device(cfg.device)
        pipe = pipeline if pipeline is not None else build_pipeline(cfg)
        pipe.schedule = dataclasses.replace(pipe.schedule, prediction_type=cfg.prediction_type)
        pipe.to(self.device, torch.float32)
        self.pipe = pipe
        self.unet: UNet2DCondition = pipe.unet.train().requires_grad_(True)
        self.unet.enable_gradient_checkpointing(cfg.gradient_checkpointing)
        self.vae: AutoencoderKL = pipe.vae.eval().requires_grad_(False)
        self.text_encoder: CLIPTextModel = pipe.text_encoder.eval().requires_grad_(False)
        self.tokenizer = pipe.tokenizer
        self.schedule = NoiseSchedule(pipe.schedule)
        self.source = source if source is not None else open_source(
            cfg.data, cfg.resolution, cfg.world_seed, cfg.world_length
        )

        self.latents, self.captions = self._load_or_encode_latents()  # (N, c, h, w) on the CPU, N captions
        self.prompts = list(cfg.sample_prompts) or self.captions[: cfg.num_sample_images]
        self.text_table: Tensor | None = None
        self.text_index: dict[str, int] = {}
        if cfg.cache_text:
            self._fill_text_cache(sorted(set(self.captions) | {""}))

        self.modules = {"unet": self.unet}
        self.optimizers = {
            "unet": make_adamw(self.unet.parameters(), cfg.lr, (cfg.adam_beta1, cfg.adam_beta2), cfg.weight_decay)
        }
        self.emas = {"unet": EMA(self.unet, cfg.ema_decay, cfg.ema_warmup, cfg.ema_power)} if cfg.ema_decay > 0 else {}
        self.noise = torch.Generator().manual_seed(cfg.seed + 2)
        self.generators = {"noise": self.noise}
        self.order = EpochOrder(len(self.captions), cfg.seed)

    # ------------------------------------------------------------------ caches
    def _fingerprint(self) -> str:
        cfg = self.config
        ends = [self.source[0], self.source[len(self.source) - 1]]
        h = hashlib.sha256()
        h.update(json.dumps({
            "data": cfg.data, "world_seed": cfg.world_seed, "world_length": cfg.world_length,
            "resolution": cfg.resolution, "latent_mode": cfg.latent_mode, "seed": cfg.seed,
            "length": len(self.source), "vae": _state_hash(self.vae), "captions": [c for _, c in ends],
        }, sort_keys=True).encode())
        for image, _ in ends:
            h.update(image.numpy().tobytes())
        return h.hexdigest()

    @torch.no_grad()
    def _load_or_encode_latents(self) -> tuple[Tensor, list[str]]:
        """Latents * scaling_factor of every image, read from the cache file or encoded once."""
        cfg = self.config
        path = Path(cfg.out_dir) / "cache" / "latents.safetensors"
        fingerprint = self._fingerprint()
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("fingerprint") == fingerprint:
                    return f.get_tensor("latents"), json.loads(meta["captions"])
        generator = torch.Generator().manual_seed(cfg.seed + 3)  # "sample" mode's one fixed draw
        chunks, captions = [], []
        n = len(self.source)
        for start in tqdm(range(0, n, cfg.batch_size), desc="encoding latents", leave=False, disable=n < 256):
            images, caps = load_batch(self.source, range(start, min(start + cfg.batch_size, n)))
            posterior = self.vae.encode(images.to(self.device))
            z = posterior.mode() if cfg.latent_mode == "mean" else posterior.sample(generator)
            chunks.append(self.vae.scale_latents(z).float().cpu())  # (b, c, h, w)
            captions.extend(caps)
        # contiguous (NCHW): convolutions may hand back channels-last tensors, and the file round
        # trip would not, which changes GroupNorm's summation order and breaks exact resume.
        latents = torch.cat(chunks).contiguous()
        write_safetensors({"latents": latents}, path,
                          metadata={"fingerprint": fingerprint, "captions": json.dumps(captions)})
        return latents, captions

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        """Frozen text encoder's last hidden state: (B, 77, D), float32 on the training device."""
        ids = self.tokenizer(texts).to(self.device)  # (B, 77)
        return self.text_encoder(ids).float()

    def _fill_text_cache(self, texts: list[str]) -> None:
        parts = [self.encode_text(texts[i : i + _TEXT_CHUNK]) for i in range(0, len(texts), _TEXT_CHUNK)]
        self.text_table = torch.cat(parts)  # (U, 77, D)
        self.text_index = {t: i for i, t in enumerate(texts)}

    def embed(self, texts: list[str]) -> Tensor:
        """Embeddings of ``texts`` (B, 77, D), from the cache when it holds them all."""
        if self.text_table is not None and all(t in self.text_index for t in texts):
            return self.text_table[[self.text_index[t] for t in texts]]
        return self.encode_text(texts)

    # ------------------------------------------------------------------ one step
    def _micro_step(self, indices: list[int], accum: int) -> float:
        cfg, g = self.config, self.noise
        x0 = self.latents[indices].to(self.device).contiguous()  # (B, c, h, w)
        batch = x0.shape[0]
        captions = drop_captions([self.captions[i] for i in indices], cfg.caption_dropout, g)
        t = torch.randint(0, self.schedule.num_train_timesteps, (batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g).to(self.device)
        if cfg.noise_offset > 0:  # drawn only when on: runs without it keep their random stream
            eps = eps + cfg.noise_offset * torch.randn((batch, x0.shape[1], 1, 1), generator=g).to(self.device)
        abar = self.schedule.alphas_cumprod[t].to(self.device)
        x_t, target = noisy_latents_and_target(x0, eps, abar, cfg.prediction_type)
        emb = self.embed(captions)  # (B, 77, D)
        with autocast(self.device, cfg.bf16):
            pred = self.unet(x_t, t.to(self.device), emb)
        if cfg.min_snr_gamma > 0:
            per_sample = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))  # (B,)
            loss = (per_sample * min_snr_weights(abar.float(), cfg.min_snr_gamma, cfg.prediction_type)).mean()
        else:
            loss = F.mse_loss(pred.float(), target)
        (loss / accum).backward()
        return loss.item()

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.config
        lr = cfg.lr_at(step)
        set_lr(self.optimizers["unet"], lr)
        loss = sum(self._micro_step(self.order.next(cfg.batch_size), cfg.grad_accum) for _ in range(cfg.grad_accum))
        grad_norm = float(clipped_step(self.optimizers["unet"], cfg.grad_clip))
        for ema in self.emas.values():
            ema.update(self.unet)
        return {"loss": loss / cfg.grad_accum, "grad_norm": grad_norm, "lr": lr}

    # ------------------------------------------------------------------ previews and export
    @torch.no_grad()
    def generate(self, prompts: list[str]) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] for ``prompts``, with the EMA (else current) UNet.

        The pipeline's own txt2img: image i is seeded with ``sample_seed + i``, DDIM,
        ``sample_steps`` steps, CFG ``guidance_scale``.
        """
        cfg = self.config
        unet = self.inference_model("unet")
        was_training = unet.training
        unet.eval()
        try:
            pipe = dataclasses.replace(self.pipe, unet=unet)
            h, w = self.latents.shape[-2:]
            images = pipe.txt2img(prompts, width=w * pipe.vae_factor, height=h * pipe.vae_factor,
                                  steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale, sampler="ddim",
                                  seed=cfg.sample_seed)
            array = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)
            return array.float() / 127.5 - 1.0
        finally:
            unet.train(was_training)

    def write_samples(self, step: int, path: Path) -> None:
        images = self.generate(self.prompts)
        save_grid(images, path, nrow=len(self.prompts),
                  text={"step": str(step), "prompts": "\n".join(self.prompts)})

    def export(self, folder: Path) -> Path:
        """A diffusers pipeline folder: the trained UNet (EMA weights when EMA is on) + the frozen parts."""
        pipe = dataclasses.replace(self.pipe, unet=self.inference_model("unet"))
        pipe.save(folder)
        return folder


def train_unet(
    config: UNetTrainConfig,
    *,
    source: ImageCaptionSource | None = None,
    pipeline: Pipeline | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train a UNet (or fine-tune ``pretrained``); see :class:`UNetTrainConfig` for every setting.

    ``source`` overrides ``config.data``; ``pipeline`` overrides the models named in the config
    (its UNet is trained in place, its VAE and text encoder stay frozen).
    """
    return run_training(UNetTrainer(config, source=source, pipeline=pipeline), resume=resume, progress=progress)
