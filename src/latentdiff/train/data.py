"""Image-caption sources for training, and a deterministic, resumable batch order.

A *source* is anything with ``len(source)`` and ``source[i] -> (image, caption)``,
the image a float32 tensor (3, H, W) in [-1, 1] (:class:`ImageCaptionSource`).
Provided here:

- :class:`ImageFolderSource`: a folder of images with captions either in a
  ``metadata.jsonl`` (``{"file_name": "a/b.png", "text": "..."}`` per line, the
  diffusers / Hugging Face ``imagefolder`` convention) or in same-stem ``.txt``
  files (``cat.png`` + ``cat.txt``);
- :class:`WorldSource`: the built-in Shapes World (``latentdiff.world``, imported
  only when used);
- :class:`InMemorySource`: tensors and captions already in memory (tests, notebooks).

:class:`EpochOrder` shuffles indices per epoch with a permutation derived only
from ``(seed, epoch)``, so the data position is two integers and a resumed run
continues the same order exactly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class TrainDataError(ValueError):
    """Training data that cannot be read, with the reason."""


@runtime_checkable
class ImageCaptionSource(Protocol):
    """Map-style source of (image (3, H, W) float32 in [-1, 1], caption) pairs."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Tensor, str]: ...


# ---------------------------------------------------------------------------- images
def to_image_tensor(image: Any) -> Tensor:
    """A PIL image, a uint8 array/tensor (H, W, 3) or (3, H, W), or a float tensor (3, H, W)
    already in [-1, 1] -> float32 tensor (3, H, W) in [-1, 1]."""
    if isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"))  # a writable copy
    if isinstance(image, np.ndarray):
        if not (image.flags.writeable and image.flags.c_contiguous):
            image = np.array(image, order="C")
        image = torch.from_numpy(image)
    if not isinstance(image, Tensor):
        raise TrainDataError(f"cannot read an image from a {type(image).__name__}")
    if image.ndim != 3:
        raise TrainDataError(f"expected an image with 3 dimensions, got shape {tuple(image.shape)}")
    if image.shape[0] != 3 and image.shape[-1] == 3:
        image = image.permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    if image.shape[0] != 3:
        raise TrainDataError(f"expected an RGB image, got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image.float().div(127.5).sub(1.0).contiguous()
    if image.is_floating_point():
        return image.float().contiguous()
    raise TrainDataError(f"unsupported image dtype {image.dtype}")


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` (bicubic), then crop the centre ``size`` x ``size``."""
    image = image.convert("RGB")
    w, h = image.size
    if (w, h) == (size, size):
        return image
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


# ---------------------------------------------------------------------------- sources
class InMemorySource:
    """Images (N, 3, H, W) in [-1, 1] (or a list of (3, H, W)) with N captions."""

    def __init__(self, images: Tensor | Sequence[Tensor], captions: Sequence[str]) -> None:
        if len(images) != len(captions):
            raise TrainDataError(f"{len(images)} images but {len(captions)} captions")
        self.images = images
        self.captions = list(captions)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[Tensor, str]:
        return to_image_tensor(self.images[index]), self.captions[index]


class ImageFolderSource:
    """A folder of images and captions (``metadata.jsonl``, else same-stem ``.txt`` files).

    Images are resized and centre-cropped to ``resolution`` (``None``: used as they are,
    which needs all of one size). Entries are sorted by file name, so the index of an
    image does not depend on the file system's listing order.
    """

    def __init__(self, folder: str | Path, resolution: int | None = None) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise TrainDataError(f"no such data folder: {self.folder}")
        self.resolution = resolution
        metadata = self.folder / "metadata.jsonl"
        entries = self._read_metadata(metadata) if metadata.is_file() else self._read_txt_captions()
        if not entries:
            raise TrainDataError(f"{self.folder} holds no captioned images")
        entries.sort(key=lambda e: e[0].as_posix())
        self.files = [f for f, _ in entries]
        self.captions = [c for _, c in entries]

    def _read_metadata(self, path: Path) -> list[tuple[Path, str]]:
        entries = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise TrainDataError(f"{path}:{number}: not JSON: {err}") from None
            if not isinstance(row, dict) or "file_name" not in row:
                raise TrainDataError(f"{path}:{number}: needs a \"file_name\" key")
            text = row.get("text", row.get("caption"))
            if not isinstance(text, str):
                raise TrainDataError(f"{path}:{number}: needs a \"text\" (or \"caption\") string")
            file = self.folder / row["file_name"]
            if not file.is_file():
                raise TrainDataError(f"{path}:{number}: no such image {file}")
            entries.append((file, text))
        return entries

    def _read_txt_captions(self) -> list[tuple[Path, str]]:
        images = [p for p in self.folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        missing = [p for p in images if not p.with_suffix(".txt").is_file()]
        if missing:
            names = ", ".join(p.name for p in sorted(missing)[:5])
            raise TrainDataError(
                f"{len(missing)} image(s) in {self.folder} have no caption (e.g. {names}): add a same-stem "
                ".txt file for each, or a metadata.jsonl with {\"file_name\": ..., \"text\": ...} lines"
            )
        return [(p, p.with_suffix(".txt").read_text(encoding="utf-8").strip()) for p in images]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, str]:
        try:
            with Image.open(self.files[index]) as image:
                image = image.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # what PIL raises on bad files
            raise TrainDataError(f"cannot read image {self.files[index]}: {err}") from None
        if self.resolution is not None:
            image = resize_center_crop(image, self.resolution)
        return to_image_tensor(image), self.captions[index]


class WorldSource:
    """The built-in Shapes World: ``latentdiff.world.WorldDataset(seed, length)`` as a source.

    An item of the world may be an ``(image, caption)`` pair, a mapping with ``image`` and
    ``caption``/``text``, or an object with ``image`` and ``caption`` attributes; the image a
    PIL image, a uint8 array or a tensor (see :func:`to_image_tensor`). ``resolution``
    resizes (None keeps the world's own 64 x 64).
    """

    def __init__(self, seed: int, length: int, resolution: int | None = None) -> None:
        try:
            from latentdiff.world import WorldDataset  # imported lazily: the world is optional here
        except ImportError as err:
            raise TrainDataError(f"the built-in world (latentdiff.world) is not available: {err}") from None
        self.world = WorldDataset(seed, length)
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.world)

    def __getitem__(self, index: int) -> tuple[Tensor, str]:
        image, caption = split_item(self.world[index])
        if self.resolution is not None:
            if isinstance(image, Image.Image):
                image = resize_center_crop(image, self.resolution)
            else:
                t = to_image_tensor(image)
                if t.shape[-2:] != (self.resolution, self.resolution):
                    array = ((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
                    image = resize_center_crop(Image.fromarray(array), self.resolution)
                else:
                    image = t
        return to_image_tensor(image), caption


def split_item(item: Any) -> tuple[Any, str]:
    """(image, caption) out of a pair, a mapping or an object with attributes."""
    if isinstance(item, (tuple, list)) and len(item) == 2:
        image, caption = item
    elif isinstance(item, dict):
        image, caption = item.get("image"), item.get("caption", item.get("text"))
    else:
        image, caption = getattr(item, "image", None), getattr(item, "caption", getattr(item, "text", None))
    if image is None or not isinstance(caption, str):
        raise TrainDataError(f"cannot find an image and a caption in a {type(item).__name__} item")
    return image, caption


def open_source(data: str, resolution: int, world_seed: int = 0, world_length: int = 2048) -> ImageCaptionSource:
    """``"world"`` -> :class:`WorldSource`; tar shards (``shards/{000..009}.tar``, a ``.tar``, or a
    folder of them) -> :class:`~latentdiff.train.shards.TarShardSource`; else an image folder."""
    from .shards import TarShardSource, is_shard_spec

    if data == "world":
        return WorldSource(world_seed, world_length, resolution)
    if is_shard_spec(data):
        return TarShardSource(data, resolution)
    return ImageFolderSource(data, resolution)


def load_batch(source: ImageCaptionSource, indices: Sequence[int]) -> tuple[Tensor, list[str]]:
    """Images (B, 3, H, W) and captions of ``indices``."""
    images, captions = [], []
    for i in indices:
        image, caption = source[int(i)]
        images.append(image)
        captions.append(caption)
    return stack_images(images), captions


def stack_images(images: Sequence[Tensor]) -> Tensor:
    """(3, H, W) images of one size -> (B, 3, H, W); differing sizes are a TrainDataError."""
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise TrainDataError(f"images of one batch differ in size {sorted(shapes)}: set a resolution")
    return torch.stack(list(images))


# ---------------------------------------------------------------------------- order
class EpochOrder:
    """Shuffled indices, epoch after epoch; batches may straddle an epoch boundary.

    Epoch ``e``'s permutation is ``torch.randperm(n)`` under a generator seeded with
    ``seed * 1_000_003 + e``: it depends on nothing else, so the state to save is just
    ``(epoch, cursor)``.
    """

    def __init__(self, length: int, seed: int) -> None:
        if length < 1:
            raise TrainDataError("the data source is empty")
        self.length = length
        self.seed = seed
        self.epoch = 0
        self.cursor = 0
        self._perm: Tensor | None = None

    def permutation(self, epoch: int) -> Tensor:
        """Order of epoch ``epoch``: (length,) int64."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
        return torch.randperm(self.length, generator=g)

    def next(self, count: int) -> list[int]:
        """The next ``count`` indices."""
        out: list[int] = []
        while len(out) < count:
            if self._perm is None:
                self._perm = self.permutation(self.epoch)
            take = min(count - len(out), self.length - self.cursor)
            out.extend(self._perm[self.cursor : self.cursor + take].tolist())
            self.cursor += take
            if self.cursor == self.length:
                self.epoch, self.cursor, self._perm = self.epoch + 1, 0, None
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "length": self.length, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["length"] != self.length:
            raise TrainDataError(
                f"the checkpoint was taken on {state['length']} items but the data now has {self.length}"
            )
        self.seed, self.epoch, self.cursor, self._perm = state["seed"], state["epoch"], state["cursor"], None
