"""WebDataset-style tar shards as an image-caption source.

A shard is an uncompressed ``.tar`` whose members are grouped into samples by *key*:
the member path up to the first dot of its base name (``0001.jpg`` + ``0001.txt`` ->
key ``0001``; ``dir/0001.png`` -> key ``dir/0001``). A sample needs an image
(``jpg``, ``jpeg``, ``png``, ``webp``, ``bmp``) and a caption, from a ``.txt`` member
or from a ``.json`` member with a ``"caption"`` or ``"text"`` string (``.txt`` wins
when both are there).

:class:`TarShardSource` reads every shard's headers once (no data is extracted to
disk), keeps the captions and each image's byte range in memory, and on
``source[i]`` seeks straight to the image bytes. Shards are named by a brace pattern
(``data/shard-{000..009}.tar``, see :func:`expand_braces`), a list of paths, or a
folder holding ``*.tar`` files.
"""

from __future__ import annotations

import io
import json
import operator
import os
import re
import tarfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from PIL import Image
from torch import Tensor

from .data import IMAGE_SUFFIXES, TrainDataError, resize_center_crop, to_image_tensor

SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
COMPRESSED_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tar.lz4")
_COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


# ---------------------------------------------------------------------------- patterns
def expand_braces(pattern: str) -> list[str]:
    """Brace expansion as WebDataset and bash do it: ``{000..009}`` (zero padding from the
    width of the first bound), ``{a,b}``, several (or nested) groups; no braces -> ``[pattern]``.

    A malformed pattern (an unclosed or unopened brace, a reversed, non-numeric or empty
    group) is a TrainDataError naming it.
    """
    try:
        return _expand(pattern)
    except _BraceError as err:
        raise TrainDataError(f"malformed shard pattern {pattern!r}: {err}") from None


class _BraceError(Exception):
    pass


def _expand(pattern: str) -> list[str]:
    start = pattern.find("{")
    if start < 0:
        if "}" in pattern:
            raise _BraceError("'}' without a '{'")
        return [pattern]
    if "}" in pattern[:start]:
        raise _BraceError("'}' without a '{'")
    depth, parts, last = 0, [], start + 1
    for i in range(start, len(pattern)):
        char = pattern[i]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                end = i
                break
        elif char == "," and depth == 1:
            parts.append(pattern[last:i])
            last = i + 1
    else:
        raise _BraceError(f"the '{{' at position {start} is never closed")
    parts.append(pattern[last:end])
    prefix, body, rest = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    if len(parts) > 1:
        alternatives = [a for part in parts for a in _expand(part)]
    else:
        alternatives = _expand_range(body)
    tails = _expand(rest)
    return [prefix + a + t for a in alternatives for t in tails]


def _expand_range(body: str) -> list[str]:
    match = _RANGE.match(body.strip())
    if match is None:
        if ".." in body:
            raise _BraceError(f"{{{body}}} is not a range of integers")
        raise _BraceError(f"{{{body}}} is neither a range {{a..b}} nor a list {{a,b}}")
    first, last = match.group(1), match.group(2)
    lo, hi = int(first), int(last)
    if hi < lo:
        raise _BraceError(f"the range {{{body}}} is reversed")
    width = len(first.lstrip("-"))  # "000" -> 3 digits; "0" or "1" -> no visible padding
    return [f"{'-' if n < 0 else ''}{abs(n):0{width}d}" for n in range(lo, hi + 1)]


def _tars_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".tar" and p.is_file())


def _is_compressed_name(name: str) -> bool:
    return name.lower().endswith(COMPRESSED_TAR_SUFFIXES)


def is_shard_spec(data: str) -> bool:
    """Whether a config's ``data`` string names tar shards: it ends with ``.tar`` (or a
    compressed-tar suffix, so that the source can refuse it with a clear message), it is a
    brace pattern whose expansions all end so, or it is a folder with ``.tar`` files and no images."""
    text = str(data).strip()
    if text.lower().endswith(".tar") or _is_compressed_name(text):
        return True
    if "{" in text:
        try:
            names = expand_braces(text)
        except TrainDataError:
            return False
        if names and all(n.lower().endswith(".tar") or _is_compressed_name(n) for n in names):
            return True
    folder = Path(text)
    if not folder.is_dir():
        return False
    if not _tars_in(folder):
        return False
    return not any(p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() for p in folder.rglob("*"))


# ---------------------------------------------------------------------------- source
class _Sample(NamedTuple):
    shard: int  # index into TarShardSource.shards
    member: str  # the image member's name in the tar
    offset: int  # TarInfo.offset_data
    size: int  # TarInfo.size
    caption: str


class TarShardSource:
    """Image-caption samples of WebDataset-style uncompressed tar shards.

    ``pattern_or_paths`` is a brace pattern (``"data/shard-{000..009}.tar"``), a folder
    (all its ``*.tar``, sorted by name) or a sequence of those / of paths. Samples are in
    shard order, then tar order; those without an image or without a caption are
    skipped, counted in ``skipped`` (``skipped_reasons`` by reason) and warned about once.
    Images are resized and centre-cropped to ``resolution`` (``None``: used as they are).
    """

    def __init__(self, pattern_or_paths: str | Path | Sequence[str | Path], resolution: int | None = None) -> None:
        self.resolution = resolution
        self.shards = self._resolve(pattern_or_paths)
        self.samples: list[_Sample] = []
        self.skipped_reasons = {"no image": 0, "no caption": 0, "unreadable caption": 0}
        for number, shard in enumerate(self.shards):
            self._index(number, shard)
        self.skipped = sum(self.skipped_reasons.values())
        if self.skipped:
            why = ", ".join(f"{n} with {reason}" for reason, n in self.skipped_reasons.items() if n)
            warnings.warn(
                f"tar shards {self._describe()}: skipped {self.skipped} incomplete sample(s) ({why})",
                stacklevel=2,
            )
        if not self.samples:
            raise TrainDataError(f"tar shards {self._describe()} hold no captioned images")
        self._files: dict[int, BinaryIO] = {}
        self._pid: int | None = None

    # --------------------------------------------------------------- shard list
    @staticmethod
    def _resolve(spec: str | Path | Sequence[str | Path]) -> list[Path]:
        items: list[str | Path] = [spec] if isinstance(spec, (str, Path)) else list(spec)
        if not items:
            raise TrainDataError("no tar shards given")
        shards: list[Path] = []
        for item in items:
            names = expand_braces(item) if isinstance(item, str) else [item]
            for name in names:
                path = Path(name)
                if path.is_dir():
                    found = _tars_in(path)
                    if not found:
                        raise TrainDataError(f"the shard folder {path} holds no .tar files")
                    shards.extend(found)
                else:
                    shards.append(path)
        for path in shards:
            if not path.is_file():
                raise TrainDataError(f"no such tar shard: {path}")
            TarShardSource._refuse_compressed(path)
        return shards

    @staticmethod
    def _refuse_compressed(path: Path) -> None:
        kind = "compressed" if _is_compressed_name(path.name) else None
        if kind is None:
            with open(path, "rb") as f:
                head = f.read(6)
            kind = next((k for magic, k in _COMPRESSED_MAGIC.items() if head.startswith(magic)), None)
        if kind is not None:
            raise TrainDataError(
                f"{path} is a {kind} tar, which cannot be read at random efficiently: "
                "use uncompressed .tar shards"
            )

    def _describe(self) -> str:
        if len(self.shards) <= 3:
            return ", ".join(str(p) for p in self.shards)
        return f"{self.shards[0]} .. {self.shards[-1]} ({len(self.shards)} shards)"

    # --------------------------------------------------------------- indexing
    def _index(self, number: int, shard: Path) -> None:
        """Group one shard's members by key (order of first appearance) and keep the complete samples."""
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(shard, mode="r:") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    folder, _, base = info.name.rpartition("/")
                    if base.startswith(".") or "." not in base:
                        continue  # hidden files (._x, .DS_Store) and extension-less members belong to no sample
                    stem, ext = base.split(".", 1)
                    key = f"{folder}/{stem}" if folder else stem
                    groups.setdefault(key, {})[ext.lower()] = info  # a repeated member: the later one wins
                samples = [self._sample(number, shard, tar, members) for members in groups.values()]
        except (tarfile.TarError, OSError) as err:
            raise TrainDataError(f"cannot read tar shard {shard}: {err}") from None
        self.samples.extend(s for s in samples if s is not None)

    def _sample(
        self, number: int, shard: Path, tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo]
    ) -> _Sample | None:
        image = next((members[e] for e in members if e in SHARD_IMAGE_EXTENSIONS), None)
        if image is None:
            self.skipped_reasons["no image"] += 1
            return None
        caption, reason = self._caption(tar, members)
        if caption is None:
            self.skipped_reasons[reason] += 1
            return None
        return _Sample(number, image.name, image.offset_data, image.size, caption)

    @staticmethod
    def _caption(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo]) -> tuple[str | None, str]:
        """(caption, "") or (None, why not): ``.txt`` first, else ``.json``'s "caption" / "text"."""
        try:
            if "txt" in members:
                return _read_member(tar, members["txt"]).decode("utf-8").strip(), ""
            if "json" in members:
                row = json.loads(_read_member(tar, members["json"]).decode("utf-8"))
                text = row.get("caption", row.get("text")) if isinstance(row, dict) else None
                if isinstance(text, str):
                    return text.strip(), ""
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None, "unreadable caption"
        return None, "no caption"

    # --------------------------------------------------------------- reading
    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, str]:
        sample = self.samples[operator.index(index)]  # IndexError past the end, as a sequence should
        shard = self.shards[sample.shard]
        data = self._read(sample.shard, sample.offset, sample.size)
        if len(data) != sample.size:
            raise TrainDataError(
                f"tar shard {shard} is truncated: member {sample.member} has {len(data)} of {sample.size} bytes"
            )
        try:
            with Image.open(io.BytesIO(data)) as image:
                image = image.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # what PIL raises on bad files
            raise TrainDataError(f"cannot read image {sample.member} in tar shard {shard}: {err}") from None
        if self.resolution is not None:
            image = resize_center_crop(image, self.resolution)
        return to_image_tensor(image), sample.caption

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():  # first use, or a forked worker: the parent's handles are not ours
            self._drop_files()
            self._pid = os.getpid()
        file = self._files.get(shard)
        if file is None:
            try:
                file = self._files[shard] = open(self.shards[shard], "rb")
            except OSError as err:
                raise TrainDataError(f"cannot open tar shard {self.shards[shard]}: {err}") from None
        file.seek(offset)
        return file.read(size)

    def _drop_files(self) -> None:
        for file in self._files.values():
            try:
                file.close()
            except OSError:
                pass
        self._files = {}

    def close(self) -> None:
        """Close the open shard files (they reopen on the next read)."""
        self._drop_files()
        self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_files"], state["_pid"] = {}, None  # file handles do not pickle: reopened on first read
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __del__(self) -> None:
        try:
            self._drop_files()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    file = tar.extractfile(info)
    if file is None:
        return b""
    with file:
        return file.read()
