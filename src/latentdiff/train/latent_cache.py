"""The on-disk latent cache of the diffusion trainers: every image encoded once, read memory-mapped.

    cache = open_latent_cache(out_dir / "cache", key, source, encode, batch_size=8)
    x0 = cache[[3, 1, 4]]          # (3, c, h, w) float32, read from the mapped file
    cache.captions[3], cache.skipped

Files (``cache/latents-<key16>-<bucket>.npy`` + ``latents-<key16>.json``): the latents
(N_b, c, h, w) float32 of every readable item (the posterior mean or one fixed sample, times the
VAE's scaling factor), one array per aspect-ratio bucket (one without buckets), and beside them
the captions, each item's bucket and row, the full key and the items skipped. The key (:func:`cache_key`)
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
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..checkpoints.io import atomic_path
from .buckets import fit_to_bucket, nearest_bucket
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
    """Latents of the readable items, their captions and what was skipped.

    The latents sit in one array per bucket (one bucket without aspect-ratio buckets), each
    (N_b, c, h_b, w_b); ``where[i]`` = (bucket, row) of item ``i``.
    """

    def __init__(self, arrays: list[np.ndarray], where: np.ndarray, captions: list[str], skipped: list[str]) -> None:
        self.arrays = arrays  # per bucket (N_b, c, h_b, w_b) float32, usually read-only memory maps
        self.where = where  # (N, 2) int64
        self.captions = captions
        self.skipped = skipped

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def latent_size(self) -> tuple[int, int]:
        """(h, w) of the bucket holding the most items (the size sample grids are drawn at)."""
        return tuple(max(self.arrays, key=len).shape[-2:])  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, ...]:
        """(N, c, h, w) when every latent has one size."""
        if len(self.arrays) != 1:
            raise ValueError(f"the cache holds {len(self.arrays)} bucket sizes; it has no single shape")
        return tuple(self.arrays[0].shape)

    def groups(self) -> list[list[int]]:
        """Item indices of each bucket."""
        return [np.flatnonzero(self.where[:, 0] == b).tolist() for b in range(len(self.arrays))]

    def __getitem__(self, indices: Sequence[int] | Tensor | slice) -> Tensor:
        """Latents of ``indices`` (or a slice), all of one bucket, as a fresh contiguous float32 tensor (B, c, h, w)."""
        items = np.arange(len(self))[indices] if isinstance(indices, slice) else np.asarray(indices, dtype=np.int64)
        buckets = np.unique(self.where[items, 0])
        if len(buckets) != 1:
            raise TrainDataError(f"a batch mixes {len(buckets)} latent sizes (aspect-ratio buckets)")
        return torch.from_numpy(np.array(self.arrays[int(buckets[0])][self.where[items, 1]], order="C"))


def _paths(folder: Path, key: str) -> tuple[Path, str]:
    """The metadata file and the array files' pattern (``.format(bucket)``)."""
    return folder / f"latents-{key[:16]}.json", str(folder / f"latents-{key[:16]}-{{}}.npy")


def _open(folder: Path, key: str) -> LatentCache | None:
    meta_path, array_pattern = _paths(folder, key)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("key") != key:
            return None
        arrays = [np.load(array_pattern.format(b), mmap_mode="r") for b in range(meta["buckets"])]
    except (OSError, ValueError, KeyError):
        return None  # missing or unreadable: rebuilt
    where = np.asarray(meta["where"], dtype=np.int64).reshape(-1, 2)
    if len(where) != len(meta["captions"]) or any(
        (where[:, 0] == b).sum() != len(a) for b, a in enumerate(arrays)
    ):
        return None
    return LatentCache(arrays, where, meta["captions"], meta.get("skipped", []))


def open_latent_cache(
    folder: str | Path,
    key: str,
    source: ImageCaptionSource,
    encode: Callable[[Tensor], Tensor],
    *,
    batch_size: int,
    world: DistInfo | None = None,
    buckets: Sequence[tuple[int, int]] | None = None,
) -> LatentCache:
    """The cache of ``key`` in ``folder``, built first when missing (by rank 0; the other ranks wait).

    ``encode`` maps images (B, 3, H, W) in [-1, 1] to scaled latents (B, c, h, w). With
    ``buckets`` ((width, height) sizes), each image is fitted to its nearest bucket first
    (:mod:`latentdiff.train.buckets`).
    """
    folder = Path(folder)
    world = world or DistInfo()
    if world.is_main:
        cache = _open(folder, key)
        if cache is None:
            _build(folder, key, source, encode, batch_size, buckets)
    barrier(world)
    cache = _open(folder, key)
    if cache is None:
        raise TrainDataError(f"the latent cache in {folder} could not be read back after it was written")
    if cache.skipped and world.is_main:
        names = "; ".join(cache.skipped[:3])
        warnings.warn(f"skipped {len(cache.skipped)} unreadable training item(s) of {len(cache) + len(cache.skipped)} "
                      f"(e.g. {names})", stacklevel=3)
    return cache


@torch.no_grad()
def _build(folder: Path, key: str, source: ImageCaptionSource, encode: Callable[[Tensor], Tensor],
           batch_size: int, buckets: Sequence[tuple[int, int]] | None) -> None:
    chunks: dict[int, list[np.ndarray]] = defaultdict(list)  # bucket -> encoded chunks
    pending: dict[int, list[Tensor]] = defaultdict(list)  # bucket -> images waiting for a full batch
    where: list[tuple[int, int]] = []
    rows: dict[int, int] = defaultdict(int)
    captions: list[str] = []
    skipped: list[str] = []

    def flush(bucket: int) -> None:
        if pending[bucket]:
            chunks[bucket].append(encode(stack_images(pending[bucket])).float().cpu().contiguous().numpy())
            pending[bucket] = []

    n = len(source)
    for index in tqdm(range(n), desc="encoding latents", leave=False, disable=n < 256):
        try:
            image, caption = source[index]
        except TrainDataError as err:
            skipped.append(f"item {index}: {err}")
            continue
        bucket = 0
        if buckets is not None:
            bucket = nearest_bucket(image.shape[-1], image.shape[-2], buckets)
            image = fit_to_bucket(image, buckets[bucket])
        pending[bucket].append(image)
        where.append((bucket, rows[bucket]))
        rows[bucket] += 1
        captions.append(caption)
        if len(pending[bucket]) == batch_size:
            flush(bucket)
    for bucket in list(pending):
        flush(bucket)
    if not captions:
        raise TrainDataError(f"none of the {n} training items could be read (e.g. {'; '.join(skipped[:3])})")
    used = sorted(chunks)  # buckets that received items -> 0, 1, ... in the files
    renumber = {b: i for i, b in enumerate(used)}
    meta_path, array_pattern = _paths(folder, key)
    folder.mkdir(parents=True, exist_ok=True)
    for b in used:
        with atomic_path(Path(array_pattern.format(renumber[b]))) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.concatenate(chunks[b]))
    with atomic_path(meta_path) as tmp:
        tmp.write_text(json.dumps({
            "format": FORMAT, "key": key, "buckets": len(used), "captions": captions, "skipped": skipped,
            "where": [[renumber[b], r] for b, r in where],
        }), encoding="utf-8")
