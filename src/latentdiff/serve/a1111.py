"""A1111's request shapes and what they mean for latentdiff.

The request models declare the fields latentdiff uses, with A1111's defaults; every other
field (``eta``, ``s_churn``, ``sampler_index``, ``script_args``, ``alwayson_scripts``, ...) is
accepted and ignored, as A1111's own models ignore unknown keys. Choices where A1111 gives
latentdiff no exact counterpart:

- width / height default to the model's native size (A1111: 512), img2img's to the init image's;
- ``eta`` and the ``s_*`` k-diffusion knobs are ignored (latentdiff's samplers use their defaults);
- ``inpainting_fill`` works in pixel space before encoding: 0 fills the masked area with the
  mean colour of the rest, 1 keeps the original, 2 puts seeded noise there, 3 mid-grey;
- ``resize_mode`` 3 (latent upscale) resizes like 0.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import random
import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFilter
from PIL.PngImagePlugin import PngInfo
from pydantic import BaseModel, ConfigDict

from ..errors import BadArgument
from ..images import image_from_bytes
from ..schedule import SIGMA_SCHEDULES
from ..settings import HIRES_UPSCALER_NAMES, MAX_SEED, GenerationOptions
from .config import ServeConfig

# A1111 scheduler names -> latentdiff schedule types ("automatic": the sampler's own)
SCHEDULERS = {"automatic": None, **{key: key for key in SIGMA_SCHEDULES}}
UPSCALERS = {name.lower(): key for key, name in HIRES_UPSCALER_NAMES.items()}  # "latent (nearest)" -> "latent-nearest"


class GenerationRequest(BaseModel):
    """Fields txt2img and img2img share."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int | None = None
    height: int | None = None
    override_settings: dict[str, Any] | None = None
    send_images: bool = True


class Txt2ImgRequest(GenerationRequest):
    enable_hr: bool = False
    denoising_strength: float | None = None
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0


class Img2ImgRequest(GenerationRequest):
    init_images: list[str] | None = None
    resize_mode: int = 0
    denoising_strength: float = 0.75
    mask: str | None = None
    mask_blur: int | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    image: str = ""


# ----------------------------------------------------------------------------- checks
def check_limits(req: GenerationRequest, config: ServeConfig) -> None:
    """Per-request limits (4xx naming the field)."""
    for name, value, hi in (("width", req.width, config.max_side), ("height", req.height, config.max_side),
                            ("steps", req.steps, config.max_steps), ("batch_size", req.batch_size, config.max_batch_size),
                            ("n_iter", req.n_iter, config.max_n_iter)):
        if value is not None and not 1 <= value <= hi:
            raise BadArgument(f"{name} must be in 1..{hi} on this server, got {value}")
    if isinstance(req, Txt2ImgRequest) and req.enable_hr:
        for name, value in (("hr_resize_x", req.hr_resize_x), ("hr_resize_y", req.hr_resize_y)):
            if not 0 <= value <= config.max_side:
                raise BadArgument(f"{name} must be in 0..{config.max_side} on this server, got {value}")
        if not 1.0 <= req.hr_scale <= 8.0:
            raise BadArgument(f"hr_scale must be in 1..8, got {req.hr_scale}")
        if req.hr_second_pass_steps and not 1 <= req.hr_second_pass_steps <= config.max_steps:
            raise BadArgument(f"hr_second_pass_steps must be in 0..{config.max_steps} on this server")


def decode_base64(data: str, what: str) -> bytes:
    """The bytes of a base64 image, raw or as a ``data:`` URL (never a URL to fetch)."""
    if not isinstance(data, str) or not data:
        raise BadArgument(f"{what} must be a base64-encoded image")
    if data.startswith("data:"):
        header, sep, data = data.partition(",")
        if not sep or ";base64" not in header:
            raise BadArgument(f"{what}: a data: URL must be base64 (data:image/png;base64,...)")
    elif data.startswith(("http://", "https://", "file:")):
        raise BadArgument(f"{what}: images are sent as base64, not as URLs (this server fetches nothing)")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadArgument(f"{what} is not valid base64") from None


def decode_image(data: str, what: str, max_pixels: int) -> Image.Image:
    """A base64 image (:func:`decode_base64`), checked and decoded as :func:`~latentdiff.images.open_image` does."""
    return image_from_bytes(decode_base64(data, what), what=what, max_pixels=max_pixels)


def encode_png(image: Image.Image) -> str:
    """Base64 PNG (no data: prefix, as A1111 answers) carrying the image's infotext."""
    info = PngInfo()
    if image.info.get("parameters"):
        info.add_text("parameters", image.info["parameters"])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------- mapping
@dataclass
class Plan:
    """A request turned into latentdiff terms: the options of the first batch and the loop."""

    prompt: str
    options: GenerationOptions
    n_iter: int
    seed: int
    subseed: int
    clip_skip: int = 1
    checkpoint: str | None = None  # override_settings' sd_model_checkpoint

    def batch_options(self, k: int) -> GenerationOptions:
        """Batch k of n_iter: A1111 continues the seeds over all images."""
        shift = k * self.options.images_per_prompt
        subseed = self.subseed + shift if self.options.subseed_strength > 0 else None
        return dataclasses.replace(self.options, seed=self.seed + shift, subseed=subseed)


def _seed(name: str, value: int) -> int:
    if value == -1:
        return random.randint(0, MAX_SEED)
    if not 0 <= value <= MAX_SEED:
        raise BadArgument(f"{name} must be -1 (random) or in 0..{MAX_SEED}, got {value}")
    return value


def plan_request(req: GenerationRequest, config: ServeConfig, *, strength: float | None = None,
                 default_size: tuple[int, int] | None = None, clip_skip: int = 1) -> Plan:
    """Map a request onto :class:`GenerationOptions` (validated later by the pipeline);
    ``clip_skip`` is the server's option, which ``override_settings`` may replace."""
    check_limits(req, config)
    sampler = req.sampler_name or req.sampler_index or "Euler"
    scheduler_name = (req.scheduler or "automatic").strip().lower().replace(" ", "_")
    if scheduler_name not in SCHEDULERS:
        raise BadArgument(f"scheduler {req.scheduler!r} is not one latentdiff has; known: "
                          f"{', '.join(SCHEDULERS)}")
    overrides = dict(req.override_settings or {})
    clip_skip = overrides.pop("CLIP_stop_at_last_layers", clip_skip)
    checkpoint = overrides.pop("sd_model_checkpoint", None)
    width = req.width if req.width is not None else (default_size[0] if default_size else None)
    height = req.height if req.height is not None else (default_size[1] if default_size else None)
    extra: dict[str, Any] = {}
    if isinstance(req, Txt2ImgRequest) and req.enable_hr:
        scale = req.hr_scale
        if (req.hr_resize_x or req.hr_resize_y) and width and height:
            scale = max(req.hr_resize_x / width, req.hr_resize_y / height)
        upscaler = UPSCALERS.get((req.hr_upscaler or "Latent").strip().lower())
        if upscaler is None:
            raise BadArgument(f"hr_upscaler {req.hr_upscaler!r} is not one latentdiff has; known: "
                              f"{', '.join(HIRES_UPSCALER_NAMES.values())}")
        extra = dict(hires_scale=max(1.0, scale), hires_steps=req.hr_second_pass_steps or None,
                     hires_strength=0.7 if req.denoising_strength is None else req.denoising_strength,
                     hires_upscaler=upscaler)
    options = GenerationOptions(
        negative_prompt=req.negative_prompt, width=width, height=height, steps=req.steps,
        guidance_scale=req.cfg_scale, sampler=sampler, schedule=SCHEDULERS[scheduler_name],
        subseed_strength=req.subseed_strength, images_per_prompt=req.batch_size, clip_skip=clip_skip,
        strength=strength, **extra,
    )
    return Plan(req.prompt, options, req.n_iter, _seed("seed", req.seed),
                _seed("subseed", req.subseed), clip_skip, checkpoint)


# ----------------------------------------------------------------------------- img2img inputs
def resize_to(image: Image.Image, size: tuple[int, int], mode: int) -> Image.Image:
    """A1111's resize modes: 0 stretch, 1 crop to fill, 2 fit and pad with stretched edges; 3 as 0."""
    width, height = size
    if image.size == size:
        return image
    if mode not in (1, 2):
        return image.resize(size, Image.LANCZOS)
    ratio = width / height
    src_ratio = image.width / image.height
    if (mode == 1) == (ratio > src_ratio):
        fit = (width, max(1, round(width * image.height / image.width)))
    else:
        fit = (max(1, round(height * image.width / image.height)), height)
    resized = image.resize(fit, Image.LANCZOS)
    left, top = (width - fit[0]) // 2, (height - fit[1]) // 2
    if mode == 1:  # centred crop
        return resized.crop((-left, -top, -left + width, -top + height))
    pixels = np.asarray(resized)  # fit and pad: the edges stretched into the padding, as outpainting's "edge" fill
    pad = ((top, height - fit[1] - top), (left, width - fit[0] - left)) + (((0, 0),) if pixels.ndim == 3 else ())
    return Image.fromarray(np.pad(pixels, pad, mode="edge"))


def prepare_mask(mask: Image.Image, size: tuple[int, int], req: Img2ImgRequest) -> Image.Image:
    """Grey mask at ``size``, inverted and blurred as asked (white = repaint)."""
    mask = resize_to(mask.convert("L"), size, req.resize_mode)
    if req.inpainting_mask_invert:
        mask = Image.eval(mask, lambda v: 255 - v)
    blur = req.mask_blur if req.mask_blur is not None else max(req.mask_blur_x, req.mask_blur_y)
    if not 0 <= blur <= 64:
        raise BadArgument(f"mask_blur must be in 0..64, got {blur}")
    if blur:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    return mask


def fill_masked(image: Image.Image, mask: Image.Image, mode: int, seed: int) -> Image.Image:
    """``inpainting_fill`` in pixel space (see the module docstring)."""
    if mode not in (0, 1, 2, 3):
        raise BadArgument(f"inpainting_fill must be 0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing), got {mode}")
    if mode == 1:
        return image
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    inside = (np.asarray(mask, dtype=np.float32) / 255.0)[..., None]  # (H, W, 1)
    if mode == 0:
        weight = 1.0 - inside
        fill = (pixels * weight).sum((0, 1)) / max(float(weight.sum()), 1.0)
        replacement = np.broadcast_to(fill, pixels.shape)
    elif mode == 2:
        replacement = np.random.default_rng(seed).uniform(0, 255, pixels.shape).astype(np.float32)
    else:
        replacement = np.full_like(pixels, 127.5)
    out = pixels * (1 - inside) + replacement * inside
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def full_res_box(mask: Image.Image, padding: int, size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """A1111's "inpaint only masked" crop: the mask's bounding box plus ``padding``, grown to the
    target aspect ratio and kept inside the image; None for an empty mask."""
    bbox = mask.point(lambda v: 255 if v > 0 else 0).getbbox()
    if bbox is None:
        return None
    x0, y0, x1, y1 = bbox
    x0, y0, x1, y1 = max(0, x0 - padding), max(0, y0 - padding), min(mask.width, x1 + padding), min(mask.height, y1 + padding)
    ratio = size[0] / size[1]
    w, h = x1 - x0, y1 - y0
    if w / h < ratio:
        grow = round(h * ratio) - w
        x0, x1 = x0 - grow // 2, x1 + grow - grow // 2
    else:
        grow = round(w / ratio) - h
        y0, y1 = y0 - grow // 2, y1 + grow - grow // 2
    dx = -x0 if x0 < 0 else min(0, mask.width - x1)
    dy = -y0 if y0 < 0 else min(0, mask.height - y1)
    x0, x1, y0, y1 = x0 + dx, x1 + dx, y0 + dy, y1 + dy
    return max(0, x0), max(0, y0), min(mask.width, x1), min(mask.height, y1)


# ----------------------------------------------------------------------------- answers
def info_json(plan: Plan, settings_list: list, images: list[Image.Image], seeds: list[int], subseeds: list[int],
              model: Any, req: GenerationRequest, job_timestamp: str) -> str:
    """The ``info`` string of a response, with A1111's keys."""
    first = settings_list[0] if settings_list else None
    infotexts = [im.info.get("parameters", "") for im in images]
    return json.dumps({
        "prompt": plan.prompt, "all_prompts": [plan.prompt] * len(images),
        "negative_prompt": req.negative_prompt, "all_negative_prompts": [req.negative_prompt] * len(images),
        "seed": seeds[0] if seeds else plan.seed, "all_seeds": seeds,
        "subseed": subseeds[0] if subseeds else plan.subseed, "all_subseeds": subseeds,
        "subseed_strength": req.subseed_strength,
        "width": first.width if first else req.width, "height": first.height if first else req.height,
        "sampler_name": first.sampler.name if first else req.sampler_name,
        "cfg_scale": req.cfg_scale, "steps": req.steps, "batch_size": req.batch_size,
        "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model.model_name, "sd_model_hash": model.short_hash, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": getattr(req, "denoising_strength", None),
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infotexts, "styles": req.styles or [],
        "job_timestamp": job_timestamp, "clip_skip": plan.clip_skip, "is_using_inpainting_conditioning": False,
        "version": "latentdiff",
    })


def parameters_of(req: GenerationRequest, plan: Plan) -> dict[str, Any]:
    """The request with its defaults filled in (A1111's ``parameters``); images are left out."""
    out = req.model_dump()
    out.pop("init_images", None)
    out.pop("mask", None)
    out.update(seed=plan.seed, subseed=plan.subseed, width=plan.options.width, height=plan.options.height,
               sampler_name=plan.options.sampler, scheduler=req.scheduler or "automatic")
    return out


def parse_infotext(text: str) -> dict[str, Any]:
    """A1111's ``png-info`` ``parameters``: prompt, negative prompt and the settings line as a dict."""
    from ..png import parse_parameters

    prompt, negative = parse_parameters(text)
    last = text.split("\n")[-1]
    out: dict[str, Any] = {"Prompt": prompt, "Negative prompt": negative}
    if last.startswith("Steps: "):
        for item in _split_fields(last):
            key, sep, value = item.partition(": ")
            if sep:
                out[key.strip()] = value.strip()
    return out


def _split_fields(line: str) -> list[str]:
    """Split ``a: 1, b: "x, y", c: 3`` at commas outside quotes."""
    items, current, quoted = [], [], False
    for ch in line:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            items.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    if current:
        items.append("".join(current).strip())
    return items
