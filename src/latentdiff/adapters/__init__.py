"""Adapters from the files people have: LoRA (kohya / A1111, diffusers / PEFT, attention
processors; here and in :mod:`.lora`, :mod:`.kohya`, :mod:`.peft`) and textual-inversion
embeddings (:mod:`.embeddings`).

:func:`read_lora` reads a file with the project's safe readers and turns it into checked
:class:`~.lora.LoraPatch` es (every key accounted for, every shape fitting a layer, strict
like checkpoint loading); :class:`~.lora.LoraState` merges them into the weights and
restores the originals exactly.  ``Pipeline.load_lora`` / ``unload_lora`` are the user API.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from ..checkpoints.errors import CheckpointError
from ..checkpoints.io import (
    SAFETENSORS_SUFFIXES,
    read_safetensors_header,
    read_state_dict,
    sha256_file,
)
from . import kohya, peft
from .embeddings import embedding_hash, read_embedding  # noqa: F401  (textual inversion)
from .lora import LoadedLora, LoraPatch, LoraState, check_patches, refuse_unsupported

__all__ = ["LoadedLora", "LoraPatch", "LoraState", "lora_hash", "read_lora"]


def read_lora(path: str | Path, networks: Mapping[str, nn.Module]) -> list[LoraPatch]:
    """The checked patches of a LoRA file for ``networks`` ({"unet": ..., "text_encoder": ...})."""
    path = Path(path)
    sd = read_state_dict(path)
    source = str(path)
    if not sd:
        raise CheckpointError(f"{source}: the file holds no tensors")
    refuse_unsupported(sd.keys(), source)
    ours = {k: v for k, v in sd.items() if kohya.is_kohya_key(k)}
    rest = {k: v for k, v in sd.items() if k not in ours}
    patches = kohya.parse(ours, networks, source) if ours else []
    if rest:
        patches += peft.parse(rest, source)
    for p in patches:
        if not p.down.is_floating_point() or not p.up.is_floating_point():
            raise CheckpointError(f"{source}: {p.key}: LoRA weights must be floating point")
    check_patches(patches, networks, source)
    return patches


def lora_hash(path: str | Path) -> str:
    """AUTOMATIC1111's "Lora hashes" value: the first 12 hex digits of a sha256.

    For ``.safetensors`` it is kohya's / sd-webui-additional-networks' hash, taken over the
    bytes after the header (so editing the metadata keeps it); for other files, over the
    whole file (A1111's ``hashes.sha256(..., use_addnet_hash=is_safetensors)``). A file is
    read once while its size and modification time stay the same (prompts that tag a LoRA
    ask for its hash on every call).
    """
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    return _file_hash(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _file_hash(path: str, size: int, mtime_ns: int) -> str:
    """:func:`lora_hash` of the file at ``path`` as it is now (``size`` and ``mtime_ns`` key the cache)."""
    start = 0
    if Path(path).suffix.lower() in SAFETENSORS_SUFFIXES:
        read_safetensors_header(path)  # refuses a file that is not safetensors
        with open(path, "rb") as f:
            start = 8 + int.from_bytes(f.read(8), "little")
    try:
        return sha256_file(path, start)[:12]
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
