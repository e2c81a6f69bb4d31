"""What a client may name: checkpoints (A1111 titles ``name [hash10]``), LoRAs and embeddings.

Only names from these lists ever become filesystem paths; a name not in a list is a 4xx that
names it (A1111 falls back to another model silently; latentdiff does not).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from ..adapters.embeddings import embedding_files
from ..adapters.prompt_loras import LORA_SUFFIXES
from ..checkpoints.io import sha256_file
from ..errors import BadArgument
from ..loading import BUILTIN_MODEL

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One entry of ``/sdapi/v1/sd-models``."""

    model_name: str
    path: Path
    sha256: str

    @property
    def short_hash(self) -> str:
        return self.sha256[:10]

    @property
    def title(self) -> str:
        return f"{self.model_name} [{self.short_hash}]"

    def as_a1111(self) -> dict:
        return {"title": self.title, "model_name": self.model_name, "hash": self.short_hash,
                "sha256": self.sha256, "filename": self.path.name, "config": None}


def checkpoint_sha256(path: Path) -> str:
    """A1111 hashes the checkpoint file; a diffusers folder is hashed over its UNet weight files."""
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for weights in sorted((path / "unet").glob("*.safetensors")) or sorted((path / "unet").glob("*.bin")):
        digest.update(bytes.fromhex(sha256_file(weights)))
    return digest.hexdigest()


class Catalogue:
    """The checkpoints (the startup model plus ``models_dir``), LoRAs and embeddings on offer."""

    def __init__(self, model: str | None, models_dir: Path | None, lora_dirs: list[Path],
                 embeddings_dir: Path | None, tokenizer: str | None = None) -> None:
        self.startup = Path(model) if model else BUILTIN_MODEL
        self.models_dir, self.lora_dirs, self.embeddings_dir = models_dir, lora_dirs, embeddings_dir
        self.tokenizer = tokenizer
        self._hashes: dict[tuple[Path, float], str] = {}
        self.checkpoints: list[Checkpoint] = []
        self.refresh()

    def _checkpoint(self, path: Path) -> Checkpoint:
        key = (path.resolve(), path.stat().st_mtime)
        if key not in self._hashes:
            self._hashes[key] = checkpoint_sha256(path)
        name = path.stem if path.is_file() else path.name
        return Checkpoint(name, path, self._hashes[key])

    def refresh(self) -> None:
        """Re-read ``models_dir`` (``/refresh-checkpoints``)."""
        found = [self.startup]
        if self.models_dir is not None:
            for entry in sorted(self.models_dir.iterdir()):
                if entry.is_dir() and (entry / "model_index.json").is_file():
                    found.append(entry)
                elif (entry.is_file() and entry.suffix.lower() in SINGLE_FILE_SUFFIXES
                      and self.tokenizer is not None):
                    found.append(entry)  # a single file carries no tokenizer: listed only with --tokenizer
        unique = {p.resolve(): p for p in found}
        self.checkpoints = [self._checkpoint(p) for p in unique.values()]

    def find(self, name: str) -> Checkpoint:
        """A checkpoint by title, name, short hash or full sha256 (A1111 accepts each)."""
        if not isinstance(name, str):
            raise BadArgument(f"sd_model_checkpoint must be a string, got {type(name).__name__}")
        wanted = name.strip()
        for ckpt in self.checkpoints:
            if wanted in (ckpt.title, ckpt.model_name, ckpt.short_hash, ckpt.sha256, ckpt.path.name):
                return ckpt
        known = ", ".join(c.title for c in self.checkpoints)
        raise BadArgument(f"sd_model_checkpoint {name!r} is not a known model; known: {known}")

    def loras(self) -> list[dict]:
        """``/sdapi/v1/loras``: paths relative to their LoRA folder (no server paths leak)."""
        out = []
        for folder in self.lora_dirs:
            for path in sorted(folder.rglob("*")):
                if path.suffix.lower() in LORA_SUFFIXES and path.is_file():
                    out.append({"name": path.stem, "alias": path.stem, "path": str(path.relative_to(folder)),
                                "metadata": {}})
        return out

    def embedding_files(self) -> list[Path]:
        return [] if self.embeddings_dir is None else embedding_files(self.embeddings_dir)
