"""The full CLIP model: text tower, image tower (ViT) and the two projections.

Used for evaluation (CLIP score) and, with the Shapes World, trained from scratch. The
state dict keys are those of transformers' ``CLIPModel`` (both 4.x and 5.x write the same
keys for the full model)::

    text_model.*                              the text tower, as models/clip.py
    vision_model.embeddings.class_embedding   (D,)
    vision_model.embeddings.patch_embedding.weight     (D, C, p, p), no bias
    vision_model.embeddings.position_embedding.weight  (1 + (S/p)^2, D)
    vision_model.pre_layrnorm.*               (sic: transformers' spelling)
    vision_model.encoder.layers.N.*           same layer as the text tower, not causal
    vision_model.post_layernorm.*             applied to the class token only
    visual_projection.weight, text_projection.weight   (P, D), no bias
    logit_scale                               () log of the softmax temperature

so a transformers ``CLIPModel`` folder loads as an identity copy (``position_ids``
buffers that older files carry are dropped), and :meth:`CLIPModel.save` writes a
folder that ``transformers.CLIPModel.from_pretrained`` reads.

The text tower is the SD 1.x text encoder: :meth:`CLIPModel.text_encoder` returns a
:class:`~latentdiff.models.clip.CLIPTextModel` sharing its weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .clip import _ACTIVATIONS, CLIPEncoder, CLIPTextConfig, CLIPTextModel, CLIPTextTransformer
from .config import ConfigError, ModelConfig, config_error

# OpenAI CLIP's pixel statistics (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# transformers' CLIPTextConfig defaults differ from latentdiff's (which default to the SD 1.x
# text encoder): a CLIPModel config.json that leaves a key out means transformers' value.
_HF_TEXT_DEFAULTS = dict(
    vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=49406,
    eos_token_id=49407, pad_token_id=1, projection_dim=512,
)

ImageLike = Union[Tensor, np.ndarray, Any]  # a tensor, an array or a PIL image
Images = Union[ImageLike, Sequence[ImageLike]]


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(ModelConfig):
    """Config of CLIP's ViT image tower; field names are transformers' CLIPVisionConfig keys.

    Defaults are transformers' (ViT-B/32).
    """

    _class_name = "CLIPVisionModel"

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512  # written by transformers; CLIPConfig.projection_dim is the one used

    @classmethod
    def vit_l14(cls) -> CLIPVisionConfig:
        """OpenAI CLIP ViT-L/14 at 224 px (the image tower paired with SD 1.x's text encoder)."""
        return cls(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   patch_size=14, projection_dim=768)

    @classmethod
    def tiny(cls) -> CLIPVisionConfig:
        """A tiny ViT for tests: 32 px images in 4 px patches (65 tokens)."""
        return cls(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=4, projection_dim=16)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self) -> None:
        if self.hidden_act not in _ACTIVATIONS:
            raise ConfigError(
                f"CLIPVisionConfig.hidden_act must be one of {sorted(_ACTIVATIONS)}, got {self.hidden_act!r}"
            )
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "image_size", "patch_size", "num_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"CLIPVisionConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"CLIPVisionConfig.hidden_size ({self.hidden_size}) is not divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.patch_size > self.image_size:
            raise ConfigError(
                f"CLIPVisionConfig.patch_size ({self.patch_size}) is larger than image_size ({self.image_size})"
            )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("_class_name", None)
        out["model_type"] = "clip_vision_model"
        return out


def _sub_config(
    cls: type[ModelConfig], data: Any, defaults: Mapping[str, Any], what: str, source: str | Path | None = None
) -> Any:
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise config_error(f"CLIPConfig.{what} must be a JSON object, got {type(data).__name__}", source)
    return cls.from_dict({**defaults, **data}, source)


@dataclasses.dataclass(frozen=True)
class CLIPConfig(ModelConfig):
    """Config of the full CLIP model, read from / written as transformers' CLIPModel ``config.json``.

    Defaults are transformers' (ViT-B/32 with a 512-wide text tower).
    """

    _class_name = "CLIPModel"

    text_config: CLIPTextConfig = dataclasses.field(default_factory=lambda: CLIPTextConfig(**_HF_TEXT_DEFAULTS))
    vision_config: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592  # log(1 / 0.07)

    @classmethod
    def vit_l14(cls) -> CLIPConfig:
        """OpenAI CLIP ViT-L/14 (``openai/clip-vit-large-patch14``); its text tower is SD 1.x's."""
        return cls(text_config=CLIPTextConfig.sd15(), vision_config=CLIPVisionConfig.vit_l14(), projection_dim=768)

    @classmethod
    def tiny(cls) -> CLIPConfig:
        """Tiny random-weight CLIP for tests (1000-token vocab, 32 px images, 16-d embeddings)."""
        return cls(text_config=CLIPTextConfig.tiny().replace(projection_dim=16),
                   vision_config=CLIPVisionConfig.tiny(), projection_dim=16)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | Path | None = None) -> CLIPConfig:
        """Build from a transformers CLIPModel config dict.

        Missing sub-config keys take transformers' defaults. As in transformers, the legacy
        ``text_config_dict`` / ``vision_config_dict`` entries of old files, when present, are the
        whole sub-config (completed with defaults), replacing ``text_config`` / ``vision_config``.
        """
        text = data.get("text_config_dict")
        text = data.get("text_config") if text is None else text
        vision = data.get("vision_config_dict")
        vision = data.get("vision_config") if vision is None else vision
        kwargs: dict[str, Any] = {
            "text_config": _sub_config(CLIPTextConfig, text, _HF_TEXT_DEFAULTS, "text_config", source),
            "vision_config": _sub_config(CLIPVisionConfig, vision, {}, "vision_config", source),
        }
        kwargs.update(cls.checked_fields(
            {k: data[k] for k in ("projection_dim", "logit_scale_init_value") if k in data}, source
        ))
        return cls.build_checked(kwargs, source)

    def __post_init__(self) -> None:
        # Allow CLIPConfig(text_config={...}) like transformers.
        if not isinstance(self.text_config, CLIPTextConfig):
            object.__setattr__(self, "text_config",
                               _sub_config(CLIPTextConfig, self.text_config, _HF_TEXT_DEFAULTS, "text_config"))
        if not isinstance(self.vision_config, CLIPVisionConfig):
            object.__setattr__(self, "vision_config",
                               _sub_config(CLIPVisionConfig, self.vision_config, {}, "vision_config"))

    def validate(self) -> None:
        self.text_config.validate()
        self.vision_config.validate()
        if not isinstance(self.projection_dim, int) or self.projection_dim <= 0:
            raise ConfigError(f"CLIPConfig.projection_dim must be a positive integer, got {self.projection_dim!r}")

    def to_dict(self) -> dict[str, Any]:
        """The config as transformers writes it for a CLIPModel."""
        text = self.text_config.to_dict()
        text.pop("architectures", None)
        return {
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
            "text_config": text,
            "vision_config": self.vision_config.to_dict(),
        }


class CLIPVisionEmbeddings(nn.Module):
    """Patchify with a strided convolution, prepend the class token, add learned positions."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.image_size = config.image_size
        d = config.hidden_size
        self.class_embedding = nn.Parameter(torch.randn(d) * d**-0.5)
        self.patch_embedding = nn.Conv2d(
            config.num_channels, d, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(config.num_patches + 1, d)

    def forward(self, pixel_values: Tensor) -> Tensor:
        b, _, h, w = pixel_values.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(
                f"image tower takes {self.image_size}x{self.image_size} pixels, got {h}x{w}: "
                "use image_preprocess() to resize and crop"
            )
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype))  # (B, D, S/p, S/p)
        patches = patches.flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.class_embedding.to(patches.dtype).expand(b, 1, -1)  # (B, 1, D)
        x = torch.cat([cls, patches], dim=1)  # (B, 1 + N, D)
        return x + self.position_embedding.weight  # positions 0..N


class CLIPVisionTransformer(nn.Module):
    """The ``vision_model`` submodule: embeddings -> pre-LN -> bidirectional encoder; post-LN on the class token."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config, causal=False)  # type: ignore[arg-type]
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised pixels (B, C, S, S) -> (last hidden state (B, 1 + N, D), pooled (B, D))."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # (B, 1 + N, D)
        for layer in self.encoder.layers:
            x = layer(x)
        return x, self.post_layernorm(x[:, 0])


class CLIPModel(nn.Module):
    """CLIP: contrastive text and image towers; ``state_dict()`` keys are transformers' CLIPModel's."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.text_model = CLIPTextTransformer(config.text_config)
        self.vision_model = CLIPVisionTransformer(config.vision_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))

    def text_encoder(self) -> CLIPTextModel:
        """The text tower as an SD text encoder (hidden states, ``pooled``), sharing this model's weights."""
        with torch.device("meta"):
            view = CLIPTextModel(self.config.text_config)
        view.text_model = self.text_model
        view.training = self.training
        return view

    def encode_text(self, input_ids: Tensor) -> Tensor:
        """Token ids (B, T) -> text embeddings (B, P): the end-token state, projected, not normalised."""
        return self.text_projection(self.text_encoder().pooled(input_ids))

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """Normalised pixels (B, C, S, S) (see :func:`image_preprocess`) -> image embeddings (B, P), not normalised."""
        _, pooled = self.vision_model(pixel_values)
        return self.visual_projection(pooled)

    def forward(self, input_ids: Tensor, pixel_values: Tensor) -> Tensor:
        """Image-text logits (B_images, B_texts): exp(logit_scale) * cosine similarity.

        Transpose for transformers' ``logits_per_text``.
        """
        image = F.normalize(self.encode_image(pixel_values), dim=-1)
        text = F.normalize(self.encode_text(input_ids), dim=-1)
        return self.logit_scale.exp() * image @ text.t()


def normalize_clip_keys(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Drop the ``position_ids`` buffers older transformers files carry; return (state dict, dropped keys)."""
    kept = {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}
    return kept, sorted(set(state_dict) - set(kept))


# ---------------------------------------------------------------- images

def _one_image(image: ImageLike, channels_last: bool) -> Tensor:
    """One image as a (C, H, W) tensor: uint8 stays uint8, float64 stays float64, other floats become float32."""
    if isinstance(image, Tensor):
        t = image.detach()
        if t.ndim == 2:
            t = t[None]
        elif channels_last or (t.ndim == 3 and t.shape[0] not in (1, 3) and t.shape[-1] in (1, 3)):
            t = t.movedim(-1, 0)
    elif isinstance(image, np.ndarray):
        arr = image if image.ndim == 3 else image[..., None]
        t = torch.from_numpy(np.ascontiguousarray(arr)).movedim(-1, 0)  # arrays are (H, W, C)
    elif hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        t = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).movedim(-1, 0)
    else:
        raise TypeError(f"expected an image tensor, array or PIL image, got {type(image).__name__}")
    if t.ndim != 3 or t.shape[0] not in (1, 3):
        raise ValueError(f"expected an image with 1 or 3 channels, got shape {tuple(t.shape)}")
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    if t.dtype == torch.bool or (not t.is_floating_point() and t.dtype != torch.uint8):
        raise TypeError(f"images must be uint8 (0..255) or floating point (0..1), got {t.dtype}")
    return t if t.dtype in (torch.uint8, torch.float64) else t.float()


def image_list(images: Images) -> list[Tensor]:
    """Split any accepted image input into (3, H, W) tensors (uint8, or float32/float64 in [0, 1]).

    Accepted: a tensor (C, H, W) or (B, C, H, W); a numpy array (H, W, C) or (B, H, W, C)
    (channels last, the numpy/PIL convention; grey (H, W) is allowed); a PIL image; or a
    list of any of these (sizes may differ). Integer images must be uint8 (0..255);
    floating-point images are taken as [0, 1].
    """
    if isinstance(images, Tensor) and images.ndim == 4:
        return [_one_image(i, channels_last=False) for i in images]
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return [_one_image(i, channels_last=True) for i in images]
    if isinstance(images, (list, tuple)):
        return [_one_image(i, channels_last=isinstance(i, np.ndarray)) for i in images]
    return [_one_image(images, channels_last=isinstance(images, np.ndarray))]


def _resize_shortest_side(image: Tensor, size: int) -> Tensor:
    h, w = image.shape[-2:]
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)  # transformers' get_resize_output_image_size
    new_h, new_w = (new_long, size) if w <= h else (size, new_long)
    if (new_h, new_w) == (h, w):
        return image
    x = image[None]
    if image.dtype == torch.uint8:
        # torch's uint8 antialiased bicubic reproduces PIL's 8-bit resampling (within 1-2 levels).
        return F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True)[0]
    # Float images: PIL's float ("F" mode) bicubic, which clamps nothing; clamp to the valid range.
    return F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True)[0].clamp(0, 1)


def _center_crop(image: Tensor, size: int) -> Tensor:
    h, w = image.shape[-2:]
    if h < size or w < size:  # cannot happen after the shortest-side resize
        raise ValueError(f"image {h}x{w} is smaller than the {size}x{size} crop")
    top, left = (h - size) // 2, (w - size) // 2  # transformers' center_crop
    return image[..., top: top + size, left: left + size]


def image_preprocess(
    images: Images,
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> Tensor:
    """Images -> normalised pixels (B, 3, size, size) float32 for :meth:`CLIPModel.encode_image`.

    The steps of transformers' ``CLIPImageProcessor`` (and OpenAI CLIP's ``preprocess``):

    1. resize so the shortest side is ``size`` (the long side becomes ``int(size * long / short)``),
       bicubic with antialiasing, as PIL's ``BICUBIC`` resampling;
    2. centre crop ``size`` x ``size`` (top-left offset ``(extra) // 2``);
    3. scale to [0, 1] (uint8 / 255) and normalise per channel: ``(x - mean) / std``.

    uint8 images are resized in 8 bits, as PIL resizes them: pixels then agree with
    transformers' PIL processor within 1-2 levels of 255 (torch's and PIL's rounding).
    Float images in [0, 1] are resized in float (no rounding to 8 bits, unlike transformers,
    which truncates them to uint8 first) and clamped to [0, 1]. Images already
    ``size`` x ``size`` are not resampled. See :func:`image_list` for the accepted inputs.
    """
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    out = []
    for image in image_list(images):
        image = _center_crop(_resize_shortest_side(image.cpu(), size), size)
        x = image.float() / 255 if image.dtype == torch.uint8 else image
        out.append(((x - mean_t) / std_t).float())
    if not out:
        raise ValueError("no images given")
    return torch.stack(out)  # (B, 3, size, size)
