"""The Stable Diffusion pipeline: the three networks, the tokenizer and the noise schedule.

``Pipeline`` owns the components and the operations on them: encode a prompt,
generate (txt2img, img2img, inpaint: thin methods over :mod:`latentdiff.generate`,
where the three share one denoising loop), save.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from PIL import Image

from . import generate
from .adapters.lora import LoraState
from .checkpoints import single_file
from .checkpoints.diffusers_folder import KINDS, save_component, save_pipeline_folder
from .checkpoints.io import write_safetensors
from .errors import BadArgument
from .models.clip import CLIPTextModel
from .models.tokenizer import CLIPTokenizer
from .models.unet import UNet2DCondition
from .models.taesd import TinyAutoencoder
from .models.vae import AutoencoderKL
from .models.vq import VQModel
from .prompts import encode_chunks, tokenize_weighted
from .settings import GenerationOptions, Settings, resolve
from .schedule import ScheduleConfig


_OPTION_FIELDS = {f.name for f in dataclasses.fields(GenerationOptions)}
#: the subfolder of a pipeline folder holding its preview decoder (an ``AutoencoderTiny``)
PREVIEW_FOLDER = "taesd"


@dataclass
class Pipeline:
    """A loaded Stable Diffusion model (see :func:`latentdiff.load`)."""

    unet: UNet2DCondition
    vae: AutoencoderKL | TinyAutoencoder | VQModel  # TAESD (``latentdiff.load(..., vae=taesd)``) or a VQ-GAN
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    name: str = ""
    #: memory budget of a generation (bytes or "6G"; None: LATENTDIFF_MEMORY_BUDGET or 80% of free memory)
    memory_budget: int | str | None = None
    #: LoRAs merged into the weights, and the original tensors they replaced (see load_lora)
    lora_state: LoraState = field(default_factory=LoraState, init=False, repr=False, compare=False)
    #: how the networks' dtype was chosen ("bfloat16 (the CPU runs it natively: AVX512-BF16)", ...)
    dtype_reason: str = field(default="", compare=False)
    #: folders searched for the LoRAs a prompt tags as ``<lora:NAME:WEIGHT>`` (subfolders too)
    lora_dirs: list[Path] = field(default_factory=list)
    #: held by every generation and by load_lora / unload_lora: one call at a time changes or reads the weights
    generation_lock: threading.RLock = field(default_factory=threading.RLock, init=False, repr=False, compare=False)
    #: textual-inversion embeddings by trigger name: vectors (n, D) (see load_textual_inversion)
    embeddings: dict[str, Tensor] = field(default_factory=dict, repr=False)
    #: the file each embedding was read from (for A1111's "TI hashes")
    embedding_files: dict[str, Path] = field(default_factory=dict, repr=False)
    #: the decoder of step previews (:meth:`preview`): a tiny autoencoder, or None to use ``vae``
    preview_vae: TinyAutoencoder | None = field(default=None, repr=False)

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
        """Move (and cast) all three networks (and the preview decoder) in place; returns self."""
        for module in (self.unet, self.vae, self.text_encoder, self.preview_vae):
            if module is not None:
                module.to(device=device, dtype=dtype)
        return self

    def preview(self, x0_latents: Tensor) -> list[Image.Image]:
        """Quick RGB previews of a step callback's x0 prediction (scaled latents (B, c, h, w)),
        decoded by ``preview_vae`` (a few milliseconds) or, without one, by the VAE."""
        from .models.taesd import preview

        return preview(self.preview_vae if self.preview_vae is not None else self.vae, x0_latents)

    @torch.no_grad()
    def encode_prompt(self, prompts: str | list[str], clip_skip: int = 1, min_chunks: int = 1) -> Tensor:
        """Text embeddings for the UNet: the text encoder's last hidden state, (B, 77 * chunks, D).

        Prompt weighting (``(word:1.2)``, ``(word)``, ``[word]``) and prompts over 75
        tokens (75-token chunks, concatenated) follow AUTOMATIC1111; a plain prompt
        that fits gives exactly the plain tokenizer + text encoder result, (B, 77, D).
        ``clip_skip`` 2 takes the penultimate layer (A1111's "Clip skip").
        """
        return self.text_states(prompts, clip_skip=clip_skip, min_chunks=min_chunks)

    def text_states(self, prompts: str | list[str], *, clip_skip: int = 1, min_chunks: int = 1) -> Tensor:
        """:meth:`encode_prompt` with autograd on (a trainer's gradients reach embedding vectors and adapters)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        lookup = {tuple(self.tokenizer.encode(n)): (n, v) for n, v in self.embeddings.items()}
        chunks = tokenize_weighted(self.tokenizer, prompts, min_chunks=min_chunks, embeddings=lookup)
        device = next(self.text_encoder.parameters()).device

        def encode(ids: Tensor, inputs_embeds: Tensor | None = None) -> Tensor:
            return self.text_encoder(ids.to(device), skip_last_layers=clip_skip - 1, inputs_embeds=inputs_embeds)

        def embed_tokens(ids: Tensor) -> Tensor:  # (B, L) -> (B, L, D)
            return self.text_encoder.text_model.embeddings.token_embedding(ids.to(device))

        return encode_chunks(encode, chunks, embed_tokens)

    def attention_maps(self, prompt: str, **fields: Any) -> Any:
        """Generate ``prompt`` (txt2img options by name) and return its per-word cross-attention maps
        and step-by-step x0 (:class:`latentdiff.explain.Explanation`)."""
        from .explain import attention_maps

        return attention_maps(self, prompt, **fields)

    def load_textual_inversion(self, path: str | Path, token: str | None = None) -> str:
        """Load a textual-inversion embedding (A1111 ``.pt``/``.safetensors``, diffusers
        ``learned_embeds``); returns its trigger name (``token``, default the file stem).
        The name in a prompt or negative prompt, weighted or not, is replaced by its vectors."""
        from .adapters.embeddings import load_textual_inversion

        return load_textual_inversion(self, path, token)

    def unload_textual_inversion(self, name: str | None = None) -> None:
        """Forget the embedding ``name``, or all of them."""
        from .adapters.embeddings import unload_textual_inversion

        unload_textual_inversion(self, name)

    def load_lora(self, path: str | Path, scale: float = 1.0, name: str | None = None, *,
                  unet_scale: float | None = None, text_encoder_scale: float | None = None,
                  digest: str | None = None) -> str:
        """Merge a LoRA file (kohya / A1111 ``lora_unet_*``, diffusers / PEFT ``lora_A``/``lora_B``,
        attention-processor keys) into the weights at ``scale`` (per network: ``unet_scale``,
        ``text_encoder_scale``).  Several stack.  Returns the name (default the file stem).
        ``digest``: the file's "Lora hashes" value when the caller has it already."""
        from .adapters import LoadedLora, lora_hash, read_lora

        path = Path(path)
        name = path.stem if name is None else name
        with self.generation_lock:
            if name in self.lora_state.loaded:
                raise BadArgument(f"a LoRA named {name!r} is already loaded (unload it first, or pass name=)")
            scales = {"unet": float(scale if unet_scale is None else unet_scale),
                      "text_encoder": float(scale if text_encoder_scale is None else text_encoder_scale)}
            networks = self.lora_networks
            loaded = LoadedLora(path, read_lora(path, networks), scales, float(scale),
                                lora_hash(path) if digest is None else digest)
            self.lora_state.add(name, loaded, networks)
            return name

    def unload_lora(self, name: str | Sequence[str] | None = None) -> None:
        """Unmerge the LoRA ``name`` (or several names, or all of them); with none left the weights
        are the originals, bit for bit."""
        with self.generation_lock:
            names = [name] if isinstance(name, str) else list(name or ())
            missing = [n for n in names if n not in self.lora_state.loaded]
            if missing:
                raise BadArgument(f"no LoRA named {missing[0]!r} is loaded "
                                  f"(loaded: {', '.join(self.lora_state.loaded) or 'none'})")
            self.lora_state.remove(None if name is None else names, self.lora_networks)

    @property
    def lora_networks(self) -> dict[str, nn.Module]:
        """The networks a LoRA patches, by target name."""
        return {"unet": self.unet, "text_encoder": self.text_encoder}

    @property
    def loras(self) -> dict[str, float]:
        """The loaded LoRAs, name -> scale, in load order."""
        return {name: lora.scale for name, lora in self.lora_state.loaded.items()}

    @property
    def native_size(self) -> int:
        """The image side the model was trained at: UNet sample size x VAE factor (512 for SD 1.x)."""
        return self.unet.config.sample_size * self.vae_factor

    def settings(self, prompts: str | list[str], options: GenerationOptions | None = None, *,
                 size: tuple[int, int] | None = None, **fields: Any) -> Settings:
        """The validated settings a call would run with: ``options`` (default
        :class:`GenerationOptions`) with ``fields`` (its field names) on top."""
        options = options if options is not None else GenerationOptions()
        if fields:
            unknown = sorted(set(fields) - _OPTION_FIELDS)
            if unknown:
                raise BadArgument(f"unknown generation option(s) {', '.join(unknown)}; valid: {', '.join(sorted(_OPTION_FIELDS))}")
            options = dataclasses.replace(options, **fields)
        return resolve(self, prompts, options, size=size)

    def txt2img(self, prompts: str | list[str], options: GenerationOptions | None = None, *,
                callback: generate.StepCallback | None = None, latents: Tensor | None = None,
                **fields: Any) -> generate.Output:
        """Text to image: ``options`` and/or any :class:`GenerationOptions` field by name
        (``steps=20, guidance_scale=7.5, sampler="ddim", seed=0, ...``).  Image i uses seed + i.
        Size defaults to the model's native size.

        ``callback(step, total, x0_pred)`` runs after every step; returning True cancels
        (raises :class:`latentdiff.samplers.SamplingCancelled`).  Guidance <= 1 skips the
        unconditional pass.  ``latents`` (B, C, h, w) replaces the drawn start noise (diffusers'
        ``latents=``).  Returns PIL images, or the final latents with ``output_type="latent"``.
        """
        return generate.txt2img(self, self.settings(prompts, options, **fields), callback, latents)

    def _size_of(self, image: object) -> tuple[int, int] | None:
        """The default (width, height) of an img2img input: a PIL image's (the first of a list),
        or latents' times the VAE factor."""
        if isinstance(image, (list, tuple)) and image:
            image = image[0]
        if isinstance(image, Image.Image):
            return image.size
        if isinstance(image, Tensor) and image.ndim == 4:
            return image.shape[-1] * self.vae_factor, image.shape[-2] * self.vae_factor
        return None

    def img2img(self, prompts: str | list[str], image: Image.Image | list[Image.Image] | Tensor,
                options: GenerationOptions | None = None, *,
                callback: generate.StepCallback | None = None, **fields: Any) -> generate.Output:
        """SDEdit: encode ``image``, noise it to ``strength`` (default 0.75), run the last
        int(steps x strength) steps.  Size defaults to the image's own (which must then be a
        multiple of the VAE factor).  ``image`` may be one PIL image (encoded once for the
        batch), one per image of the batch, or scaled latents (1 or B, C, h, w), used as they are."""
        return generate.img2img(self, self.settings(prompts, options, size=self._size_of(image), **fields), image,
                                callback)

    def inpaint(self, prompts: str | list[str], image: Image.Image, mask: Image.Image,
                options: GenerationOptions | None = None, *, callback: generate.StepCallback | None = None,
                paste_back: bool = True, **fields: Any) -> generate.Output:
        """Repaint the white pixels of ``mask``, keep the black ones (``strength`` default 1).

        A 9-channel inpainting UNet gets mask + masked-image latents as extra input; a
        4-channel one uses blended latent diffusion. With ``paste_back`` the kept pixels
        come back exactly as they were in ``image``.
        """
        size = image.size if isinstance(image, Image.Image) else None
        return generate.inpaint(self, self.settings(prompts, options, size=size, **fields), image, mask, callback,
                                paste_back)

    def outpaint(self, prompts: str | list[str], image: Image.Image, options: GenerationOptions | None = None, *,
                 left: int = 0, right: int = 0, top: int = 0, bottom: int = 0, fill: str = "edge",
                 feather: int = 8, callback: generate.StepCallback | None = None,
                 **fields: Any) -> list[Image.Image]:
        """Extend ``image`` by ``left``/``right``/``top``/``bottom`` pixels and paint the new area:
        the canvas filled by ``fill`` ("edge": border pixels stretched; "noise"), inpainted with
        a mask feathered ``feather`` pixels into the old edge, composited so that every old pixel
        outside that band is kept exactly (see :mod:`latentdiff.outpaint`).  The size is the
        canvas's; ``strength`` defaults to 1 (the fill matters below 1)."""
        from .outpaint import Extension, check_extension, outpaint

        image = generate.check_image("image", image)
        extension = check_extension(Extension(left, right, top, bottom, fill, feather), image.size, self.vae_factor)
        canvas = extension.canvas_size(image.size)
        settings = self.settings(prompts, options, size=canvas, **fields)
        if (settings.width, settings.height) != canvas:
            raise BadArgument(f"outpainting makes a {canvas[0]}x{canvas[1]} canvas (the image and the added sides); "
                              f"leave width and height unset, got {settings.width}x{settings.height}")
        if settings.output_type != "pil":
            raise BadArgument("outpainting returns images (output_type 'pil')")
        return outpaint(self, settings, image, extension, callback)

    def save(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        """Save as a diffusers folder (loadable by ``diffusers.StableDiffusionPipeline``; a preview
        decoder goes in its ``taesd/`` subfolder),
        or as one original-layout ``.safetensors`` file when ``path`` ends in ``.safetensors``
        (a single file holds no tokenizer or scheduler config, as in the original format).
        """
        path = Path(path)
        if path.suffix.lower() == ".safetensors":
            if not isinstance(self.vae, AutoencoderKL):
                raise BadArgument(f"an original single file holds an AutoencoderKL, not this pipeline's "
                                  f"{type(self.vae).__name__}: save to a folder instead")
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
        save_pipeline_folder(path, {name: getattr(self, name) for name in KINDS}, self.tokenizer,
                             self.schedule.to_dict(), dtype)
        if self.preview_vae is not None:  # beside the diffusers components; load() finds it there
            save_component(self.preview_vae, path / PREVIEW_FOLDER, "vae", dtype)
