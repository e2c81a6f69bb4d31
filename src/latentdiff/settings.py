"""What a generation is asked for: the options object, their validation, seeds and the infotext.

:class:`GenerationOptions` is what callers build (keyword-only, every field has a default);
:func:`resolve` checks it against a pipeline and returns the frozen :class:`Settings` the
generation loop runs on (every value validated, seeds expanded to one per image).  The
pipeline methods, the CLI and the evaluation runner all go through it.

Seeds follow AUTOMATIC1111: image ``i`` of a call uses ``seed + i`` (or ``seed[i]`` when a
sequence is given); ``seed=-1`` picks a random seed (recorded in the infotext).  Variation
seeds (``subseed``, ``subseed_strength``) blend each image's noise with the noise of
``subseed + i`` by A1111's slerp (:func:`variation_noise`).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .adapters.prompt_loras import PromptLora, resolve_prompt_loras, strip_tags
from .errors import BadArgument
from .samplers import SamplerSpec, get_sampler

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = ["GenerationOptions", "Settings", "resolve", "variation_noise", "MAX_SEED", "MAX_STEPS"]

MAX_SEED = 2**32 - 1  # A1111's seeds are 32-bit
HIRES_UPSCALER_NAMES = {"latent": "Latent", "latent-nearest": "Latent (nearest)", "lanczos": "Lanczos"}
MAX_STEPS = 1000
OUTPUT_TYPES = ("pil", "latent")


@dataclass(frozen=True, kw_only=True)
class GenerationOptions:
    """The settings of one generation call, all keyword-only.

    ``width``/``height`` default to the model's native size (img2img/inpainting: the input
    image's).  ``clip_skip`` has A1111's meaning: 1 = the text encoder's last layer (no skip),
    2 = the penultimate one.  (diffusers counts from 0: its ``clip_skip=1`` is A1111's 2.)
    ``schedule`` is A1111's schedule type for the k-samplers ("karras", "exponential",
    "sgm_uniform"; None = the sampler's own).  ``output_type="latent"`` returns the final
    scaled latents (B, C, h, w) float32 instead of images.  ``cache_interval`` N > 1 turns on
    DeepCache: one full UNet call in N, the others reuse its deep features (faster, approximate).
    """

    negative_prompt: str | Sequence[str] = ""
    width: int | None = None
    height: int | None = None
    steps: int = 20
    guidance_scale: float = 7.5
    sampler: str = "ddim"
    schedule: str | None = None
    seed: int | Sequence[int] = 0
    subseed: int | Sequence[int] | None = None
    subseed_strength: float = 0.0
    images_per_prompt: int = 1
    eta: float = 0.0
    clip_skip: int = 1
    strength: float | None = None
    output_type: str = "pil"
    vae_tiling: bool = False
    hires_scale: float = 1.0
    hires_steps: int | None = None
    hires_strength: float = 0.7
    hires_upscaler: str = "latent"
    cache_interval: int = 1


@dataclass(frozen=True)
class Settings:
    """Validated settings of one call (see :func:`resolve`); also what the PNG infotext records."""

    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]
    width: int
    height: int
    steps: int
    guidance_scale: float
    sampler: SamplerSpec
    seeds: tuple[int, ...]  # one per image
    subseeds: tuple[int, ...] | None = None  # one per image when subseed_strength > 0
    subseed_strength: float = 0.0
    images_per_prompt: int = 1
    eta: float = 0.0
    clip_skip: int = 1
    strength: float | None = None
    output_type: str = "pil"
    vae_tiling: bool = False
    hires_scale: float = 1.0
    hires_steps: int | None = None
    hires_strength: float = 0.7
    hires_upscaler: str = "latent"
    hires_size: tuple[int, int] | None = None  # (width, height) of the hires pass
    hires_base: tuple[int, int, int] | None = None  # in the second pass: the first's (width, height, steps)
    cache_interval: int = 1  # DeepCache: one full UNet call in this many (1: off)
    model: str = field(default="", compare=False)
    ti_hashes: str = field(default="", compare=False)  # A1111's "TI hashes" value ("" when none used)
    lora_hashes: str = field(default="", compare=False)  # A1111's "Lora hashes" of the loaded LoRAs
    loras: tuple[PromptLora, ...] = field(default=(), compare=False)  # the prompts' <lora:...> tags, resolved

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.images_per_prompt

    def prompt_of(self, index: int) -> str:
        return self.prompts[index // self.images_per_prompt]

    def hires_settings(self) -> Settings:
        """The settings of the hires-fix second pass (img2img at the large size)."""
        width, height = self.hires_size
        return replace(self, width=width, height=height, steps=self.hires_steps or self.steps,
                       strength=self.hires_strength, hires_size=None,
                       hires_base=(self.width, self.height, self.steps))

    def generators(self) -> list[torch.Generator]:
        """One CPU generator per image, seeded with that image's seed."""
        return [torch.Generator("cpu").manual_seed(s) for s in self.seeds]

    def infotext(self, index: int) -> str:
        """AUTOMATIC1111's ``parameters`` text for image ``index`` of this call."""
        negative = self.negative_prompts[index // self.images_per_prompt]
        fields = [f"Steps: {self.steps}", f"Sampler: {self.sampler.name}"]
        if self.sampler.sigma_schedule:
            fields.append(f"Schedule type: {self.sampler.schedule_name}")
        fields += [f"CFG scale: {self.guidance_scale:g}", f"Seed: {self.seeds[index]}",
                   f"Size: {self.width}x{self.height}"]
        if self.model:
            fields.append(f"Model: {self.model}")
        if self.subseeds is not None:
            fields += [f"Variation seed: {self.subseeds[index]}", f"Variation seed strength: {self.subseed_strength:g}"]
        if self.strength is not None:
            fields.append(f"Denoising strength: {self.strength:g}")
        if self.hires_scale > 1.0:  # A1111 records the base size and the hires settings
            base_w, base_h, base_steps = self.hires_base or (self.width, self.height, self.steps)
            fields[fields.index(f"Size: {self.width}x{self.height}")] = f"Size: {base_w}x{base_h}"
            fields[0] = f"Steps: {base_steps}"
            fields += [f"Hires upscale: {self.hires_scale:g}", f"Hires steps: {self.hires_steps or base_steps}",
                       f"Hires upscaler: {HIRES_UPSCALER_NAMES[self.hires_upscaler]}"]
            if self.strength is None:
                fields.append(f"Denoising strength: {self.hires_strength:g}")
        if self.eta and self.sampler.id == "ddim":
            fields.append(f"Eta: {self.eta:g}")
        if self.clip_skip != 1:
            fields.append(f"Clip skip: {self.clip_skip}")
        if self.cache_interval > 1:
            fields.append(f"DeepCache interval: {self.cache_interval}")
        if self.lora_hashes:
            fields.append(f"Lora hashes: {json.dumps(self.lora_hashes, ensure_ascii=False)}")
        if self.ti_hashes:
            fields.append(f"TI hashes: {json.dumps(self.ti_hashes, ensure_ascii=False)}")  # A1111's quote()
        lines = [self.prompt_of(index)]
        if negative:
            lines.append(f"Negative prompt: {negative}")
        lines.append(", ".join(fields))
        return "\n".join(lines)


# ----------------------------------------------------------------------------- checks
def _integer(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadArgument(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise BadArgument(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _number(name: str, value: object, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadArgument(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise BadArgument(f"{name} must be a finite number, got {value}")
    if not lo <= value <= hi:
        raise BadArgument(f"{name} must be in [{lo:g}, {hi:g}], got {value:g}")
    return value


def _texts(name: str, value: object) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
        raise BadArgument(f"{name} must be a string or a non-empty list of strings, got {value!r}")
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # e.g. undecodable command-line bytes, kept as surrogates
            raise BadArgument(f"{name} is not valid UTF-8 text: {text.encode('utf-8', 'replace')[:60]!r}") from None
    return list(texts)


def _seeds(name: str, value: object, count: int) -> tuple[int, ...]:
    """``seed + i`` for an int (-1: a random one), or one seed per image from a sequence."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise BadArgument(f"got {len(value)} values for {name} for {count} images")
        return tuple(_integer(f"{name}[{i}]", s, 0, MAX_SEED) for i, s in enumerate(value))
    first = _integer(name, value, -1, MAX_SEED)
    if first == -1:
        first = random.randrange(MAX_SEED + 1 - count)
    if first + count - 1 > MAX_SEED:
        raise BadArgument(f"{name} {first} + {count} images exceeds the largest seed {MAX_SEED}")
    return tuple(first + i for i in range(count))


def resolve(pipe: Pipeline, prompts: str | Sequence[str], options: GenerationOptions, *,
            size: tuple[int, int] | None = None) -> Settings:
    """Check every option against ``pipe`` and name the one that is wrong (:class:`BadArgument`).

    ``size`` is the default (width, height) when the options leave them unset (an input image's
    size); otherwise the model's native size.
    """
    if not isinstance(options, GenerationOptions):
        raise BadArgument(f"options must be a GenerationOptions, got {type(options).__name__}")
    prompt_list = _texts("prompts", prompts)
    negatives = _texts("negative_prompt", options.negative_prompt)
    if isinstance(options.negative_prompt, str):
        negatives = negatives * len(prompt_list)
    if len(negatives) != len(prompt_list):
        raise BadArgument(f"got {len(negatives)} negative prompts for {len(prompt_list)} prompts")
    factor = pipe.vae_factor
    default_w, default_h = size or (pipe.native_size, pipe.native_size)
    dims = {}
    for name, value, default in (("width", options.width, default_w), ("height", options.height, default_h)):
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % factor:
            raise BadArgument(f"{name} {value!r} is not a positive multiple of the VAE factor {factor}")
        dims[name] = value
    steps = _integer("steps", options.steps, 1, MAX_STEPS)
    guidance = _number("guidance_scale", options.guidance_scale, 0.0, 100.0)
    if not isinstance(options.sampler, str):
        raise BadArgument(f"sampler must be a string (an id or A1111 name), got {options.sampler!r}")
    if options.schedule is not None and not isinstance(options.schedule, str):
        raise BadArgument(f"schedule must be a string or None, got {options.schedule!r}")
    try:
        sampler = get_sampler(options.sampler, options.schedule)
    except ValueError as err:
        raise BadArgument(str(err)) from None
    per_prompt = _integer("images_per_prompt", options.images_per_prompt, 1, 10_000)
    batch = len(prompt_list) * per_prompt
    seeds = _seeds("seed", options.seed, batch)
    strength_of_variation = _number("subseed_strength", options.subseed_strength, 0.0, 1.0)
    subseeds = None
    if strength_of_variation > 0:
        subseeds = _seeds("subseed", -1 if options.subseed is None else options.subseed, batch)
    eta = _number("eta", options.eta, 0.0, 1.0)
    layers = pipe.text_encoder.config.num_hidden_layers
    clip_skip = _integer("clip_skip", options.clip_skip, 1, layers)
    strength = None if options.strength is None else _number("strength", options.strength, 0.0, 1.0)
    if options.output_type not in OUTPUT_TYPES:
        raise BadArgument(f"output_type must be one of {OUTPUT_TYPES}, got {options.output_type!r}")
    if not isinstance(options.vae_tiling, bool):
        raise BadArgument(f"vae_tiling must be True or False, got {options.vae_tiling!r}")
    hires_scale = _number("hires_scale", options.hires_scale, 1.0, 8.0)
    hires_steps = None if options.hires_steps is None else _integer("hires_steps", options.hires_steps, 1, MAX_STEPS)
    hires_strength = _number("hires_strength", options.hires_strength, 0.0, 1.0)
    if options.hires_upscaler not in HIRES_UPSCALER_NAMES:
        raise BadArgument(f"hires_upscaler must be one of {', '.join(HIRES_UPSCALER_NAMES)}, "
                          f"got {options.hires_upscaler!r}")
    cache_interval = _integer("cache_interval", options.cache_interval, 1, MAX_STEPS)
    hires_size = None
    if hires_scale > 1.0:
        if strength is not None:
            raise BadArgument("hires_scale applies to txt2img only (its strength is hires_strength)")
        hires_size = (int(dims["width"] * hires_scale) // factor * factor,
                      int(dims["height"] * hires_scale) // factor * factor)
    loras = resolve_prompt_loras(prompt_list + negatives, getattr(pipe, "lora_dirs", ()))
    return Settings(
        tuple(prompt_list), tuple(negatives), dims["width"], dims["height"], steps, guidance, sampler, seeds,
        subseeds, strength_of_variation, per_prompt, eta, clip_skip, strength, options.output_type,
        options.vae_tiling, hires_scale, hires_steps, hires_strength, options.hires_upscaler, hires_size,
        None, cache_interval, pipe.name, ti_hashes=_ti_hashes(pipe, [strip_tags(p) for p in prompt_list],
                                              [strip_tags(n) for n in negatives]),
        lora_hashes=_lora_hashes(pipe, loras), loras=loras,
    )


def _lora_hashes(pipe: Pipeline, tagged: tuple[PromptLora, ...]) -> str:
    """A1111's "Lora hashes" value of the LoRAs loaded into ``pipe`` and of those the prompts
    tag: "name: hash, ..."."""
    state = getattr(pipe, "lora_state", None)
    loaded = [(name, lora.hash) for name, lora in (state.loaded.items() if state is not None else ())
              if not name.startswith("<lora:")]  # (a tagged LoRA merged by an enclosing call)
    loaded += [(lora.name, lora.hash) for lora in tagged]
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {digest}" for name, digest in loaded)


def _ti_hashes(pipe: Pipeline, prompts: list[str], negatives: list[str]) -> str:
    """A1111's "TI hashes" of the textual-inversion embeddings the prompts use ("" when none)."""
    if not getattr(pipe, "embeddings", None):
        return ""
    from .adapters.embeddings import ti_hashes_field

    return ti_hashes_field(pipe, prompts, negatives)


# ----------------------------------------------------------------------------- variation seeds
def slerp(t: float, low: Tensor, high: Tensor) -> Tensor:
    """A1111's spherical interpolation of two noises of shape (C, H, W), normalised along dim 1
    (the H axis, as A1111 does); close to parallel it falls back to ``low * t + high * (1 - t)``
    (A1111's formula, weights as written there)."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)  # (C, W)
    if dot.mean() > 0.9995:
        return low * t + high * (1 - t)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - t) * omega) / so).unsqueeze(1) * low + (torch.sin(t * omega) / so).unsqueeze(1) * high


def variation_noise(noise: Tensor, settings: Settings) -> Tensor:
    """Blend each image's noise (B, C, h, w) with the first draw of its variation seed, as A1111:
    ``slerp(subseed_strength, noise, noise(subseed))``; unchanged without variation seeds."""
    if settings.subseeds is None:
        return noise
    out = []
    for i, sub in enumerate(settings.subseeds):
        subnoise = torch.randn(tuple(noise.shape[1:]), generator=torch.Generator("cpu").manual_seed(sub))
        out.append(slerp(settings.subseed_strength, noise[i], subnoise))
    return torch.stack(out)
