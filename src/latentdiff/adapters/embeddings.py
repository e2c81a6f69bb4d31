"""Textual-inversion embeddings: read the files people have, trigger them by name as A1111 does.

Formats read (never by full unpickling: pickles go through ``torch.load(weights_only=True)``):

* A1111 ``.pt``: ``{"string_to_param": {"*": tensor (n, D)}, "name": ..., "step": ...}``
* A1111 ``.safetensors``: ``{"emb_params": tensor (n, D)}``
* diffusers ``learned_embeds.bin`` / ``.safetensors``: ``{token: tensor (D,) or (n, D)}``

An embedding's trigger is its name (the file stem, or ``token=``). Wherever the token ids of a
prompt fragment contain the run of ids the name tokenizes to, the run is replaced by the n
vectors (see :func:`latentdiff.prompts.tokenize_weighted`).

:func:`embedding_hash` is A1111's "TI hashes" value: sha256 of the file's bytes, first 12 hex
digits (A1111's ``Embedding.set_hash``: ``shorthash = hash[0:12]``, over
``hashes.sha256(filename, ...)``, the whole file).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..checkpoints.errors import CheckpointError
from ..checkpoints.io import (
    PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, _CORRUPT_PICKLE, _unpickling_reason, read_state_dict, sha256_file,
)
from ..errors import BadArgument
from ..prompts import find_embedding_runs, parse_weighted_prompt

if TYPE_CHECKING:
    from ..pipeline import Pipeline

__all__ = ["read_embedding", "embedding_hash", "load_textual_inversion", "unload_textual_inversion",
           "embedding_lookup", "used_embeddings", "ti_hashes_field"]

SHORT_HASH_DIGITS = 12  # A1111: Embedding.shorthash = hash[0:12]


def _load_pickle(path: Path) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = _unpickling_reason(err)
        if "global" not in reason.lower():
            raise CheckpointError(f"corrupt or truncated embedding file {path}: {reason}") from None
        raise CheckpointError(
            f"embedding file {path} holds objects other than tensors and was not unpickled "
            f"(weights_only=True): {reason}"
        ) from None
    except _CORRUPT_PICKLE as err:
        raise CheckpointError(f"corrupt or truncated embedding file {path}: {str(err).strip().splitlines()[0:1]}") from None


def _only_tensor(path: Path, data: Mapping[str, Any], what: str) -> Tensor:
    tensors = {k: v for k, v in data.items() if isinstance(v, Tensor)}
    if len(tensors) != 1:
        raise CheckpointError(
            f"{path}: not a textual-inversion embedding ({what} holds {len(tensors)} tensors: "
            f"{', '.join(list(tensors)[:5]) or 'none'}; expected one)"
        )
    return next(iter(tensors.values()))


def read_embedding(path: str | Path) -> Tensor:
    """The vectors of an embedding file, (n, D) float32 on the CPU (any of the formats above)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        data: Any = read_state_dict(path)
    elif suffix in PICKLE_SUFFIXES:
        if not path.is_file():
            raise CheckpointError(f"no such embedding file: {path}")
        data = _load_pickle(path)
    else:
        raise CheckpointError(f"unknown embedding file type {path.name!r}: expected .pt, .bin or .safetensors")
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path} does not hold a textual-inversion embedding (found {type(data).__name__})")
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        if isinstance(params, Tensor):
            vectors = params
        elif isinstance(params, Mapping):
            vectors = params["*"] if isinstance(params.get("*"), Tensor) else _only_tensor(path, params, "string_to_param")
        else:
            raise CheckpointError(f"{path}: string_to_param is a {type(params).__name__}, not a tensor mapping")
    elif isinstance(data.get("emb_params"), Tensor):  # A1111 .safetensors
        vectors = data["emb_params"]
    elif "clip_l" in data or "clip_g" in data:
        raise CheckpointError(f"{path} is an SDXL embedding (clip_l/clip_g); only SD 1.x embeddings are supported")
    else:  # diffusers learned_embeds: {token: (D,) or (n, D)}
        vectors = _only_tensor(path, data, "the file")
    if not vectors.is_floating_point() or vectors.dim() not in (1, 2) or vectors.numel() == 0:
        raise CheckpointError(
            f"{path}: embedding vectors must be a non-empty float tensor (D,) or (n, D), "
            f"got {vectors.dtype} of shape {tuple(vectors.shape)}"
        )
    vectors = vectors.detach().float().reshape(-1, vectors.shape[-1])  # (n, D)
    if not torch.isfinite(vectors).all():
        raise CheckpointError(f"{path}: embedding holds non-finite values")
    return vectors.contiguous()


def embedding_hash(path: str | Path) -> str:
    """A1111's "TI hashes" value of a file: sha256 of its bytes, first 12 hex digits."""
    return sha256_file(path)[:SHORT_HASH_DIGITS]


#: the file kinds a folder of embeddings holds (A1111's embeddings/ folder)
EMBEDDING_SUFFIXES = (".pt", ".safetensors", ".bin")


def embedding_files(folder: str | Path) -> list[Path]:
    """The embedding files directly in ``folder``, sorted by name (their stems are the trigger names)."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in EMBEDDING_SUFFIXES and p.is_file())


# ----------------------------------------------------------------------------- on a pipeline
def load_textual_inversion(pipe: Pipeline, path: str | Path, token: str | None = None) -> str:
    """Read ``path`` into ``pipe.embeddings`` under ``token`` (default: the file stem); returns the name.

    A width that is not the text encoder's hidden size, or more vectors than one 75-token chunk
    holds, is a :class:`CheckpointError` naming the file.
    """
    path = Path(path)
    name = path.stem if token is None else token
    if not isinstance(name, str) or not name.strip():
        raise BadArgument(f"textual-inversion token must be a non-empty string, got {name!r}")
    if not pipe.tokenizer.encode(name):
        raise BadArgument(f"textual-inversion name {name!r} tokenizes to nothing and could never be triggered")
    vectors = read_embedding(path)  # (n, D)
    width = pipe.text_encoder.config.hidden_size
    if vectors.shape[1] != width:
        raise CheckpointError(
            f"{path}: embedding width D={vectors.shape[1]} does not fit the text encoder "
            f"(expected hidden size {width})"
        )
    body = pipe.tokenizer.model_max_length - 2
    if vectors.shape[0] > body:
        raise CheckpointError(f"{path}: embedding has {vectors.shape[0]} vectors, more than a {body}-token chunk holds")
    pipe.embeddings[name] = vectors
    pipe.embedding_files[name] = path
    return name


def unload_textual_inversion(pipe: Pipeline, name: str | None = None) -> None:
    """Forget embedding ``name`` (all of them when None); an unknown name is a BadArgument."""
    if name is None:
        pipe.embeddings.clear()
        pipe.embedding_files.clear()
        return
    if name not in pipe.embeddings:
        raise BadArgument(f"no textual-inversion embedding named {name!r} is loaded "
                          f"(loaded: {', '.join(pipe.embeddings) or 'none'})")
    del pipe.embeddings[name]
    pipe.embedding_files.pop(name, None)


def embedding_lookup(pipe: Pipeline) -> dict[tuple[int, ...], tuple[str, Tensor]]:
    """Token-id run of each loaded name -> (name, vectors (n, D)); a later load of the same run wins."""
    return {tuple(pipe.tokenizer.encode(name)): (name, vectors) for name, vectors in pipe.embeddings.items()}


def used_embeddings(pipe: Pipeline, prompts: Iterable[str]) -> list[str]:
    """Names of the loaded embeddings that ``prompts`` trigger, in order of first use."""
    lookup = embedding_lookup(pipe)
    used: list[str] = []
    if not lookup:
        return used
    for prompt in prompts:
        for text, _ in parse_weighted_prompt(prompt):
            for _, _, (name, _) in find_embedding_runs(pipe.tokenizer.encode(text), lookup):
                if name not in used:
                    used.append(name)
    return used


def ti_hashes_field(pipe: Pipeline, prompts: Iterable[str], negatives: Iterable[str]) -> str:
    """A1111's ``TI hashes`` value, ``"name: hash, ..."`` ("" when no embedding is used).

    As A1111 writes it: the prompts' embeddings, then the negative prompts' (an embedding used in
    both appears twice); ``:`` and ``,`` are removed from names.
    """
    if not getattr(pipe, "embeddings", None):
        return ""
    entries = []
    for names in (used_embeddings(pipe, prompts), used_embeddings(pipe, negatives)):
        for name in names:
            if name not in pipe.embedding_files:
                continue  # set in memory (a trainer's vectors): no file to hash
            shown = name.replace(":", "").replace(",", "")
            entries.append(f"{shown}: {embedding_hash(pipe.embedding_files[name])}")
    return ", ".join(entries)
