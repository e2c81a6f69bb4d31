"""Zero-shot evaluation of a world CLIP, and the batched encode helpers it (and the CLIP trainer) uses.

    result = zero_shot_accuracy(model, tokenizer, n=400)
    result["accuracy"], result["accuracy_1obj"], result["accuracy_2obj"], result["pairwise"]

For held-out full captions, an image is rendered from the caption and the caption is ranked among
itself and 8 one-attribute variants (:func:`~latentdiff.world.dataset.zero_shot_candidates`) by
cosine similarity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..checkpoints.io import atomic_path
from ..models.clip_model import CLIPModel, image_preprocess
from ..models.tokenizer import CLIPTokenizer
from ..world.captions import parse_caption, scene_from_caption
from ..world.dataset import held_out_prompts, zero_shot_candidates
from ..world.negatives import attribute_difference
from ..world.render import render


def world_pixels(images: np.ndarray | Tensor | Sequence[np.ndarray], size: int) -> Tensor:
    """uint8 world images -> CLIP's normalised pixels (B, 3, size, size), as ``clip_scores`` prepares them."""
    return image_preprocess(images, size=size)


def encode_text_by_length(model: CLIPModel, ids: Tensor, chunk: int = 128) -> Tensor:
    """``model.encode_text(ids)`` (N, P), run on chunks of texts of similar length, each cut after its
    longest text's end token: the same values (up to rounding) with about a quarter less work than
    padding every text to the longest of the batch (world captions are 5 to 23 tokens)."""
    eos = model.config.text_config.eos_token_id
    lengths = (ids == eos).int().argmax(dim=1) + 1  # (N,)
    order = torch.argsort(lengths, stable=True)
    parts = []
    for i in range(0, len(order), chunk):
        rows = order[i : i + chunk]
        parts.append(model.encode_text(ids[rows, : int(lengths[rows].max())]))
    return torch.cat(parts)[torch.argsort(order)]


@torch.no_grad()
def encode_texts(model: CLIPModel, tokenizer: CLIPTokenizer, texts: Sequence[str], batch_size: int = 512) -> Tensor:
    """Normalised text embeddings (N, P), float32 on the model's device."""
    device = model.logit_scale.device
    out = [encode_text_by_length(model, tokenizer(list(texts[i : i + batch_size])).to(device)).float()
           for i in range(0, len(texts), batch_size)]
    return F.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def encode_images(model: CLIPModel, images: Sequence[np.ndarray], batch_size: int = 256) -> Tensor:
    """Normalised image embeddings (N, P) of uint8 (H, W, 3) world images."""
    device = model.logit_scale.device
    size = model.config.vision_config.image_size
    out = [model.encode_image(world_pixels(np.stack(images[i : i + batch_size]), size).to(device)).float()
           for i in range(0, len(images), batch_size)]
    return F.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def zero_shot_accuracy(model: CLIPModel, tokenizer: CLIPTokenizer, n: int = 400, seed: int = 0) -> dict[str, Any]:
    """Top-1 accuracy of the true caption among itself and 8 one-attribute variants.

    The first ``n`` held-out prompts (alternately one and two objects); prompt ``i``'s image is
    ``render(scene_from_caption(prompt, default_rng([seed, i])))``. Returns ``accuracy``,
    ``accuracy_1obj``, ``accuracy_2obj``, ``n``, and ``pairwise``: per variant kind, the fraction
    of (image, variant) pairs where the true caption scores higher (what the model confuses).
    """
    prompts = held_out_prompts(n)
    images = [render(scene_from_caption(p, np.random.default_rng([seed, i]))) for i, p in enumerate(prompts)]
    candidates = [zero_shot_candidates(p) for p in prompts]
    was_training = model.training
    model.eval()
    try:
        image_emb = encode_images(model, images)  # (n, P)
        text_emb = encode_texts(model, tokenizer, [t for c in candidates for t in c])  # (9n, P)
    finally:
        model.train(was_training)
    sims = torch.einsum("np,ncp->nc", image_emb, text_emb.view(len(prompts), -1, text_emb.shape[-1])).cpu()
    correct = (sims.argmax(dim=1) == 0).numpy()
    counts = np.array([len(parse_caption(p).objects) for p in prompts])
    wins: dict[str, list[bool]] = {}
    for row, cands in enumerate(candidates):
        spec = parse_caption(cands[0])
        for col, text in enumerate(cands[1:], start=1):
            kind = attribute_difference(spec, parse_caption(text)) or "other"
            wins.setdefault(kind, []).append(bool(sims[row, 0] > sims[row, col]))

    def mean(values: np.ndarray) -> float:
        return float(values.mean()) if values.size else float("nan")

    return {
        "accuracy": mean(correct),
        "accuracy_1obj": mean(correct[counts == 1]),
        "accuracy_2obj": mean(correct[counts == 2]),
        "n": int(n),
        "pairwise": {kind: float(np.mean(v)) for kind, v in sorted(wins.items())},
    }


def _bar_chart(values: dict[str, float], title: str, path: Path) -> None:
    """A small PNG bar chart (values in [0, 1])."""
    from PIL import Image, ImageDraw

    width, row, left = 360, 18, 120
    image = Image.new("RGB", (width, 24 + row * len(values) + 6), "white")
    draw = ImageDraw.Draw(image)
    draw.text((6, 4), title, fill="black")
    for i, (name, value) in enumerate(values.items()):
        top = 24 + i * row
        v = 0.0 if not math.isfinite(value) else min(max(value, 0.0), 1.0)
        draw.text((6, top + 2), name, fill="black")
        draw.rectangle([left, top + 2, left + int(v * (width - left - 50)), top + row - 4], fill=(60, 110, 200))
        draw.text((width - 44, top + 2), f"{value:.3f}", fill="black")
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")

