"""Typed training configs, one dataclass per trainer, loadable from JSON or TOML.

    cfg = UNetTrainConfig.from_file("unet.toml")        # or .json
    cfg = cfg.replace(max_steps=200, out_dir="runs/x")

A config file is one flat table whose keys are the field names below; an
unknown key is an error that names it (a typo never silently falls back to a
default). Defaults are sized for a laptop CPU and the tiny presets.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

from .optim import scheduled_lr

C = TypeVar("C", bound="TrainConfig")


class TrainConfigError(ValueError):
    """A training config that cannot be used, with the reason."""


@dataclasses.dataclass
class TrainConfig:
    """Fields every trainer shares: data, optimisation, EMA, bookkeeping."""

    # ---- where ----
    out_dir: str = "runs/train"  # checkpoint.pt, log.csv, samples/, the exported model
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", or "auto" (CUDA when available)
    # ---- data ----
    data: str = "world"  # "world" (the built-in Shapes World) or a folder of images + captions
    world_seed: int = 0
    world_length: int = 2048
    resolution: int = 64  # folder images are resized (shorter side) and centre-cropped to this
    # ---- optimisation ----
    seed: int = 0  # data order, noise and every other random draw derive from it
    max_steps: int = 1000  # optimizer steps (the run stops when the step counter reaches it)
    batch_size: int = 8  # per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4
    warmup_steps: int = 100  # linear warm-up of the learning rate
    # > 0: after warm-up, cosine decay from lr to min_lr_ratio * lr at this step (constant after); 0: constant lr
    decay_steps: int = 0
    min_lr_ratio: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    bf16: bool = False  # bf16 autocast of the forward pass (weights and optimizer stay float32)
    gradient_checkpointing: bool = False
    # ---- EMA of the trained weights ----
    ema_decay: float = 0.0  # 0 disables EMA
    ema_warmup: bool = True  # decay_t = min(decay, 1 - (1 + t) ** -ema_power)
    ema_power: float = 2 / 3
    # ---- bookkeeping ----
    log_every: int = 1  # rows of log.csv
    sample_every: int = 250  # sample grids; 0 disables (a final grid is always written)
    checkpoint_every: int = 250  # checkpoint.pt; a final checkpoint is always written
    export: bool = True  # write the finished model in the diffusers layout under out_dir

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise TrainConfigError for values no trainer can run with."""
        positive = ("world_length", "resolution", "max_steps", "batch_size", "grad_accum", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise TrainConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "sample_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise TrainConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise TrainConfigError(f"lr must be positive, got {self.lr}")
        if self.decay_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise TrainConfigError(
                f"decay_steps must be >= 0 and min_lr_ratio in [0, 1], got {self.decay_steps} and {self.min_lr_ratio}"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise TrainConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.grad_clip < 0:
            raise TrainConfigError(f"grad_clip must be >= 0, got {self.grad_clip}")

    def lr_at(self, step: int, base_lr: float | None = None) -> float:
        """The learning rate of optimizer step ``step`` (:func:`~latentdiff.train.optim.scheduled_lr`) for
        ``base_lr`` (default ``lr``) under this config's warm-up and decay."""
        lr = self.lr if base_lr is None else base_lr
        return scheduled_lr(step, lr, self.warmup_steps, self.decay_steps, self.min_lr_ratio)

    # ------------------------------------------------------------------ files
    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build from a flat mapping of field names; unknown keys raise TrainConfigError."""
        hints = get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise TrainConfigError(
                f"unknown {cls.__name__} key(s): {', '.join(unknown)}; known keys: {', '.join(names)}"
            )
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            kwargs[key] = _coerce(key, value, hints[key])
        config = cls(**kwargs)
        config.validate()
        return config

    @classmethod
    def from_file(cls: type[C], path: str | Path) -> C:
        """Read a ``.toml`` or ``.json`` file (a ``[train]`` table in TOML is accepted too)."""
        path = Path(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise TrainConfigError(f"no such config file: {path}") from None
        try:
            if path.suffix.lower() == ".toml":
                data = tomllib.loads(raw.decode("utf-8"))
                if set(data) == {"train"} and isinstance(data["train"], dict):
                    data = data["train"]
            elif path.suffix.lower() == ".json":
                data = json.loads(raw.decode("utf-8"))
            else:
                raise TrainConfigError(f"{path.name}: config files are .toml or .json")
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise TrainConfigError(f"cannot parse {path}: {err}") from None
        if not isinstance(data, dict):
            raise TrainConfigError(f"{path} does not hold a table of settings")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (written into every run folder as ``config.json``)."""
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    def replace(self: C, **changes: Any) -> C:
        """A validated copy with some fields changed."""
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check a file value against the field's type (ints are accepted for floats); raise naming the key."""
    args = typing.get_args(hint)
    if type(None) in args:  # Optional[X]
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if value is None:
        raise TrainConfigError(f"{key} may not be null")
    if hint is bool:
        if not isinstance(value, bool):
            raise TrainConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TrainConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TrainConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TrainConfigError(f"{key} must be a string, got {value!r}")
        return value
    if typing.get_origin(hint) is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TrainConfigError(f"{key} must be a list of strings, got {value!r}")
        return list(value)
    raise TypeError(f"config field {key} has a type this loader does not handle: {hint}")


@dataclasses.dataclass
class VAETrainConfig(TrainConfig):
    """Autoencoder training: L1 + KL + patch-GAN (+ LPIPS when VGG weights are given).

    Loss, as in LDM's ``LPIPSWithDiscriminator`` (per-sample sums, batch mean)::

        rec = sum max(|x - x_hat| - l1_tolerance, 0) + perceptual_weight * LPIPS(x, x_hat) * pixels
        loss_G = rec + kl_weight * KL + adaptive_w * disc_weight * disc_factor * (-D(x_hat))
        loss_D = disc_factor * hinge(D(x), D(x_hat))

    ``disc_factor`` is 0 before ``disc_start`` optimizer steps, 1 after.
    """

    out_dir: str = "runs/vae"
    model: str = "tiny"  # VAE preset ("tiny", "sd15") or a VAE config.json; ignored when pretrained is set
    pretrained: str | None = None  # fine-tune: a VAE component folder/file, or a pipeline folder (its vae/)
    lr: float = 1e-4
    adam_beta1: float = 0.5  # LDM's autoencoder betas
    adam_beta2: float = 0.9
    weight_decay: float = 0.0
    warmup_steps: int = 0
    kl_weight: float = 1e-6
    # errors up to this (pixels in [-1, 1]) cost nothing: the L1 term's gradient goes to the pixels still
    # visibly wrong (a flat-coloured world's edges) instead of flat areas already within a few levels
    l1_tolerance: float = 0.0
    sample_posterior: bool = True  # decode a posterior sample (LDM) rather than its mean
    init_logvar: float | None = -7.0  # a fresh encoder starts with posterior log-variance this (None: random)
    train_decoder_only: bool = False  # fine-tune the decoder of `pretrained` only, as SD's ft-MSE VAE did
    disc_start: int = 500  # optimizer steps before the discriminator loss switches on
    disc_weight: float = 0.5
    disc_layers: int = 3  # PatchGAN depth; input side must be >= 2 ** (disc_layers + 2)
    disc_channels: int = 64
    disc_lr: float | None = None  # default: lr
    perceptual_weight: float = 0.0  # LPIPS weight; > 0 needs lpips_vgg and lpips_lin
    lpips_vgg: str | None = None  # torchvision VGG16 state dict (features.* keys)
    lpips_lin: str | None = None  # lpips package's vgg.pth (lin0..lin4 heads)
    num_sample_images: int = 8  # originals | reconstructions grid
    # ---- regularisation: "kl" (SD's) or "vq" (a VQ-GAN: codebook in the decoder, see train/codebook.py) ----
    regularization: str = "kl"
    num_codes: int = 8192  # codebook size
    code_dim: int | None = None  # codebook vectors' width (the latents a UNet sees); default latent_channels
    commitment_weight: float = 0.25  # beta
    codebook_update: str = "loss"  # "loss" (gradient of the codebook term) or "ema" (running means)
    codebook_ema_decay: float = 0.99
    dead_code_steps: int = 0  # > 0: restart a code no latent picked for this many steps; 0: never

    def validate(self) -> None:
        super().validate()
        if self.regularization not in ("kl", "vq"):
            raise TrainConfigError(f"regularization must be 'kl' or 'vq', got {self.regularization!r}")
        if self.num_codes < 1 or (self.code_dim is not None and self.code_dim < 1) or self.dead_code_steps < 0:
            raise TrainConfigError(f"num_codes and code_dim must be >= 1 and dead_code_steps >= 0, got {self.num_codes}, "
                                   f"{self.code_dim} and {self.dead_code_steps}")
        if self.codebook_update not in ("loss", "ema") or not 0 < self.codebook_ema_decay < 1 or self.commitment_weight < 0:
            raise TrainConfigError("codebook_update must be 'loss' or 'ema', codebook_ema_decay in (0, 1) and "
                                   f"commitment_weight >= 0, got {self.codebook_update!r}, {self.codebook_ema_decay} "
                                   f"and {self.commitment_weight}")
        if self.kl_weight < 0 or self.disc_weight < 0 or self.perceptual_weight < 0 or self.l1_tolerance < 0:
            raise TrainConfigError("kl_weight, disc_weight, perceptual_weight and l1_tolerance must be >= 0")
        if self.disc_layers < 1:
            raise TrainConfigError(f"disc_layers must be >= 1, got {self.disc_layers}")
        if self.perceptual_weight > 0 and not (self.lpips_vgg and self.lpips_lin):
            raise TrainConfigError(
                "perceptual_weight > 0 needs LPIPS weights: set lpips_vgg (a torchvision VGG16 state dict) "
                "and lpips_lin (the lpips package's vgg.pth); latentdiff ships neither, so LPIPS is off by default"
            )


@dataclasses.dataclass
class UNetTrainConfig(TrainConfig):
    """Latent diffusion training of the UNet with a frozen VAE and text encoder.

    Models: either ``pretrained`` (a pipeline, fine-tuned with the same loop), or
    ``vae`` + ``text_encoder`` + ``tokenizer`` (frozen components) with a fresh UNet
    built from ``unet`` (preset or config.json; its cross_attention_dim must equal the
    text encoder's width).
    """

    out_dir: str = "runs/unet"
    pretrained: str | None = None  # a pipeline folder or single file (latentdiff.load)
    unet: str = "tiny"  # UNet preset ("tiny", "sd15") or a UNet config.json; ignored when pretrained is set
    vae: str | None = None  # VAE component folder/file
    text_encoder: str | None = None  # text encoder component folder
    tokenizer: str | None = None  # tokenizer folder
    prediction_type: str = "epsilon"  # or "v_prediction"; also written into the exported scheduler config
    caption_dropout: float = 0.1  # probability that a caption is replaced by "" (classifier-free guidance)
    min_snr_gamma: float = 0.0  # > 0: Min-SNR-gamma loss weighting (Hang et al. 2023; 5 is the paper's); 0: off
    noise_offset: float = 0.0  # > 0: add noise_offset * N(0, 1) per sample and channel to eps (darker darks)
    latent_mode: str = "mean"  # "mean" (posterior mode) or "sample" (one fixed draw per image)
    cache_text: bool = True  # True: encode each unique caption once; False: encode every batch
    # aspect-ratio buckets: images keep their shape (area <= resolution ** 2, sides multiples of
    # bucket_step, 0: the VAE factor x the UNet's downsampling) instead of a square centre crop
    aspect_buckets: bool = False
    bucket_step: int = 0
    bucket_max_ratio: float = 2.0
    ema_decay: float = 0.999
    sample_prompts: list[str] = dataclasses.field(default_factory=list)  # default: the first data captions
    num_sample_images: int = 4
    sample_steps: int = 20  # DDIM steps of the sample grids
    guidance_scale: float = 3.0
    sample_seed: int = 0

    def validate(self) -> None:
        super().validate()
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise TrainConfigError(f"prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}")
        if self.latent_mode not in ("mean", "sample"):
            raise TrainConfigError(f"latent_mode must be 'mean' or 'sample', got {self.latent_mode!r}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise TrainConfigError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if self.min_snr_gamma < 0 or self.noise_offset < 0:
            raise TrainConfigError(f"min_snr_gamma and noise_offset must be >= 0, got {self.min_snr_gamma} and "
                                   f"{self.noise_offset}")
        if self.sample_steps < 1:
            raise TrainConfigError(f"sample_steps must be >= 1, got {self.sample_steps}")
        if self.bucket_step < 0 or self.bucket_step > self.resolution or self.bucket_max_ratio < 1:
            raise TrainConfigError(f"bucket_step must be in [0, resolution] and bucket_max_ratio >= 1, got "
                                   f"{self.bucket_step} and {self.bucket_max_ratio}")
