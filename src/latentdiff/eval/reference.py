"""The reference statistics (``mu``, ``sigma``) that generated images' features are compared with: a given
``.npz``, or the features of a folder of real images or of rendered Shapes World scenes, cached as ``.npz``
in the cache folder, keyed by the reference images and the feature extractor's files."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ..errors import BadArgument
from .config import EvalConfig, default_cache_dir

if TYPE_CHECKING:
    from .scorers import FeatureExtractor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REFERENCE_SEED = 20240917  # the built-in reference scenes' random stream (fixed: part of the cache key)
CACHE_VERSION = 1


def files_identity(path: Path) -> list[tuple[str, int, int]]:
    """(relative name, size, mtime_ns) of a file or of every file under a folder: changes when the weights do."""
    path = path.resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [(str(p.relative_to(path.parent if path.is_file() else path)), p.stat().st_size, p.stat().st_mtime_ns)
            for p in files]


def _digest(obj: Any) -> str:
    """A short stable hash of a JSON-able value: the cache file's name."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class Reference:
    """The reference's feature statistics, with what ``metrics.json`` reports of them."""

    mu: np.ndarray
    sigma: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def _cached(cache_dir: Path, key: dict[str, Any], describe: dict[str, Any],
            compute: Callable[[], tuple[np.ndarray, np.ndarray, int]]) -> Reference:
    """Statistics from ``cache_dir/ref-<hash of key>.npz`` when present, else computed and saved there."""
    from .metrics import load_statistics, save_statistics

    digest = _digest({"version": CACHE_VERSION, **key})
    stats_path = cache_dir / f"ref-{digest}.npz"
    meta_path = stats_path.with_suffix(".json")
    if stats_path.is_file():
        mu, sigma = load_statistics(stats_path)
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        return Reference(mu, sigma, {**describe, "n_images": meta.get("n_images"), "stats": str(stats_path),
                                     "cached": True})
    mu, sigma, n = compute()
    save_statistics(stats_path, mu, sigma)
    from ..checkpoints.io import atomic_path

    with atomic_path(meta_path) as tmp:
        tmp.write_text(json.dumps({**describe, "n_images": n, "key": key}, indent=2))
    return Reference(mu, sigma, {**describe, "n_images": n, "stats": str(stats_path), "cached": False})


def _statistics_of(images_iter: Iterable[Any], extractor: FeatureExtractor,
                   batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, image count) of the extractor's features over the images, ``batch_size`` at a time."""
    from .metrics import RunningStatistics

    running: RunningStatistics | None = None
    chunk: list[Any] = []

    def flush() -> None:
        nonlocal running
        feats = extractor(chunk)
        if running is None:
            running = RunningStatistics(feats.shape[1])
        running.update(feats)
        chunk.clear()

    for image in images_iter:
        chunk.append(image)
        if len(chunk) == batch_size:
            flush()
    if chunk:
        flush()
    if running is None or running.count < 2:
        raise BadArgument("the reference needs at least 2 images")
    mu, sigma = running.statistics()
    return mu, sigma, running.count


def builtin_reference_images(prompts: Sequence[str], per_prompt: int) -> Iterator[np.ndarray]:
    """Rendered Shapes World scenes that the prompts describe: ``per_prompt`` per prompt, deterministic."""
    from ..world import render, scene_from_caption

    for p, prompt in enumerate(prompts):
        for r in range(per_prompt):
            rng = np.random.default_rng([REFERENCE_SEED, p, r])
            yield render(scene_from_caption(prompt, rng))


def folder_images(folder: Path) -> list[Path]:
    """The image files under a folder (by suffix), sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _open_rgb(path: Path) -> Image.Image:
    """A reference image as RGB; an unreadable file is a bad argument."""
    from PIL import UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise BadArgument(f"reference image {path} is not readable: {err}") from None


def reference_statistics(config: EvalConfig, prompts: list[str], builtin: bool,
                         extractor: FeatureExtractor) -> Reference:
    """The reference's (mu, sigma): a given ``.npz``, or a folder / the built-in world's features, cached."""
    from .metrics import load_statistics

    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    if config.reference is not None:
        ref = Path(config.reference)
        if ref.is_file():
            mu, sigma = load_statistics(ref)
            return Reference(mu, sigma, {"source": f"statistics file {ref}", "n_images": None, "stats": str(ref),
                                         "cached": None})
        files = folder_images(ref)
        if len(files) < 2:
            raise BadArgument(f"reference folder {ref} holds {len(files)} images; FD needs at least 2")
        key = {"source": "folder", "files": _digest(files_identity(ref)), "folder": str(ref.resolve()),
               "features": extractor.identity}
        return _cached(cache_dir, key, {"source": f"images in {ref}"},
                       lambda: _statistics_of((_open_rgb(p) for p in files), extractor))
    per_prompt = config.reference_per_prompt or config.images_per_prompt
    key = {"source": "shapes-world", "prompts": _digest(prompts), "per_prompt": per_prompt, "seed": REFERENCE_SEED,
           "features": extractor.identity}
    describe = {"source": f"Shapes World renders of the {len(prompts)} held-out prompts' scenes, "
                          f"{per_prompt} per prompt"}
    return _cached(cache_dir, key, describe,
                   lambda: _statistics_of(builtin_reference_images(prompts, per_prompt), extractor))
