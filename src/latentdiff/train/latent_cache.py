"""The on-disk latent cache of the diffusion trainers: every image encoded once, read memory-mapped.

    cache = open_latent_cache(out_dir / "cache", key, source, encode, batch_size=8)
    x0 = cache[[3, 1, 4]]          # (3, c, h, w) float32, read from the mapped file
    cache.captions[3], cache.skipped

Files (``cache/latents-<key16>.npy`` + ``.json``): the latents (N, c, h, w) float32 of every
readable item (the posterior mean or one fixed sample, times the VAE's scaling factor), and
beside them the captions, the full key and the items skipped. The key (:func:`cache_key`)
hashes the VAE's weights, the data and the transform, so caches of different VAEs or
resolutions sit side by side and a changed setting never reads a stale one. The array is
opened with ``numpy.load(mmap_mode="r")``: a cache larger than memory is paged in as batches
need it, and every rank of a data-parallel run shares the same pages.

An item that cannot be read (a corrupt or truncated image: the source raises
:class:`~latentdiff.train.data.TrainDataError`) is skipped and counted, with a warning naming
the first few; the run trains on the rest.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..checkpoints.io import atomic_path
from .data import ImageCaptionSource, TrainDataError, stack_images
from .distributed import DistInfo, barrier

FORMAT = "latentdiff-latents-1"


def module_hash(module: nn.Module) -> str:
    """sha256 over a module's state dict (names and raw bytes, in name order)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(vae: nn.Module, source: ImageCaptionSource, settings: Mapping[str, Any]) -> str:
    """Hash of the VAE's weights, the transform ``settings``, the source's length and its first and
    last items (caption and pixels; an unreadable end item counts by its error message)."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "vae": module_hash(vae), "length": len(source), **settings},
                        sort_keys=True).encode())
    for index in {0, len(source) - 1}:
        try:
            image, caption = source[index]
        except TrainDataError as err:
            h.update(str(err).encode())
            continue
        h.update(caption.encode())
        h.update(image.numpy().tobytes())
    return h.hexdigest()


class LatentCache:
    """Latents (N, c, h, w) of the readable items, their captions and the skipped count."""

    def __init__(self, array: np.ndarray, captions: list[str], skipped: list[str]) -> None:
        self.array = array  # (N, c, h, w) float32, usually a read-only memory map
        self.captions = captions
        self.skipped = skipped

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def __getitem__(self, indices: Sequence[int] | Tensor | slice) -> Tensor:
        """Latents of ``indices`` (or a slice) as a fresh contiguous float32 tensor (B, c, h, w)."""
        rows = indices if isinstance(indices, slice) else np.asarray(indices, dtype=np.int64)
        return torch.from_numpy(np.array(self.array[rows], order="C"))


def _paths(folder: Path, key: str) -> tuple[Path, Path]:
    stem = folder / f"latents-{key[:16]}"
    return stem.with_suffix(".npy"), stem.with_suffix(".json")


def _open(folder: Path, key: str) -> LatentCache | None:
    array_path, meta_path = _paths(folder, key)
    if not (array_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        array = np.load(array_path, mmap_mode="r")
    except (OSError, ValueError):
        return None  # unreadable: rebuilt
    if meta.get("key") != key or len(meta.get("captions", [])) != array.shape[0]:
        return None
    return LatentCache(array, meta["captions"], meta.get("skipped", []))


def open_latent_cache(
    folder: str | Path,
    key: str,
    source: ImageCaptionSource,
    encode: Callable[[Tensor], Tensor],
    *,
    batch_size: int,
    world: DistInfo | None = None,
) -> LatentCache:
    """The cache of ``key`` in ``folder``, built first when missing (by rank 0; the other ranks wait).

    ``encode`` maps images (B, 3, H, W) in [-1, 1] to scaled latents (B, c, h, w).
    """
    folder = Path(folder)
    world = world or DistInfo()
    if world.is_main:
        cache = _open(folder, key)
        if cache is None:
            _build(folder, key, source, encode, batch_size)
    barrier(world)
    cache = _open(folder, key)
    if cache is None:
        raise TrainDataError(f"the latent cache in {folder} could not be read back after it was written")
    if cache.skipped and world.is_main:
        names = "; ".join(cache.skipped[:3])
        warnings.warn(f"skipped {len(cache.skipped)} unreadable training item(s) of {len(cache) + len(cache.skipped)} "
                      f"(e.g. {names})", stacklevel=3)
    if not len(cache):
        raise TrainDataError(f"none of the {len(source)} training items could be read")
    return cache


@torch.no_grad()
def _build(folder: Path, key: str, source: ImageCaptionSource, encode: Callable[[Tensor], Tensor],
           batch_size: int) -> None:
    chunks: list[np.ndarray] = []
    captions: list[str] = []
    skipped: list[str] = []
    n = len(source)
    for start in tqdm(range(0, n, batch_size), desc="encoding latents", leave=False, disable=n < 256):
        images = []
        for index in range(start, min(start + batch_size, n)):
            try:
                image, caption = source[index]
            except TrainDataError as err:
                skipped.append(f"item {index}: {err}")
                continue
            images.append(image)
            captions.append(caption)
        if images:
            chunks.append(encode(stack_images(images)).float().cpu().contiguous().numpy())  # (b, c, h, w)
    if not chunks:
        raise TrainDataError(f"none of the {n} training items could be read (e.g. {'; '.join(skipped[:3])})")
    array = np.concatenate(chunks)
    array_path, meta_path = _paths(folder, key)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(array_path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)
    with atomic_path(meta_path) as tmp:
        tmp.write_text(json.dumps({"format": FORMAT, "key": key, "shape": list(array.shape),
                                   "captions": captions, "skipped": skipped}), encoding="utf-8")
