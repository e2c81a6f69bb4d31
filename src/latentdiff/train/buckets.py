"""Aspect-ratio buckets: train on images of many shapes without cropping them all square.

    sizes = bucket_sizes(512, step=64, max_ratio=2.0)   # [(256, 1024), ..., (512, 512), ..., (1024, 256)]
    b = nearest_bucket(1920, 1080, sizes)               # the bucket whose aspect is closest: (704, 384)
    image = fit_to_bucket(image, sizes[b])              # cover-resize (bicubic) + centre crop, (3, 384, 704)

As kohya's sd-scripts and NovelAI did: the buckets are the sizes whose sides are multiples of
``step`` (the VAE factor times the UNet's downsampling, so every latent fits the UNet) and whose
area is at most ``resolution ** 2``, one per width, each as tall as that area allows, within
``max_ratio`` of square. An image goes to the bucket of the nearest aspect ratio (in log space),
is resized to cover it and centre-cropped. A batch always comes from one bucket
(:class:`BucketOrder`), so its latents stack.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .data import TrainDataError, to_image_tensor


def bucket_sizes(resolution: int, step: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) buckets of area <= ``resolution ** 2``, sides multiples of ``step``, sorted by aspect."""
    if step < 1 or resolution < step:
        raise TrainDataError(f"bucket step {step} must be in [1, resolution {resolution}]")
    if max_ratio < 1:
        raise TrainDataError(f"bucket max ratio must be >= 1, got {max_ratio}")
    area = resolution * resolution
    sizes = set()
    for width in range(step, area // step + 1, step):
        height = (area // width) // step * step
        if height >= step and max(width / height, height / width) <= max_ratio + 1e-9:
            sizes.add((width, height))
    sizes.add((resolution // step * step, resolution // step * step))
    return sorted(sizes, key=lambda s: s[0] / s[1])


def nearest_bucket(width: int, height: int, sizes: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest ``width / height`` (log distance; ties: the first)."""
    aspect = math.log(width / height)
    return min(range(len(sizes)), key=lambda i: abs(math.log(sizes[i][0] / sizes[i][1]) - aspect))


def fit_to_bucket(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Image (3, H, W) in [-1, 1] -> (3, h, w) for ``size`` = (w, h): bicubic resize to cover, centre crop."""
    width, height = size
    h, w = image.shape[-2:]
    if (w, h) == (width, height):
        return image
    scale = max(width / w, height / h)
    nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
    pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    resized = Image.fromarray(pixels).resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - width) // 2, (nh - height) // 2
    return to_image_tensor(resized.crop((left, top, left + width, top + height)))


class BucketOrder:
    """Whole batches of ``batch`` items of one bucket each, shuffled, epoch after epoch.

    Epoch ``e``: each bucket's items are permuted (a generator seeded from ``seed``, ``e`` and the
    bucket) and cut into batches, the last one filled up from the start of the same permutation,
    so every batch is full; then the order of all batches is permuted. It depends on nothing
    else, so the state to save is ``(epoch, cursor)``. ``next(batch)`` is the next batch.
    """

    def __init__(self, groups: Sequence[Sequence[int]], batch: int, seed: int) -> None:
        self.groups = [list(g) for g in groups if len(g)]
        if not self.groups:
            raise TrainDataError("the data source is empty")
        self.batch, self.seed = batch, seed
        self.length = sum(len(g) for g in self.groups)
        self.epoch, self.cursor = 0, 0
        self._batches: list[list[int]] | None = None

    def batches(self, epoch: int) -> list[list[int]]:
        out: list[list[int]] = []
        for number, group in enumerate(self.groups):
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch * 1_009 + number) % (2**63))
            perm = [group[i] for i in torch.randperm(len(group), generator=g).tolist()]
            count = math.ceil(len(perm) / self.batch)
            cycled = np.resize(np.asarray(perm), count * self.batch).tolist()  # repeats from the start
            out.extend(cycled[i * self.batch : (i + 1) * self.batch] for i in range(count))
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
        return [out[i] for i in torch.randperm(len(out), generator=g).tolist()]

    def next(self, count: int) -> list[int]:
        if count != self.batch:
            raise ValueError(f"bucketed batches hold {self.batch} items, {count} were asked for")
        if self._batches is None:
            self._batches = self.batches(self.epoch)
        items = self._batches[self.cursor]
        self.cursor += 1
        if self.cursor == len(self._batches):
            self.epoch, self.cursor, self._batches = self.epoch + 1, 0, None
        return list(items)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "length": self.length, "seed": self.seed,
                "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["length"] != self.length or state.get("batch") != self.batch:
            raise TrainDataError(
                f"the checkpoint was taken on {state['length']} items in batches of {state.get('batch')}, "
                f"the data now has {self.length} in batches of {self.batch}"
            )
        self.seed, self.epoch, self.cursor, self._batches = state["seed"], state["epoch"], state["cursor"], None
