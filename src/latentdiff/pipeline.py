"""The Stable Diffusion pipeline: the three networks, the tokenizer and the noise schedule.

``Pipeline`` owns the components and the operations on them: encode a prompt,
generate (txt2img, img2img, inpaint: thin methods over :mod:`latentdiff.generate`,
where the three share one denoising loop), save.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from PIL import Image

from . import generate
from .checkpoints import single_file
from .checkpoints.diffusers_folder import DIFFUSERS_VERSION, KINDS, save_component
from .checkpoints.io import write_safetensors
from .models.clip import CLIPTextModel
from .models.tokenizer import CLIPTokenizer
from .models.unet import UNet2DCondition
from .models.vae import AutoencoderKL
from .prompts import encode_chunks, tokenize_weighted
from .schedule import ScheduleConfig


@dataclass
class Pipeline:
    """A loaded Stable Diffusion model (see :func:`latentdiff.load`)."""

    unet: UNet2DCondition
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    name: str = ""

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell along each side (8 for SD 1.x), from the VAE's config."""
        return self.vae.downsample_factor

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Pipeline:
        """Move (and cast) all three networks in place; returns self."""
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def encode_prompt(self, prompts: str | list[str], clip_skip: int = 1, min_chunks: int = 1) -> Tensor:
        """Text embeddings for the UNet: the text encoder's last hidden state, (B, 77 * chunks, D).

        Prompt weighting (``(word:1.2)``, ``(word)``, ``[word]``) and prompts over 75
        tokens (75-token chunks, concatenated) follow AUTOMATIC1111; a plain prompt
        that fits gives exactly the plain tokenizer + text encoder result, (B, 77, D).
        ``clip_skip`` 2 takes the penultimate layer (A1111's "Clip skip").
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        chunks = tokenize_weighted(self.tokenizer, prompts, min_chunks=min_chunks)
        device = next(self.text_encoder.parameters()).device

        def encode(ids: Tensor) -> Tensor:
            return self.text_encoder(ids.to(device), skip_last_layers=clip_skip - 1)

        return encode_chunks(encode, chunks)

    @property
    def native_size(self) -> int:
        """The image side the model was trained at: UNet sample size x VAE factor (512 for SD 1.x)."""
        return self.unet.config.sample_size * self.vae_factor

    def _settings(self, prompts, negative_prompt, width, height, steps, guidance_scale, sampler, seed,
                  images_per_prompt, eta, clip_skip, strength=None) -> generate.Settings:
        return generate.make_settings(
            self, prompts, negative_prompt, width or self.native_size, height or self.native_size, steps,
            guidance_scale, sampler, seed, images_per_prompt, eta, clip_skip, strength,
        )

    def txt2img(
        self,
        prompts: str | list[str],
        negative_prompt: str | list[str] = "",
        width: int | None = None,
        height: int | None = None,
        steps: int = 20,
        guidance_scale: float = 7.5,
        sampler: str = "ddim",
        seed: int = 0,
        images_per_prompt: int = 1,
        eta: float = 0.0,
        clip_skip: int = 1,
        callback: generate.StepCallback | None = None,
        vae_tiling: bool = False,
    ) -> list[Image.Image]:
        """Text to image. Image i uses seed + i. Size defaults to the model's native size.

        ``callback(step, total, x0_pred)`` runs after every step; returning True cancels
        (raises :class:`latentdiff.samplers.SamplingCancelled`). Guidance <= 1 skips the
        unconditional pass.
        """
        settings = self._settings(prompts, negative_prompt, width, height, steps, guidance_scale, sampler, seed,
                                  images_per_prompt, eta, clip_skip)
        return generate.txt2img(self, settings, callback, vae_tiling)

    def img2img(
        self,
        prompts: str | list[str],
        image: Image.Image,
        strength: float = 0.75,
        negative_prompt: str | list[str] = "",
        width: int | None = None,
        height: int | None = None,
        steps: int = 20,
        guidance_scale: float = 7.5,
        sampler: str = "ddim",
        seed: int = 0,
        images_per_prompt: int = 1,
        eta: float = 0.0,
        clip_skip: int = 1,
        callback: generate.StepCallback | None = None,
        vae_tiling: bool = False,
    ) -> list[Image.Image]:
        """SDEdit: encode ``image``, noise it to ``strength``, run the last int(steps x strength) steps.

        Size defaults to the image's own (which must then be a multiple of the VAE factor).
        """
        settings = self._settings(prompts, negative_prompt, width or image.width, height or image.height, steps,
                                  guidance_scale, sampler, seed, images_per_prompt, eta, clip_skip, strength)
        return generate.img2img(self, settings, image, callback, vae_tiling)

    def inpaint(
        self,
        prompts: str | list[str],
        image: Image.Image,
        mask: Image.Image,
        strength: float = 1.0,
        negative_prompt: str | list[str] = "",
        width: int | None = None,
        height: int | None = None,
        steps: int = 20,
        guidance_scale: float = 7.5,
        sampler: str = "ddim",
        seed: int = 0,
        images_per_prompt: int = 1,
        eta: float = 0.0,
        clip_skip: int = 1,
        callback: generate.StepCallback | None = None,
        vae_tiling: bool = False,
        paste_back: bool = True,
    ) -> list[Image.Image]:
        """Repaint the white pixels of ``mask``, keep the black ones.

        A 9-channel inpainting UNet gets mask + masked-image latents as extra input; a
        4-channel one uses blended latent diffusion. With ``paste_back`` the kept pixels
        come back exactly as they were in ``image``.
        """
        settings = self._settings(prompts, negative_prompt, width or image.width, height or image.height, steps,
                                  guidance_scale, sampler, seed, images_per_prompt, eta, clip_skip, strength)
        return generate.inpaint(self, settings, image, mask, callback, vae_tiling, paste_back)

    def save(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        """Save as a diffusers folder (loadable by ``diffusers.StableDiffusionPipeline``),
        or as one original-layout ``.safetensors`` file when ``path`` ends in ``.safetensors``
        (a single file holds no tokenizer or scheduler config, as in the original format).
        """
        path = Path(path)
        if path.suffix.lower() == ".safetensors":
            merged = single_file.merge_to_single_file(
                self.unet.state_dict(), self.vae.state_dict(), self.text_encoder.state_dict(),
                self.unet.config, self.vae.config,
            )
            if dtype is not None:
                merged = {k: v.to(dtype) if v.is_floating_point() else v for k, v in merged.items()}
            write_safetensors(merged, path)
            return
        if path.suffix.lower() in (".ckpt", ".bin", ".pt", ".pth"):
            raise ValueError(f"{path.name}: latentdiff writes safetensors only (a folder or a .safetensors file)")
        path.mkdir(parents=True, exist_ok=True)
        for name in KINDS:
            save_component(getattr(self, name), path / name, name, dtype)
        self.tokenizer.save(path / "tokenizer")
        (path / "scheduler").mkdir(exist_ok=True)
        scheduler = self.schedule.to_dict()
        scheduler["_diffusers_version"] = DIFFUSERS_VERSION
        (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
        index = {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": DIFFUSERS_VERSION,
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", scheduler.get("_class_name", "DDIMScheduler")],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
        (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
