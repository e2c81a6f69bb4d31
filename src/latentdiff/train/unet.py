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

- latents: ``out_dir/cache/latents-<key>.npy`` holds every readable image's latent (posterior
  mean, or one fixed posterior sample with ``latent_mode="sample"``) times the scaling factor,
  memory-mapped, keyed by the VAE and the transform (:mod:`latentdiff.train.latent_cache`);
  unreadable images are skipped and counted. Delete ``cache/`` to force re-encoding.
- text: with ``cache_text`` (default) every unique caption (and "") is encoded once, in memory,
  before training; without it each batch's captions go through the frozen text encoder. Use
  ``cache_text=False`` when captions are too many to hold their (77, D) embeddings in memory.

Every random draw of a sample comes from its global index (:mod:`latentdiff.train.draws`, in
the order: caption-dropout uniform, timestep, eps (c, h, w), then the offset (c, 1, 1) when
``noise_offset`` is on), so the same config learns the same model in one process or split over
torchrun ranks (:mod:`latentdiff.train.distributed`), and resume needs no generator state.

:class:`DiffusionTrainer` is the part every denoising-loss trainer shares (pipeline, caches,
per-sample draws, the step); :class:`UNetTrainer` trains the whole UNet, and the LoRA and
embedding trainers (:mod:`latentdiff.train.lora`, :mod:`latentdiff.train.embedding`) train
adapters on the same objective.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..checkpoints.errors import CheckpointError
from ..models.clip import CLIPTextModel
from ..models.tokenizer import CLIPTokenizer
from ..models.unet import UNet2DCondition
from ..models.vae import AutoencoderKL
from ..pipeline import Pipeline
from ..schedule import NoiseSchedule, ScheduleConfig
from .build import load_vae, resolve_device, seeded, unet_config
from .buckets import BucketOrder, bucket_sizes
from .config import TrainConfigError, UNetTrainConfig
from .data import EpochOrder, ImageCaptionSource, TrainDataError, open_source
from .distributed import average_gradients, broadcast_parameters, join_world, training_device
from .draws import DIFFUSION, stacked
from .ema import EMA
from .grid import save_grid
from .latent_cache import LatentCache, cache_key, open_latent_cache
from .loop import TrainResult, TrainTask, run_training
from .optim import autocast, clipped_step, make_adamw

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


def drop_captions(captions: list[str], uniforms: Tensor, p: float) -> list[str]:
    """Caption ``i`` replaced by "" when its uniform draw ``uniforms[i]`` is below ``p``."""
    return ["" if bool(u < p) else c for c, u in zip(captions, uniforms)]


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


@dataclasses.dataclass
class DiffusionDraws:
    """The random draws of a batch of samples for the denoising loss."""

    dropout: Tensor  # (B,) uniforms in [0, 1): caption i is dropped when < caption_dropout
    timesteps: Tensor  # (B,) int64 in [0, T)
    noise: Tensor  # (B, c, h, w), the offset included when noise_offset is on


def diffusion_draws(ids: list[int], seed: int, latent_shape: tuple[int, ...], num_train_timesteps: int,
                    noise_offset: float) -> DiffusionDraws:
    """Each sample's draws from its global index ``ids[i]``: uniform, timestep, eps (c, h, w) and,
    when ``noise_offset`` > 0, ``noise_offset * N(0, 1)`` of shape (c, 1, 1) added to eps."""
    c = latent_shape[0]

    def draw(g: torch.Generator) -> tuple[Tensor, ...]:
        u = torch.rand((), generator=g)
        t = torch.randint(0, num_train_timesteps, (), generator=g)
        eps = torch.randn(latent_shape, generator=g)
        if noise_offset > 0:  # drawn only when on: runs without it keep their numbers
            eps = eps + noise_offset * torch.randn((c, 1, 1), generator=g)
        return u, t, eps

    u, t, eps = stacked(ids, seed, DIFFUSION, draw)
    return DiffusionDraws(u, t, eps)


class DiffusionTrainer(TrainTask):
    """What every trainer on the denoising loss shares: the pipeline (VAE and text encoder frozen),
    the latent and text caches, the data order, per-sample draws and the optimizer step.

    Subclasses say what trains (:meth:`setup_training` fills ``modules``, ``optimizers``, ``emas``)
    and may change how captions become text states (:meth:`condition`).
    """

    loss_names = ("loss", "grad_norm")

    def __init__(self, config: UNetTrainConfig, source: ImageCaptionSource | None = None,
                 pipeline: Pipeline | None = None) -> None:
        config.validate()
        self.config = cfg = config
        self.ranks = join_world(resolve_device(cfg.device))
        self.device = resolve_device(training_device(cfg.device, self.ranks))
        pipe = pipeline if pipeline is not None else self.build_pipeline()
        pipe = self.prepare_pipeline(pipe)
        pipe.to(self.device, torch.float32)
        self.pipe = pipe
        self.unet: UNet2DCondition = pipe.unet.train().requires_grad_(False)
        self.unet.enable_gradient_checkpointing(cfg.gradient_checkpointing)
        self.vae: AutoencoderKL = pipe.vae.eval().requires_grad_(False)
        self.text_encoder: CLIPTextModel = pipe.text_encoder.eval().requires_grad_(False)
        self.tokenizer = pipe.tokenizer
        self.schedule = NoiseSchedule(pipe.schedule)
        self.buckets = self._bucket_sizes() if getattr(cfg, "aspect_buckets", False) else None
        self.source = source if source is not None else open_source(  # raw sizes when bucketing
            cfg.data, None if self.buckets else cfg.resolution, cfg.world_seed, cfg.world_length  # type: ignore[arg-type]
        )
        self.latents = self._open_latents()  # per bucket (N_b, c, h, w), memory-mapped
        self.captions = self.latents.captions
        self.prompts = list(cfg.sample_prompts) or self.captions[: cfg.num_sample_images]
        self.text_table: Tensor | None = None
        self.text_index: dict[str, int] = {}
        self.generators: dict[str, torch.Generator] = {}  # every draw is per sample (draws.py)
        self.order: EpochOrder | BucketOrder = (
            BucketOrder(self.latents.groups(), cfg.batch_size * self.ranks.world_size, cfg.seed)
            if self.buckets else EpochOrder(len(self.captions), cfg.seed)
        )
        self.modules, self.optimizers, self.emas = {}, {}, {}
        self.setup_training()
        broadcast_parameters(self.modules, self.ranks)
        if cfg.cache_text and self.text_is_frozen():
            self._fill_text_cache(sorted(set(self.captions) | {""}))

    # ------------------------------------------------------------------ what subclasses decide
    def build_pipeline(self) -> Pipeline:
        return build_pipeline(self.config)

    def prepare_pipeline(self, pipe: Pipeline) -> Pipeline:
        """The pipeline as trained: its schedule predicts the config's ``prediction_type``."""
        pipe.schedule = dataclasses.replace(pipe.schedule, prediction_type=self.config.prediction_type)
        return pipe

    def setup_training(self) -> None:
        """Make the trained parameters require grad; fill modules, optimizers and emas."""
        raise NotImplementedError

    def text_is_frozen(self) -> bool:
        """Whether a caption's text states never change (then they may be cached)."""
        return True

    def condition(self, captions: list[str]) -> Tensor:
        """Text states (B, 77, D) of ``captions``, with gradients where the text side trains."""
        return self.embed(captions)

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        return [p for opt in self.optimizers.values() for group in opt.param_groups for p in group["params"]]

    # ------------------------------------------------------------------ caches
    def _bucket_sizes(self) -> list[tuple[int, int]]:
        cfg = self.config
        step = cfg.bucket_step or self.pipe.vae_factor * 2 ** (self.unet.config.levels - 1)
        try:
            return bucket_sizes(cfg.resolution, step, cfg.bucket_max_ratio)
        except TrainDataError as err:
            raise TrainConfigError(f"aspect buckets: {err}") from None

    def _open_latents(self) -> LatentCache:
        cfg = self.config
        key = cache_key(self.vae, self.source, {
            "data": cfg.data, "world_seed": cfg.world_seed, "world_length": cfg.world_length,
            "resolution": cfg.resolution, "latent_mode": cfg.latent_mode, "seed": cfg.seed,
            "buckets": self.buckets,
        })
        generator = torch.Generator().manual_seed(cfg.seed + 3)  # "sample" mode's one fixed draw

        def encode(images: Tensor) -> Tensor:
            posterior = self.vae.encode(images.to(self.device))
            z = posterior.mode() if cfg.latent_mode == "mean" else posterior.sample(generator)
            return self.vae.scale_latents(z)

        return open_latent_cache(Path(cfg.out_dir) / "cache", key, self.source, encode,
                                 batch_size=cfg.batch_size, world=self.ranks, buckets=self.buckets)

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
    def captions_of(self, indices: list[int], ids: list[int]) -> list[str]:
        """The captions trained on for data items ``indices`` (samples ``ids``)."""
        return [self.captions[i] for i in indices]

    def _micro_step(self, indices: list[int], ids: list[int], accum: int) -> float:
        cfg = self.config
        x0 = self.latents[indices].to(self.device)  # (B, c, h, w)
        draws = diffusion_draws(ids, cfg.seed, tuple(x0.shape[1:]), self.schedule.num_train_timesteps, cfg.noise_offset)
        captions = drop_captions(self.captions_of(indices, ids), draws.dropout, cfg.caption_dropout)
        t = draws.timesteps
        abar = self.schedule.alphas_cumprod[t].to(self.device)
        x_t, target = noisy_latents_and_target(x0, draws.noise.to(self.device), abar, cfg.prediction_type)
        emb = self.condition(captions)  # (B, 77, D)
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
        for opt in self.optimizers.values():
            for group in opt.param_groups:  # a group may carry its own base rate ("base_lr")
                group["lr"] = cfg.lr_at(step, group.get("base_lr", cfg.lr))
        loss = sum(self._micro_step(b.mine, b.ids, cfg.grad_accum) for b in self.micro_batches(step))
        average_gradients(self.trained_parameters(), self.ranks)
        (opt,) = self.optimizers.values()
        grad_norm = float(clipped_step(opt, cfg.grad_clip))
        for name, ema in self.emas.items():
            ema.update(self.modules[name])
        return {"loss": loss / cfg.grad_accum, "grad_norm": grad_norm, "lr": lr}

    # ------------------------------------------------------------------ previews
    def sampling_unet(self) -> UNet2DCondition:
        """The UNet that sample grids run (EMA weights when there are)."""
        return self.inference_model("unet") if "unet" in self.modules else self.unet

    def sampling_pipeline(self) -> Pipeline:
        return dataclasses.replace(self.pipe, unet=self.sampling_unet())

    @torch.no_grad()
    def generate(self, prompts: list[str]) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] for ``prompts`` from :meth:`sampling_pipeline`.

        The pipeline's own txt2img: image i is seeded with ``sample_seed + i``, DDIM,
        ``sample_steps`` steps, CFG ``guidance_scale``.
        """
        cfg = self.config
        pipe = self.sampling_pipeline()
        unet = pipe.unet
        was_training = unet.training
        unet.eval()
        try:
            h, w = self.latents.latent_size
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


class UNetTrainer(DiffusionTrainer):
    """The whole UNet trained (from scratch or fine-tuned) as a :class:`~latentdiff.train.loop.TrainTask`."""

    kind = "unet"

    def setup_training(self) -> None:
        cfg = self.config
        self.unet.requires_grad_(True)
        self.modules = {"unet": self.unet}
        self.optimizers = {
            "unet": make_adamw(self.unet.parameters(), cfg.lr, (cfg.adam_beta1, cfg.adam_beta2), cfg.weight_decay)
        }
        self.emas = {"unet": EMA(self.unet, cfg.ema_decay, cfg.ema_warmup, cfg.ema_power)} if cfg.ema_decay > 0 else {}

    def export(self, folder: Path) -> Path:
        """A diffusers pipeline folder: the trained UNet (EMA weights when EMA is on) + the frozen parts."""
        self.sampling_pipeline().save(folder)
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
