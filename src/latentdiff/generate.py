"""Text-to-image, image-to-image and inpainting: one denoising loop, three ways to start it.

Every application runs the same numbered steps (diffusers' structure):

    1. check inputs              (sizes, strength, sampler, mask)
    2. encode the prompts        (positive and negative, same chunk count)
    3. prepare the start latent  (pure noise, or the image's latent noised to the start level)
    4. denoise                   (sampler over the CFG-wrapped UNet; inpainting hooks in here)
    5. decode                    (NaN fallback to float32, optional tiling) -> PIL images

Seeds: image ``i`` of a call uses its own ``torch.Generator("cpu").manual_seed(seed + i)``.
Each generator serves that image's random draws in diffusers' order, so a seed
gives the same image as diffusers with a list of CPU generators, on any device:
  - txt2img: the initial noise ``torch.randn((1, C, h, w))``, then the sampler's noise;
  - img2img: the posterior sample of the encoded image, then the noise, then the sampler's;
  - inpaint: (4-channel model or strength < 1: the image's posterior sample), the noise,
    the masked image's posterior sample, then the sampler's noise.
Noise is drawn in float32 on the CPU and then cast and moved.

Inpainting with a 4-channel model (blended latent diffusion) replaces, after
every sampler step, the latents outside the mask by the original image's latents
noised to the level just reached (through the samplers' ``post_step`` hook).

One deliberate difference from diffusers: its inpainting pipeline encodes a single
input image once, with the first generator only, and repeats the latent over the
batch, so image i of a batch is not the image of seed + i alone.  Here every image
of a batch draws from its own generator, so it is; a batch of one equals diffusers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .samplers import SamplerSpec, get_sampler, vp_denoiser
from .schedule import SigmaPlan

if TYPE_CHECKING:
    from .pipeline import Pipeline

StepCallback = Callable[[int, int, Tensor], Any]


@dataclass(frozen=True)
class Settings:
    """What every application shares; also what the PNG ``parameters`` chunk records."""

    prompts: list[str]
    negative_prompts: list[str]
    width: int
    height: int
    steps: int
    guidance_scale: float
    sampler: SamplerSpec
    seed: int
    images_per_prompt: int = 1
    eta: float = 0.0
    clip_skip: int = 1
    strength: float | None = None
    seeds: tuple[int, ...] | None = None  # explicit per-image seeds (e.g. a shard of a larger run)

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.images_per_prompt

    def seed_of(self, index: int) -> int:
        """The seed of image ``index``: ``seed + index``, or ``seeds[index]`` when given."""
        return self.seeds[index] if self.seeds is not None else self.seed + index

    def infotext(self, index: int, model: str) -> str:
        """AUTOMATIC1111's ``parameters`` text for image ``index`` of this call."""
        prompt = self.prompts[index // self.images_per_prompt]
        negative = self.negative_prompts[index // self.images_per_prompt]
        fields = [
            f"Steps: {self.steps}",
            f"Sampler: {self.sampler.name}",
            f"CFG scale: {self.guidance_scale:g}",
            f"Seed: {self.seed_of(index)}",
            f"Size: {self.width}x{self.height}",
        ]
        if model:
            fields.append(f"Model: {model}")
        if self.strength is not None:
            fields.append(f"Denoising strength: {self.strength:g}")
        if self.eta and self.sampler.id == "ddim":
            fields.append(f"Eta: {self.eta:g}")
        if self.clip_skip != 1:
            fields.append(f"Clip skip: {self.clip_skip}")
        lines = [prompt]
        if negative:
            lines.append(f"Negative prompt: {negative}")
        lines.append(", ".join(fields))
        return "\n".join(lines)


# ----------------------------------------------------------------------------- step 1
def make_settings(
    pipe: Pipeline,
    prompts: str | Sequence[str],
    negative_prompt: str | Sequence[str],
    width: int,
    height: int,
    steps: int,
    guidance_scale: float,
    sampler: str,
    seed: int,
    images_per_prompt: int,
    eta: float,
    clip_skip: int,
    strength: float | None = None,
) -> Settings:
    """Check every argument up front and name the one that is wrong."""
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt_list or not all(isinstance(p, str) for p in prompt_list):
        raise ValueError("prompts must be a string or a non-empty list of strings")
    negatives = [negative_prompt] * len(prompt_list) if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != len(prompt_list):
        raise ValueError(f"got {len(negatives)} negative prompts for {len(prompt_list)} prompts")
    factor = pipe.vae_factor
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value <= 0 or value % factor:
            raise ValueError(f"{name} {value} is not a positive multiple of the VAE factor {factor}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be at least 1, got {images_per_prompt}")
    if strength is not None and not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    layers = pipe.text_encoder.config.num_hidden_layers
    if not 1 <= clip_skip <= layers:
        raise ValueError(f"clip_skip must be in [1, {layers}], got {clip_skip}")
    return Settings(
        prompt_list, negatives, width, height, steps, float(guidance_scale), get_sampler(sampler),
        int(seed), images_per_prompt, float(eta), clip_skip, strength,
    )


def generators_for(settings: Settings) -> list[torch.Generator]:
    """One CPU generator per image: image i is seeded with seed + i (or its explicit seed)."""
    if settings.seeds is not None and len(settings.seeds) != settings.batch:
        raise ValueError(f"got {len(settings.seeds)} seeds for {settings.batch} images")
    return [torch.Generator("cpu").manual_seed(settings.seed_of(i)) for i in range(settings.batch)]


# ----------------------------------------------------------------------------- step 2
@dataclass
class Conditioning:
    cond: Tensor  # (B, L, D)
    uncond: Tensor | None  # (B, L, D), None when guidance is off

    @property
    def guided(self) -> bool:
        return self.uncond is not None


def encode_prompts(pipe: Pipeline, settings: Settings) -> Conditioning:
    """Text embeddings for each image of the batch (prompt-major, as diffusers repeats them)."""
    cond = pipe.encode_prompt(settings.prompts, clip_skip=settings.clip_skip)
    uncond = None
    if settings.guidance_scale > 1.0:
        length = pipe.tokenizer.model_max_length
        chunks = cond.shape[1] // length
        uncond = pipe.encode_prompt(settings.negative_prompts, clip_skip=settings.clip_skip, min_chunks=chunks)
        if uncond.shape[1] > cond.shape[1]:  # a negative prompt longer than the prompt
            cond = pipe.encode_prompt(settings.prompts, clip_skip=settings.clip_skip, min_chunks=uncond.shape[1] // length)
        uncond = uncond.repeat_interleave(settings.images_per_prompt, dim=0).to(pipe.dtype)
    cond = cond.repeat_interleave(settings.images_per_prompt, dim=0).to(pipe.dtype)
    return Conditioning(cond, uncond)


# ----------------------------------------------------------------------------- step 3
def draw_noise(shape: tuple[int, ...], generators: Sequence[torch.Generator]) -> Tensor:
    """(B, *shape[1:]) standard normal noise, image i drawn from generators[i] as (1, ...) float32 on CPU."""
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generators])


def pil_to_tensor(image: Image.Image, width: int, height: int) -> Tensor:
    """RGB PIL image -> (1, 3, H, W) in [-1, 1], resized (Lanczos) when its size differs."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0


def mask_to_tensor(mask: Image.Image, width: int, height: int) -> Tensor:
    """Mask PIL image -> (1, 1, H, W) of 0/1: white (>= 0.5) is repainted, black is kept."""
    mask = mask.convert("L")
    if mask.size != (width, height):
        mask = mask.resize((width, height), resample=Image.LANCZOS)
    array = np.asarray(mask, dtype=np.float32) / 255.0
    return (torch.from_numpy(array) >= 0.5).float()[None, None]


def encode_images(pipe: Pipeline, images: Tensor, generators: Sequence[torch.Generator], tiled: bool = False) -> Tensor:
    """Scaled latents of images (B, 3, H, W): a posterior sample per image, from its own generator."""
    vae = pipe.vae
    latents = []
    for i, g in enumerate(generators):
        image = images[i : i + 1].to(pipe.device, vae_dtype(pipe))
        posterior = vae.encode_tiled(image) if tiled else vae.encode(image)
        latents.append(posterior.sample(g))
    return vae.scale_latents(torch.cat(latents).to(pipe.dtype))


def vae_dtype(pipe: Pipeline) -> torch.dtype:
    return next(pipe.vae.parameters()).dtype


# ----------------------------------------------------------------------------- step 4
def guided_model(pipe: Pipeline, conditioning: Conditioning, guidance_scale: float, extra: Tensor | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """The UNet as ``eps(x_vp, t)``, with classifier-free guidance and extra input channels (inpainting)."""

    def model(x_vp: Tensor, t: Tensor) -> Tensor:
        x_in = x_vp.to(pipe.dtype)
        if extra is not None:
            x_in = torch.cat([x_in, extra], dim=1)  # (B, 4 + 1 + 4, h, w) for 9-channel inpainting
        t = t.reshape(-1).expand(x_in.shape[0]) if t.numel() == 1 else t
        if not conditioning.guided:
            return pipe.unet(x_in, t, conditioning.cond).to(x_vp.dtype)
        both = pipe.unet(torch.cat([x_in, x_in]), torch.cat([t, t]), torch.cat([conditioning.uncond, conditioning.cond]))
        uncond, cond = both.to(x_vp.dtype).chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    return model


@dataclass
class KnownRegion:
    """What blended inpainting keeps: the original's latents, the keep-mask (1 = keep) and the start noise."""

    latents: Tensor  # (B, 4, h, w) scaled latents of the original image
    keep: Tensor  # (B, 1, h, w) 0/1
    noise: Tensor  # (B, 4, h, w) the noise the run started from


def denoise(
    pipe: Pipeline,
    settings: Settings,
    plan: SigmaPlan,
    x: Tensor,
    model: Callable[[Tensor, Tensor], Tensor],
    generators: Sequence[torch.Generator],
    callback: StepCallback | None,
    known: KnownRegion | None = None,
) -> Tensor:
    """Run the sampler from x (sigma space, at plan.sigmas[0]) and return VP latents (B, 4, h, w).

    ``known`` turns on blended inpainting: after every step the latents outside the
    mask are replaced by the original image's latents noised to the level just
    reached, with the start noise (clean after the last step), as diffusers does.
    """
    schedule = settings.sampler.schedule(pipe.schedule)
    denoiser = vp_denoiser(model, schedule, discrete_timesteps=plan.discrete_timesteps, timesteps=plan.timesteps)
    options = dict(plan.options)
    if settings.sampler.id == "ddim":
        options["eta"] = settings.eta
    post_step = None
    if known is not None:
        sigmas, last = plan.sigmas, len(plan.sigmas) - 2

        def post_step(i: int, x: Tensor) -> Tensor:
            s = float(sigmas[i + 1])
            if i < last:
                target = known.latents + s * known.noise  # the original, noised to this step's level
            else:
                target = known.latents * math.sqrt(1.0 + s * s)  # clean once converted to VP
            return known.keep * target + (1 - known.keep) * x

    x = settings.sampler(
        denoiser, x, plan.sigmas, generator=list(generators), callback=callback, post_step=post_step, **options
    )
    return plan.to_vp(x)


# ----------------------------------------------------------------------------- step 5
def decode(pipe: Pipeline, latents: Tensor, tiled: bool = False) -> Tensor:
    """VP latents -> images (B, 3, H, W) in [-1, 1].

    A decode that produced NaN or inf (the known float16 "black image" failure) is
    redone in float32, with a warning, and the VAE stays in float32 afterwards.
    """
    vae = pipe.vae

    def run() -> Tensor:
        z = vae.unscale_latents(latents.to(vae_dtype(pipe)))
        return vae.decode_tiled(z) if tiled else vae.decode(z)

    images = run()
    if not torch.isfinite(images).all():
        if vae_dtype(pipe) == torch.float32:
            raise FloatingPointError("VAE decoding produced NaN/inf even in float32")
        warnings.warn(
            f"VAE decoding in {vae_dtype(pipe)} produced NaN/inf; decoding again in float32 "
            "(the VAE is kept in float32 from now on)", RuntimeWarning, stacklevel=3,
        )
        vae.to(torch.float32)
        images = run()
    return images.float()


def to_pil(images: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> uint8 RGB PIL images (rounded as diffusers does)."""
    array = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]


def finish(pipe: Pipeline, settings: Settings, images: Tensor) -> list[Image.Image]:
    """PIL images carrying their A1111 ``parameters`` text in ``image.info``."""
    out = to_pil(images)
    for i, image in enumerate(out):
        image.info["parameters"] = settings.infotext(i, pipe.name)
    return out


# ----------------------------------------------------------------------------- applications
@torch.no_grad()
def txt2img(pipe: Pipeline, settings: Settings, callback: StepCallback | None = None, vae_tiling: bool = False) -> list[Image.Image]:
    generators = generators_for(settings)
    conditioning = encode_prompts(pipe, settings)
    h, w = settings.height // pipe.vae_factor, settings.width // pipe.vae_factor
    plan = settings.sampler.plan(settings.sampler.schedule(pipe.schedule), settings.steps)
    noise = draw_noise((settings.batch, pipe.vae.config.latent_channels, h, w), generators)
    x = noise.to(pipe.device, pipe.dtype) * plan.init_noise_sigma
    model = guided_model(pipe, conditioning, settings.guidance_scale)
    latents = denoise(pipe, settings, plan, x, model, generators, callback)
    return finish(pipe, settings, decode(pipe, latents, vae_tiling))


def start_from_image(pipe: Pipeline, plan: SigmaPlan, image_latents: Tensor, generators: Sequence[torch.Generator]) -> tuple[Tensor, Tensor]:
    """Noise the image's latents to the plan's first level: returns (x in sigma space, the noise)."""
    noise = draw_noise(tuple(image_latents.shape), generators).to(pipe.device, pipe.dtype)
    return image_latents + float(plan.sigmas[0]) * noise, noise


def plan_for(pipe: Pipeline, settings: Settings, strength: float | None) -> SigmaPlan:
    plan = settings.sampler.plan(settings.sampler.schedule(pipe.schedule), settings.steps, strength=strength)
    if plan.steps < 1:
        raise ValueError(f"strength {strength} with {settings.steps} steps leaves no step to run")
    return plan


@torch.no_grad()
def img2img(pipe: Pipeline, settings: Settings, image: Image.Image, callback: StepCallback | None = None, vae_tiling: bool = False) -> list[Image.Image]:
    strength = settings.strength if settings.strength is not None else 0.75
    plan = plan_for(pipe, settings, strength)
    generators = generators_for(settings)
    conditioning = encode_prompts(pipe, settings)
    pixels = pil_to_tensor(image, settings.width, settings.height).expand(settings.batch, -1, -1, -1)
    image_latents = encode_images(pipe, pixels, generators, vae_tiling)
    x, _ = start_from_image(pipe, plan, image_latents, generators)
    model = guided_model(pipe, conditioning, settings.guidance_scale)
    latents = denoise(pipe, settings, plan, x, model, generators, callback)
    return finish(pipe, settings, decode(pipe, latents, vae_tiling))


@torch.no_grad()
def inpaint(
    pipe: Pipeline,
    settings: Settings,
    image: Image.Image,
    mask: Image.Image,
    callback: StepCallback | None = None,
    vae_tiling: bool = False,
    paste_back: bool = True,
) -> list[Image.Image]:
    if mask.size != image.size:
        raise ValueError(f"mask size {mask.size[0]}x{mask.size[1]} differs from image size {image.size[0]}x{image.size[1]}")
    strength = settings.strength if settings.strength is not None else 1.0
    in_channels = pipe.unet.config.in_channels
    if in_channels not in (4, 9):
        raise ValueError(f"inpainting needs a UNet with 4 or 9 input channels, this one has {in_channels}")
    # At full strength the run starts from pure noise scaled like txt2img (diffusers' is_strength_max).
    plan = plan_for(pipe, settings, None if strength == 1.0 else strength)
    generators = generators_for(settings)
    conditioning = encode_prompts(pipe, settings)
    batch = settings.batch
    pixels = pil_to_tensor(image, settings.width, settings.height).expand(batch, -1, -1, -1)
    repaint = mask_to_tensor(mask, settings.width, settings.height).expand(batch, -1, -1, -1)  # (B, 1, H, W)
    h, w = settings.height // pipe.vae_factor, settings.width // pipe.vae_factor
    repaint_latent = F.interpolate(repaint, size=(h, w)).to(pipe.device, pipe.dtype)  # nearest, (B, 1, h, w)

    # Start latent: pure noise at full strength (scaled like txt2img), else the noised image.
    image_latents = None
    if in_channels == 4 or strength < 1.0:
        image_latents = encode_images(pipe, pixels, generators, vae_tiling)
    noise = draw_noise((batch, pipe.vae.config.latent_channels, h, w), generators).to(pipe.device, pipe.dtype)
    if strength < 1.0:
        x = image_latents + float(plan.sigmas[0]) * noise
    else:
        x = noise * plan.init_noise_sigma
    masked_latents = encode_images(pipe, pixels * (repaint < 0.5), generators, vae_tiling)

    if in_channels == 9:
        extra = torch.cat([repaint_latent, masked_latents], dim=1)  # (B, 5, h, w)
        model = guided_model(pipe, conditioning, settings.guidance_scale, extra=extra)
        latents = denoise(pipe, settings, plan, x, model, generators, callback)
    else:
        model = guided_model(pipe, conditioning, settings.guidance_scale)
        known = KnownRegion(image_latents, 1 - repaint_latent, noise)
        latents = denoise(pipe, settings, plan, x, model, generators, callback, known=known)

    images = decode(pipe, latents, vae_tiling)
    if paste_back:
        images = repaint.to(images) * images + (1 - repaint.to(images)) * pixels.to(images)
    return finish(pipe, settings, images)
