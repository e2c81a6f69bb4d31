"""LoRA training on any pipeline: the UNet's attention (optionally its convolutions, LoCon) and
optionally the text encoder, on the UNet trainer's denoising loss.

    from latentdiff.train import LoRATrainConfig, train_lora
    result = train_lora(LoRATrainConfig(pretrained="my-sd15", data="photos/", rank=8, alpha=8))
    pipe.load_lora(result.exported)          # or diffusers' load_lora_weights, or A1111's Lora folder

The base networks stay frozen; each targeted Linear / Conv2d gets ``W + (alpha / rank) up @ down``
(:mod:`latentdiff.train.lora_layers`, ``up`` zero-initialised, so step 0 is the base model):

- UNet: ``targets`` (default the attention projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0``);
  ``locon`` adds every 3x3 / 1x1 convolution of the ResNets, down- and upsamplers
  (``conv1``, ``conv2``, ``conv_shortcut``, ``conv``) at ``conv_rank`` / ``conv_alpha``.
- text encoder (``train_text_encoder``): ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, ``fc1``,
  ``fc2`` of every layer, at ``text_encoder_lr`` (default ``lr``); captions are then encoded on
  every step (no text cache), with gradients into those adapters.

Export: ``out_dir/<output_name>.safetensors`` in kohya's format (``lora_unet_<layer>`` /
``lora_te_<layer>``, ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``) with kohya's ``ss_*``
metadata (network module, dim, alpha, args, learning rates, steps, resolution, seed, images),
which latentdiff, diffusers' ``load_lora_weights`` and A1111 read.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import torch
from torch import Tensor

from ..checkpoints.io import write_safetensors
from ..pipeline import Pipeline
from .build import base_pipeline
from .config import TrainConfigError, UNetTrainConfig
from .data import ImageCaptionSource
from .lora_layers import LoRANetwork, merge_into
from .loop import TrainResult, run_training
from .optim import make_adamw
from .unet import DiffusionTrainer

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
CONV_TARGETS = ("conv1", "conv2", "conv_shortcut", "conv")  # ResNets, downsamplers.0.conv, upsamplers.0.conv
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclasses.dataclass
class LoRATrainConfig(UNetTrainConfig):
    """A LoRA of a pipeline (see the module docstring); the UNet trainer's data, loss and sampling options apply."""

    out_dir: str = "runs/lora"
    output_name: str = "lora"  # the file is out_dir/<output_name>.safetensors
    rank: int = 8
    alpha: float = 8.0  # the update is scaled by alpha / rank
    targets: list[str] = dataclasses.field(default_factory=lambda: list(ATTENTION_TARGETS))  # UNet module-name suffixes
    locon: bool = False  # also adapt the UNet's convolutions (LoCon)
    conv_rank: int = 0  # LoCon rank (0: rank)
    conv_alpha: float = 0.0  # LoCon alpha (0: alpha)
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None  # default: lr
    lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    ema_decay: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.rank < 1 or self.conv_rank < 0:
            raise TrainConfigError(f"rank must be >= 1 and conv_rank >= 0, got {self.rank} and {self.conv_rank}")
        if not self.alpha > 0 or self.conv_alpha < 0:
            raise TrainConfigError(f"alpha must be positive and conv_alpha >= 0, got {self.alpha} and {self.conv_alpha}")
        if not self.targets:
            raise TrainConfigError("targets must name at least one UNet module (e.g. 'to_q')")
        if self.text_encoder_lr is not None and not self.text_encoder_lr > 0:
            raise TrainConfigError(f"text_encoder_lr must be positive, got {self.text_encoder_lr}")
        if not self.output_name or any(c in self.output_name for c in "/\\:"):
            raise TrainConfigError(f"output_name must be a plain file name, got {self.output_name!r}")


class LoRATrainer(DiffusionTrainer):
    """LoRA training as a :class:`~latentdiff.train.loop.TrainTask`."""

    kind = "lora"

    def build_pipeline(self) -> Pipeline:
        return base_pipeline(self.config.pretrained)

    def setup_training(self) -> None:
        cfg: LoRATrainConfig = self.config  # type: ignore[assignment]
        self.networks: dict[str, LoRANetwork] = {}
        try:
            self.networks["unet"] = LoRANetwork(self.unet, cfg.rank, cfg.alpha, cfg.targets, seed=cfg.seed + 4)
            if cfg.locon:
                self.networks["unet_conv"] = LoRANetwork(
                    self.unet, cfg.conv_rank or cfg.rank, cfg.conv_alpha or cfg.alpha, CONV_TARGETS, seed=cfg.seed + 5
                )
            if cfg.train_text_encoder:
                self.networks["text_encoder"] = LoRANetwork(self.text_encoder, cfg.rank, cfg.alpha, TEXT_TARGETS,
                                                            seed=cfg.seed + 6)
        except ValueError as err:
            raise TrainConfigError(f"LoRA targets: {err}") from None
        overlap = set(self.networks["unet"].module_names.values()) & set(
            self.networks["unet_conv"].module_names.values() if cfg.locon else ())
        if overlap:
            raise TrainConfigError(f"targets and LoCon both adapt {sorted(overlap)[0]}: drop it from targets")
        for name, net in self.networks.items():
            net.attach(self.text_encoder if name == "text_encoder" else self.unet)
        unet_params = [p for n, net in self.networks.items() if n != "text_encoder" for p in net.parameters()]
        optimizer = make_adamw(unet_params, cfg.lr, (cfg.adam_beta1, cfg.adam_beta2), cfg.weight_decay)
        optimizer.param_groups[0]["base_lr"] = cfg.lr
        if cfg.train_text_encoder:
            te_lr = cfg.text_encoder_lr or cfg.lr
            optimizer.add_param_group({"params": list(self.networks["text_encoder"].parameters()),
                                       "lr": te_lr, "base_lr": te_lr})
        self.modules = dict(self.networks)
        self.optimizers = {"lora": optimizer}
        self._merged: dict[str, torch.nn.Module] = {}
        self.started = time.time()

    def text_is_frozen(self) -> bool:
        return not self.config.train_text_encoder  # type: ignore[attr-defined]

    def condition(self, captions: list[str]) -> Tensor:
        if "text_encoder" not in self.networks:
            return self.embed(captions)
        ids = self.tokenizer(captions).to(self.device)  # (B, 77)
        return self.text_encoder(ids).float()  # with gradients into the text encoder's adapters

    # ------------------------------------------------------------------ previews and export
    def merged(self, which: str) -> torch.nn.Module:
        """A hook-free copy of the UNet or the text encoder (``which``) with its current LoRA(s)
        merged in (one copy, refreshed on each call)."""
        base = self.text_encoder if which == "text_encoder" else self.unet
        copied = self._merged.get(which)
        if copied is None:
            copied = copy.deepcopy(base).requires_grad_(False)
            for net in self.networks.values():
                net.detach_from(copied)
            self._merged[which] = copied
        else:
            with torch.no_grad():
                for p, q in zip(base.parameters(), copied.parameters()):
                    q.copy_(p)
        for name, net in self.networks.items():
            if (name == "text_encoder") == (which == "text_encoder"):
                merge_into(copied, net)
        return copied.eval()

    def sampling_pipeline(self) -> Pipeline:
        changes: dict[str, torch.nn.Module] = {"unet": self.merged("unet")}
        if "text_encoder" in self.networks:
            changes["text_encoder"] = self.merged("text_encoder")
        return dataclasses.replace(self.pipe, **changes)

    @property
    def export_name(self) -> str:
        return self.config.output_name + ".safetensors"  # type: ignore[attr-defined]

    def lora_state_dict(self) -> dict[str, Tensor]:
        """Every adapter in kohya's format (``lora_unet_*``, ``lora_te_*``)."""
        out: dict[str, Tensor] = {}
        for name, net in self.networks.items():
            out.update(net.kohya_state_dict("lora_te_" if name == "text_encoder" else "lora_unet_"))
        return out

    def metadata(self) -> dict[str, str]:
        """kohya's ``ss_*`` training metadata (strings, as sd-scripts writes them)."""
        cfg: LoRATrainConfig = self.config  # type: ignore[assignment]
        args = {"conv_dim": str(cfg.conv_rank or cfg.rank), "conv_alpha": str(cfg.conv_alpha or cfg.alpha)} if cfg.locon else {}
        step = self.optimizers["lora"].state
        steps = max((int(s["step"]) for s in step.values() if "step" in s), default=0)
        return {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(cfg.rank),
            "ss_network_alpha": str(cfg.alpha),
            "ss_network_args": json.dumps(args) if args else "null",
            "ss_output_name": cfg.output_name,
            "ss_sd_model_name": Path(cfg.pretrained).name if cfg.pretrained else "latentdiff-builtin",
            "ss_v2": "False",
            "ss_base_model_version": "sd_v1",
            "ss_training_started_at": str(self.started),
            "ss_training_finished_at": str(time.time()),
            "ss_steps": str(steps),
            "ss_max_train_steps": str(cfg.max_steps),
            "ss_learning_rate": str(cfg.lr),
            "ss_unet_lr": str(cfg.lr),
            "ss_text_encoder_lr": str(cfg.text_encoder_lr or cfg.lr) if cfg.train_text_encoder else "0",
            "ss_network_train_unet_only": str(not cfg.train_text_encoder),
            "ss_resolution": json.dumps([cfg.resolution, cfg.resolution]),
            "ss_seed": str(cfg.seed),
            "ss_num_train_images": str(len(self.captions)),
            "ss_batch_size_per_device": str(cfg.batch_size),
            "ss_gradient_accumulation_steps": str(cfg.grad_accum),
            "ss_caption_dropout_rate": str(cfg.caption_dropout),
            "ss_noise_offset": str(cfg.noise_offset),
            "ss_min_snr_gamma": str(cfg.min_snr_gamma),
            "ss_v_parameterization": str(cfg.prediction_type == "v_prediction"),
            "ss_mixed_precision": "bf16" if cfg.bf16 else "no",
            "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
        }

    def export(self, folder: Path) -> Path:
        """The LoRA as one kohya-format safetensors file at ``folder`` (a file path)."""
        write_safetensors(self.lora_state_dict(), folder, metadata=self.metadata())
        return folder


def train_lora(
    config: LoRATrainConfig,
    *,
    source: ImageCaptionSource | None = None,
    pipeline: Pipeline | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train a LoRA of ``config.pretrained`` (default the built-in model); ``result.exported`` is the file.

    ``source`` overrides ``config.data``; ``pipeline`` overrides the base model (it gets LoRA hooks
    and stays frozen).
    """
    return run_training(LoRATrainer(config, source=source, pipeline=pipeline), resume=resume, progress=progress)
