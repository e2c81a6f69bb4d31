"""Text-to-image, image-to-image and inpainting: one denoising loop, three ways to start it.

Every application runs the same numbered steps (diffusers' structure):

    1. check inputs              (:func:`latentdiff.settings.resolve`; images and masks here)
    2. encode the prompts        (positive and negative, same chunk count)
    3. prepare the start latent  (pure noise, or the image's latent noised to the start level)
    4. denoise                   (sampler over the CFG-wrapped UNet; inpainting hooks in here)
    5. decode                    (float32 copy of a half VAE for force_upcast or a NaN) -> PIL images

Precision: latents and every sampler state are float32 whatever the networks' dtype; the
UNet and the VAE cast at their boundary.  A generation holds the pipeline's lock (threads
may share one :class:`~latentdiff.pipeline.Pipeline`; their calls run one at a time), and
changes the weights only to merge the LoRAs its prompts tag (``<lora:NAME:W>``), unmerged
bit for bit when it ends.

Seeds: image ``i`` of a call uses its own ``torch.Generator("cpu").manual_seed(seeds[i])``.
Each generator serves that image's random draws in diffusers' order, so a seed
gives the same image as diffusers with a list of CPU generators, on any device:
  - txt2img: the initial noise ``torch.randn((1, C, h, w))``, then the sampler's noise;
  - img2img: the posterior sample of the encoded image, then the noise, then the sampler's;
  - inpaint: (4-channel model or strength < 1: the image's posterior sample), the noise,
    the masked image's posterior sample, then the sampler's noise.
  A tiny autoencoder (TAESD) encodes without a posterior: its "samples" draw nothing, as in diffusers.
Noise is drawn in float32 on the CPU and then moved.  Each distinct input image is encoded once
per call; the per-image posterior samples are drawn from that one encoding.  Variation seeds
blend the initial noise as A1111 does (:func:`latentdiff.settings.variation_noise`).

Inpainting with a 4-channel model (blended latent diffusion) replaces, after
every sampler step, the latents outside the mask by the original image's latents
noised to the level just reached (through the samplers' ``post_step`` hook).

One deliberate difference from diffusers: its inpainting pipeline encodes a single
input image once, with the first generator only, and repeats the latent over the
batch, so image i of a batch is not the image of seed + i alone.  Here every image
of a batch draws from its own generator, so it is; a batch of one equals diffusers.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
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

from . import budget
from .adapters.prompt_loras import applied, strip_tags
from .errors import BadArgument
from .models.layers import guidance_scale_embedding
from .models.taesd import Autoencoder, TinyAutoencoder, TinyLatents
from .models.vq import VQModel
from .models.vae import DiagonalGaussian
from .samplers import vp_denoiser
from .schedule import SigmaPlan
from .settings import Settings, variation_noise
from .speed.deepcache import FeatureCache

if TYPE_CHECKING:
    from .pipeline import Pipeline

StepCallback = Callable[[int, int, Tensor], Any]
#: txt2img/img2img/inpaint return PIL images, or the final scaled latents with output_type="latent"
Output = list[Image.Image] | Tensor


# ----------------------------------------------------------------------------- step 2
@dataclass
class Conditioning:
    cond: Tensor  # (B, L, D)
    uncond: Tensor | None  # (B, L, D), None when guidance is off

    @property
    def guided(self) -> bool:
        return self.uncond is not None


def encode_prompts(pipe: Pipeline, settings: Settings) -> Conditioning:
    """Text embeddings for each image of the batch (prompt-major, as diffusers repeats them);
    ``<lora:...>`` tags are not part of the text."""
    prompts = [strip_tags(p) for p in settings.prompts]
    negatives = [strip_tags(n) for n in settings.negative_prompts]
    cond = pipe.encode_prompt(prompts, clip_skip=settings.clip_skip)
    uncond = None
    if settings.guidance_scale > 1.0 and lcm_cond_dim(pipe) is None:  # an LCM-distilled UNet takes no CFG
        length = pipe.tokenizer.model_max_length
        chunks = cond.shape[1] // length
        uncond = pipe.encode_prompt(negatives, clip_skip=settings.clip_skip, min_chunks=chunks)
        if uncond.shape[1] > cond.shape[1]:  # a negative prompt longer than the prompt
            cond = pipe.encode_prompt(prompts, clip_skip=settings.clip_skip, min_chunks=uncond.shape[1] // length)
        uncond = uncond.repeat_interleave(settings.images_per_prompt, dim=0).to(pipe.dtype)
    cond = cond.repeat_interleave(settings.images_per_prompt, dim=0).to(pipe.dtype)
    return Conditioning(cond, uncond)


# ----------------------------------------------------------------------------- step 3
def draw_noise(shape: tuple[int, ...], generators: Sequence[torch.Generator]) -> Tensor:
    """(B, *shape[1:]) standard normal noise, image i drawn from generators[i] as (1, ...) float32 on CPU."""
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generators])


def initial_noise(pipe: Pipeline, settings: Settings, generators: Sequence[torch.Generator]) -> Tensor:
    """The start noise (B, C, h, w) float32 on the pipeline's device, variation seeds applied."""
    h, w = settings.height // pipe.vae_factor, settings.width // pipe.vae_factor
    noise = draw_noise((settings.batch, pipe.vae.latent_channels, h, w), generators)
    return variation_noise(noise, settings).to(pipe.device)


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


def check_image(name: str, image: object) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise BadArgument(f"{name} must be a PIL image, got {type(image).__name__}")
    return image


def vae_for(pipe: Pipeline) -> Autoencoder:
    """The VAE to run: the pipeline's own, or a float32 copy of a float16 VAE whose config asks
    for ``force_upcast`` (the shared module is never cast)."""
    vae = pipe.vae
    if vae_dtype(vae) == torch.float16 and vae.config.force_upcast:
        return float32_copy(vae)
    return vae


def float32_copy(vae: Autoencoder) -> Autoencoder:
    return copy.deepcopy(vae).float()


def encode_image(pipe: Pipeline, vae: Autoencoder, pixels: Tensor, tiled: bool) -> DiagonalGaussian | TinyLatents:
    """The posterior of one image (1, 3, H, W), encoded once (a tiny autoencoder's plain latents)."""
    image = pixels.to(pipe.device, vae_dtype(vae))
    return vae.encode_tiled(image) if tiled else vae.encode(image)


def sample_latents(vae: Autoencoder, posterior: DiagonalGaussian | TinyLatents,
                   generators: Sequence[torch.Generator]) -> Tensor:
    """Scaled float32 latents (B, C, h, w): one posterior sample per generator (each draws
    ``(1, C, h, w)`` as diffusers' encoder of a single image does; a tiny autoencoder draws nothing)."""
    return vae.scale_latents(torch.cat([posterior.sample(g) for g in generators]).float())


def skip_posterior_draw(shape: tuple[int, int, int], dtype: torch.dtype, generators: Sequence[torch.Generator]) -> None:
    """Advance each generator exactly as a posterior sample of latent ``shape`` (C, h, w) in
    ``dtype`` would, without running the encoder: keeps the random order of diffusers'
    inpainting, which encodes a masked image that blended inpainting never uses."""
    for g in generators:
        torch.randn((1, *shape), generator=g, dtype=dtype)


def vae_dtype(vae: Autoencoder) -> torch.dtype:
    return next(vae.parameters()).dtype


# ----------------------------------------------------------------------------- step 4
def lcm_cond_dim(pipe: Pipeline) -> int | None:
    """The UNet's ``time_cond_proj_dim``: the guidance-embedding width of an LCM-distilled UNet, else None."""
    return getattr(pipe.unet.config, "time_cond_proj_dim", None)


def guided_model(pipe: Pipeline, conditioning: Conditioning, guidance_scale: float, extra: Tensor | None = None,
                 cache_interval: int = 1) -> Callable[[Tensor, Tensor], Tensor]:
    """The UNet as ``eps(x_vp, t)``, with classifier-free guidance and extra input channels
    (inpainting).  Input is cast to the UNet's dtype, output back to float32.  A UNet with
    ``time_cond_proj_dim`` (LCM-distilled) instead runs once per step on the prompt with the
    embedding of ``guidance_scale - 1`` as ``timestep_cond`` (diffusers' LatentConsistencyModelPipeline).
    ``cache_interval`` > 1 turns on DeepCache for this generation (:mod:`latentdiff.speed.deepcache`)."""
    cache = FeatureCache(cache_interval) if cache_interval > 1 else None
    w_embedding = None
    cond_dim = lcm_cond_dim(pipe)
    if cond_dim is not None:
        w = torch.full((conditioning.cond.shape[0],), guidance_scale - 1, dtype=torch.float32)
        w_embedding = guidance_scale_embedding(w, cond_dim).to(pipe.device)

    def model(x_vp: Tensor, t: Tensor) -> Tensor:
        x_in = x_vp.to(pipe.dtype)
        if extra is not None:
            x_in = torch.cat([x_in, extra.to(pipe.dtype)], dim=1)  # (B, 4 + 1 + 4, h, w) for 9-channel inpainting
        t = t.reshape(-1).expand(x_in.shape[0]) if t.numel() == 1 else t
        if w_embedding is not None:  # LCM-distilled: guidance is an input, one pass, no CFG batch
            return pipe.unet(x_in, t, conditioning.cond, timestep_cond=w_embedding, feature_cache=cache).to(x_vp.dtype)
        if not conditioning.guided:
            return pipe.unet(x_in, t, conditioning.cond, feature_cache=cache).to(x_vp.dtype)
        both = pipe.unet(torch.cat([x_in, x_in]), torch.cat([t, t]), torch.cat([conditioning.uncond, conditioning.cond]),
                         feature_cache=cache)
        uncond, cond = both.to(x_vp.dtype).chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    return model


@dataclass
class KnownRegion:
    """What blended inpainting keeps: the original's latents, the keep-mask (1 = keep) and the start noise."""

    latents: Tensor  # (B, 4, h, w) scaled latents of the original image
    keep: Tensor  # (B, 1, h, w) 0/1
    noise: Tensor  # (B, 4, h, w) the noise the run started from


def plan_for(pipe: Pipeline, settings: Settings, strength: float | None) -> SigmaPlan:
    """The sampler's plan on the pipeline's schedule (the img2img tail for a ``strength``)."""
    sampler = settings.sampler
    try:
        plan = sampler.plan(sampler.schedule(pipe.schedule), settings.steps, strength=strength)
    except ValueError as err:  # steps vs spacing, strength leaving no step, ...
        raise BadArgument(str(err)) from None
    if plan.steps < 1:
        raise BadArgument(f"strength {strength} with {settings.steps} steps leaves no step to run")
    return plan


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
    """Run the sampler from x (float32, sigma space, at plan.sigmas[0]); return float32 VP latents (B, 4, h, w).

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
        denoiser, x.float(), plan.sigmas, generator=list(generators), callback=callback, post_step=post_step, **options
    )
    return plan.to_vp(x)


# ----------------------------------------------------------------------------- step 5
@torch.no_grad()
def decode(pipe: Pipeline, latents: Tensor, tiled: bool = False) -> Tensor:
    """Scaled VP latents -> float32 images (B, 3, H, W) in [-1, 1].

    A half-precision VAE whose config sets ``force_upcast`` decodes with a float32 copy; a
    decode that still produced NaN or inf (the known float16 "black image" failure) is redone
    with a float32 copy, with a warning.  The pipeline's VAE is never cast.
    """

    def run(vae: Autoencoder) -> Tensor:
        z = vae.unscale_latents(latents.to(vae_dtype(vae)))
        return vae.decode_tiled(z) if tiled else vae.decode(z)

    vae = vae_for(pipe)
    images = run(vae)
    if not torch.isfinite(images).all():
        if vae_dtype(vae) == torch.float32:
            raise FloatingPointError("VAE decoding produced NaN/inf even in float32: the model's weights or "
                                     "latents are broken")
        warnings.warn(f"VAE decoding in {vae_dtype(vae)} produced NaN/inf; decoded again with a float32 copy",
                      RuntimeWarning, stacklevel=3)
        images = run(float32_copy(vae))
    return images.float()


def to_pil(images: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> uint8 RGB PIL images (rounded as diffusers does)."""
    array = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]


def finish(pipe: Pipeline, settings: Settings, latents: Tensor, pixels: Tensor | None = None,
           repaint: Tensor | None = None) -> Output:
    """Decode (unless ``output_type="latent"``), paste kept pixels back, attach the infotext."""
    if settings.output_type == "latent":
        return latents
    images = decode(pipe, latents, settings.vae_tiling)
    if repaint is not None and pixels is not None:
        images = repaint.to(images) * images + (1 - repaint.to(images)) * pixels.to(images)
    out = to_pil(images)
    for i, image in enumerate(out):
        image.info["parameters"] = settings.infotext(i)
    return out


# ----------------------------------------------------------------------------- applications
def holding_pipeline(run: Callable[..., Output]) -> Callable[..., Output]:
    """Run an application under the pipeline's lock with its prompts' tagged LoRAs merged."""

    @functools.wraps(run)
    def wrapper(pipe: Pipeline, settings: Settings, *args: Any, **kwargs: Any) -> Output:
        with pipe.generation_lock, applied(pipe, settings.loras):
            return run(pipe, settings, *args, **kwargs)

    return wrapper


def start_latents(pipe: Pipeline, settings: Settings, latents: Tensor | None,
                  generators: Sequence[torch.Generator]) -> Tensor:
    """The unscaled start noise: ``latents`` when given (diffusers' ``latents=``, no draw), else drawn."""
    if latents is None:
        return initial_noise(pipe, settings, generators)
    h, w = settings.height // pipe.vae_factor, settings.width // pipe.vae_factor
    shape = (settings.batch, pipe.vae.latent_channels, h, w)
    if not isinstance(latents, Tensor) or tuple(latents.shape) != shape:
        got = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
        raise BadArgument(f"latents must be a tensor of shape {shape}, got {got}")
    if not latents.is_floating_point() or not torch.isfinite(latents).all():
        raise BadArgument("latents must be finite floating-point numbers")
    return latents.to(pipe.device, torch.float32)


@holding_pipeline
@torch.no_grad()
def txt2img(pipe: Pipeline, settings: Settings, callback: StepCallback | None = None,
            latents: Tensor | None = None) -> Output:
    if settings.hires_scale > 1.0 and settings.hires_base is None:
        return hires_fix(pipe, settings, callback, latents)
    budget.check(pipe, settings)
    plan = plan_for(pipe, settings, None)
    generators = settings.generators()
    conditioning = encode_prompts(pipe, settings)
    x = start_latents(pipe, settings, latents, generators) * plan.init_noise_sigma
    model = guided_model(pipe, conditioning, settings.guidance_scale, cache_interval=settings.cache_interval)
    return finish(pipe, settings, denoise(pipe, settings, plan, x, model, generators, callback))


#: hires-fix upscalers: A1111's "Latent" (bilinear) and "Latent (nearest)" on the latents, or the
#: decoded image resized with Lanczos and encoded again
HIRES_UPSCALERS = ("latent", "latent-nearest", "lanczos")


@holding_pipeline
def hires_fix(pipe: Pipeline, settings: Settings, callback: StepCallback | None = None,
              latents: Tensor | None = None) -> Output:
    """A1111's hires fix: txt2img at the base size, the result upscaled (latents bilinear or
    nearest, or the decoded image resized with Lanczos), then img2img at the large size with
    ``hires_strength`` over ``hires_steps`` and fresh noise from the same seeds.  Exactly the two
    calls ``txt2img(output_type="latent")`` and ``img2img(image=upscaled)``."""
    large = settings.hires_settings()
    budget.check(pipe, large)
    base = dataclasses.replace(settings, hires_scale=1.0, output_type="latent")
    first = txt2img(pipe, base, callback, latents)  # (B, C, h, w) scaled latents
    h, w = large.height // pipe.vae_factor, large.width // pipe.vae_factor
    if settings.hires_upscaler == "lanczos":
        images = to_pil(decode(pipe, first, settings.vae_tiling))
        upscaled: Tensor | list[Image.Image] = [im.resize((large.width, large.height), Image.LANCZOS) for im in images]
    else:
        mode = "bilinear" if settings.hires_upscaler == "latent" else "nearest"
        upscaled = F.interpolate(first, size=(h, w), mode=mode, **({"align_corners": False} if mode != "nearest" else {}))
    return img2img(pipe, large, upscaled, callback)


def refuse_hires(settings: Settings) -> None:
    """img2img and inpainting have no hires pass of their own (hires_fix's second pass is an img2img)."""
    if settings.hires_scale > 1.0 and settings.hires_base is None:
        raise BadArgument("hires_scale applies to txt2img only")


def image_latents_for(pipe: Pipeline, settings: Settings, image: Image.Image | Sequence[Image.Image] | Tensor,
                      generators: Sequence[torch.Generator]) -> Tensor:
    """The scaled float32 start latents (B, C, h, w) of img2img: from one image (encoded once,
    one posterior sample per generator), one image per batch item, or given latents
    ((1 or B, C, h, w), used as they are, as diffusers does for a 4-channel ``image``)."""
    batch = settings.batch
    h, w = settings.height // pipe.vae_factor, settings.width // pipe.vae_factor
    if isinstance(image, Tensor):
        shape = (pipe.vae.latent_channels, h, w)
        if image.ndim != 4 or tuple(image.shape[1:]) != shape or image.shape[0] not in (1, batch):
            raise BadArgument(f"latents given as image must have shape (1 or {batch}, {shape[0]}, {h}, {w}), "
                              f"got {tuple(image.shape)}")
        if not image.is_floating_point() or not torch.isfinite(image).all():
            raise BadArgument("latents given as image must be finite floating-point numbers")
        return image.to(pipe.device, torch.float32).expand(batch, -1, -1, -1)
    vae = vae_for(pipe)
    if isinstance(image, (list, tuple)):
        if len(image) != batch:
            raise BadArgument(f"got {len(image)} images for {batch} images to make")
        parts = []
        for i, (one, g) in enumerate(zip(image, generators)):
            pixels = pil_to_tensor(check_image(f"image[{i}]", one), settings.width, settings.height)
            parts.append(sample_latents(vae, encode_image(pipe, vae, pixels, settings.vae_tiling), [g]))
        return torch.cat(parts)
    pixels = pil_to_tensor(check_image("image", image), settings.width, settings.height)
    return sample_latents(vae, encode_image(pipe, vae, pixels, settings.vae_tiling), generators)


@holding_pipeline
@torch.no_grad()
def img2img(pipe: Pipeline, settings: Settings, image: Image.Image | Sequence[Image.Image] | Tensor,
            callback: StepCallback | None = None) -> Output:
    refuse_hires(settings)
    budget.check(pipe, settings)
    strength = settings.strength if settings.strength is not None else 0.75
    plan = plan_for(pipe, settings, strength)
    generators = settings.generators()
    conditioning = encode_prompts(pipe, settings)
    x = image_latents_for(pipe, settings, image, generators) + float(plan.sigmas[0]) * initial_noise(
        pipe, settings, generators)
    model = guided_model(pipe, conditioning, settings.guidance_scale, cache_interval=settings.cache_interval)
    return finish(pipe, settings, denoise(pipe, settings, plan, x, model, generators, callback))


@holding_pipeline
@torch.no_grad()
def inpaint(pipe: Pipeline, settings: Settings, image: Image.Image, mask: Image.Image,
            callback: StepCallback | None = None, paste_back: bool = True) -> Output:
    refuse_hires(settings)
    image, mask = check_image("image", image), check_image("mask", mask)
    if mask.size != image.size:
        raise BadArgument(f"mask size {mask.size[0]}x{mask.size[1]} differs from image size {image.size[0]}x{image.size[1]}")
    budget.check(pipe, settings)
    strength = settings.strength if settings.strength is not None else 1.0
    in_channels = pipe.unet.config.in_channels
    if in_channels not in (4, 9):
        raise BadArgument(f"inpainting needs a UNet with 4 or 9 input channels, this one has {in_channels}")
    # At full strength the run starts from pure noise scaled like txt2img (diffusers' is_strength_max).
    plan = plan_for(pipe, settings, None if strength == 1.0 else strength)
    generators = settings.generators()
    conditioning = encode_prompts(pipe, settings)
    batch = settings.batch
    pixels = pil_to_tensor(image, settings.width, settings.height)  # (1, 3, H, W)
    repaint = mask_to_tensor(mask, settings.width, settings.height)  # (1, 1, H, W)
    h, w = settings.height // pipe.vae_factor, settings.width // pipe.vae_factor
    repaint_latent = F.interpolate(repaint, size=(h, w)).expand(batch, -1, -1, -1).to(pipe.device)  # nearest

    # Per generator, in diffusers' order: the image's posterior sample (when used), the start
    # noise, the masked image's posterior sample (drawn without encoding when it is unused).
    vae = vae_for(pipe)
    image_latents = None
    if in_channels == 4 or strength < 1.0:
        image_latents = sample_latents(vae, encode_image(pipe, vae, pixels, settings.vae_tiling), generators)
    noise = initial_noise(pipe, settings, generators)
    x = image_latents + float(plan.sigmas[0]) * noise if strength < 1.0 else noise * plan.init_noise_sigma
    masked = encode_image(pipe, vae, pixels * (repaint < 0.5), settings.vae_tiling) if in_channels == 9 else None

    if masked is not None:
        extra = torch.cat([repaint_latent, sample_latents(vae, masked, generators)], dim=1)  # (B, 5, h, w)
        model = guided_model(pipe, conditioning, settings.guidance_scale, extra=extra,
                             cache_interval=settings.cache_interval)
        latents = denoise(pipe, settings, plan, x, model, generators, callback)
    else:
        if not isinstance(vae, (TinyAutoencoder, VQModel)):  # diffusers' tiny and VQ encoders draw nothing either
            skip_posterior_draw((pipe.vae.latent_channels, h, w), vae_dtype(vae), generators)
        model = guided_model(pipe, conditioning, settings.guidance_scale, cache_interval=settings.cache_interval)
        known = KnownRegion(image_latents, 1 - repaint_latent, noise)
        latents = denoise(pipe, settings, plan, x, model, generators, callback, known=known)
    return finish(pipe, settings, latents, pixels if paste_back else None, repaint if paste_back else None)
