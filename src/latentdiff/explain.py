"""A look inside a generation: per-word cross-attention maps and the predicted x0 at every step.

    result = pipe.attention_maps("a red circle in the top left", seed=0)
    result.words                 # ["a", "red", "circle", "in", "the", "top", "left"]
    result.maps                  # (7, H, W): each word's map at image resolution
    result.save("explain.png")   # image + one overlay per word, then x0 across the steps

While the image is generated, a forward hook on every cross-attention layer (``attn2`` of the
UNet's transformer blocks) recomputes that layer's attention probabilities
``softmax(q k^T / sqrt(d))`` (the layer itself runs fused, unchanged), keeps the prompt's half
of the classifier-free-guidance batch, averages over heads, and adds the map of each text
position, upsampled bilinearly from the layer's resolution to the image's. The result is the
mean over layers and steps; a word's map is the mean of its tokens' maps. Only the first
75-token chunk of a prompt is mapped.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from .checkpoints.io import atomic_path

if TYPE_CHECKING:
    from .pipeline import Pipeline


def prompt_words(tokenizer: Any, prompt: str) -> list[tuple[str, list[int]]]:
    """The prompt's words and the context positions of their tokens (position 0 is the start token).

    Words are the runs of letters, digits and apostrophes; each punctuation mark is a word too.
    Tokens past the first 75 are left out.
    """
    words = re.findall(r"[\w']+|[^\w\s]", prompt.lower())
    out, position = [], 1
    for word in words:
        ids = tokenizer.encode(word)
        positions = [p for p in range(position, position + len(ids)) if p <= tokenizer.model_max_length - 2]
        position += len(ids)
        if positions:
            out.append((word, positions))
    return out


@torch.no_grad()
def cross_attention_probs(module: nn.Module, x: Tensor, context: Tensor) -> Tensor:
    """An :class:`~latentdiff.models.layers.Attention` layer's probabilities softmax(q k^T / sqrt(d)),
    float32 (B, heads, N, M), for queries from ``x`` (B, N, C) and keys from ``context`` (B, M, Cctx)."""
    q, k = module.to_q(x).float(), module.to_k(context).float()  # type: ignore[operator]
    b, n, inner = q.shape
    heads = module.heads  # type: ignore[attr-defined]
    d = inner // heads
    q = q.view(b, n, heads, d).transpose(1, 2)  # (B, heads, N, d)
    k = k.view(b, -1, heads, d).transpose(1, 2)  # (B, heads, M, d)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)


class CrossAttentionRecorder:
    """Forward hooks on a UNet's cross-attention layers that sum their maps per text position."""

    def __init__(self, unet: nn.Module, latent_size: tuple[int, int], batch: int = 1) -> None:
        self.latent_size, self.batch = latent_size, batch
        self.total: Tensor | None = None  # (B, M, h, w) sum of maps at latent resolution
        self.calls = 0
        self.layers = [m for name, m in unet.named_modules() if name.endswith("attn2")]
        self._hooks = [m.register_forward_hook(self._hook) for m in self.layers]

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        x, context = inputs[0], inputs[1]  # (B, HW, C), (B, M, Cctx)
        if x.shape[0] == 2 * self.batch:  # guided: [unconditional, conditional], keep the prompt's half
            x, context = x.chunk(2)[1], context.chunk(2)[1]
        probs = cross_attention_probs(module, x, context).mean(dim=1)  # (B, HW, M)
        b, n, m = probs.shape
        h, w = self._grid(n)
        maps = probs.transpose(1, 2).reshape(b, m, h, w)  # (B, M, h, w)
        maps = F.interpolate(maps, size=self.latent_size, mode="bilinear", align_corners=False)
        self.total = maps if self.total is None else self.total + maps
        self.calls += 1

    def _grid(self, n: int) -> tuple[int, int]:
        """(h, w) of a layer with ``n`` positions: the latent size divided by a power of two."""
        h, w = self.latent_size
        while h * w > n:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        if h * w != n:
            raise ValueError(f"cannot place {n} attention positions on a {self.latent_size} latent")
        return h, w

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def mean(self) -> Tensor:
        """(B, M, h, w): the maps averaged over layers and steps."""
        if self.total is None:
            raise RuntimeError("no cross-attention layer ran")
        return self.total / self.calls


@dataclass
class Explanation:
    """What :func:`attention_maps` found for one prompt."""

    prompt: str
    image: Image.Image
    words: list[str]
    maps: Tensor  # (words, H, W) float32 at image resolution, each word's mean attention
    x0_steps: list[Image.Image] = field(default_factory=list)  # the predicted x0, decoded, step by step

    def peak(self, word_index: int) -> tuple[int, int]:
        """Pixel ``(x, y)`` where word ``word_index``'s map is largest."""
        flat = int(self.maps[word_index].argmax())
        return flat % self.maps.shape[-1], flat // self.maps.shape[-1]

    def overlays(self) -> list[Image.Image]:
        """The image under each word's map (red, scaled to the map's own maximum)."""
        base = np.asarray(self.image.convert("RGB")).astype(np.float32) / 255.0  # (H, W, 3)
        out = []
        for m in self.maps:
            m = (m / m.max().clamp(min=1e-12)).numpy()[..., None]  # (H, W, 1) in [0, 1]
            heat = np.concatenate([m, np.zeros_like(m), np.zeros_like(m)], axis=-1)
            mixed = 0.45 * base + 0.55 * heat + 0.3 * m * base
            out.append(Image.fromarray((mixed.clip(0, 1) * 255).round().astype(np.uint8)))
        return out

    def save(self, path: str | Path, scale: int = 2) -> Path:
        """A PNG: the image and one overlay per word (labelled), then the x0 predictions at evenly spaced steps."""
        from PIL import ImageDraw

        tiles = [self.image.convert("RGB"), *self.overlays()]
        labels = ["image", *self.words]
        w, h = self.image.size
        tw, th = w * scale, h * scale
        # the x0 row: at most as many steps as the first row has tiles, evenly spaced, the last included
        count = min(len(self.x0_steps), len(tiles))
        chosen = sorted({round(i * (len(self.x0_steps) - 1) / max(1, count - 1)) for i in range(count)})
        row2 = [(k, self.x0_steps[k]) for k in chosen]
        columns = len(tiles)
        label_h = 12
        sheet = Image.new("RGB", (columns * tw, (th + label_h) * (2 if row2 else 1)), "white")
        draw = ImageDraw.Draw(sheet)
        for i, (tile, label) in enumerate(zip(tiles, labels)):
            sheet.paste(tile.resize((tw, th), Image.Resampling.NEAREST), (i * tw, 0))
            draw.text((i * tw + 2, th), label, fill="black")
        for i, (k, tile) in enumerate(row2):
            sheet.paste(tile.convert("RGB").resize((tw, th), Image.Resampling.NEAREST), (i * tw, th + label_h))
            draw.text((i * tw + 2, 2 * th + label_h), f"x0, step {k + 1}", fill="black")
        path = Path(path)
        with atomic_path(path) as tmp:
            sheet.save(tmp, format="PNG")
        return path


def attention_maps(pipe: Pipeline, prompt: str, *, keep_x0: bool = True, **fields: Any) -> Explanation:
    """Generate ``prompt`` (any txt2img option by name) and return its per-word attention maps."""
    fields.setdefault("seed", 0)
    if fields.get("batch_size", 1) != 1:
        raise ValueError("attention_maps explains one image: batch_size must be 1")
    width = int(fields.get("width") or pipe.native_size)
    height = int(fields.get("height") or pipe.native_size)
    latent_size = (height // pipe.vae_factor, width // pipe.vae_factor)
    recorder = CrossAttentionRecorder(pipe.unet, latent_size)
    steps: list[Image.Image] = []

    def keep(step: int, total: int, x0: Tensor) -> None:
        if keep_x0:
            steps.append(pipe.preview(x0)[0])

    try:
        image = pipe.txt2img(prompt, callback=keep, **fields)[0]
    finally:
        recorder.remove()
    words = prompt_words(pipe.tokenizer, prompt)
    maps = recorder.mean()[0]  # (M, h, w)
    per_word = torch.stack([maps[positions].mean(dim=0) for _, positions in words]) if words else maps[:0]
    per_word = F.interpolate(per_word[None], size=(image.size[1], image.size[0]), mode="bilinear",
                             align_corners=False)[0]  # (words, H, W)
    return Explanation(prompt, image, [w for w, _ in words], per_word, steps)
