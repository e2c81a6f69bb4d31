"""Reading and writing weight files safely, and strict loading into a module.

- ``.safetensors`` is preferred everywhere; ``.bin`` / ``.ckpt`` / ``.pt`` files are
  read with ``torch.load(weights_only=True)`` only, so a checkpoint can never run
  code on load.
- Writes are atomic (temporary file in the same folder, then ``os.replace``): an
  interrupted save never leaves a half-written checkpoint behind.
- ``load_strict`` accounts for every key and asserts every shape, naming what is
  wrong, instead of ``strict=False`` silently leaving random weights in place.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")

StateDict = dict[str, Tensor]


def read_state_dict(path: str | Path) -> StateDict:
    """Read all tensors of a weight file onto the CPU.

    ``.ckpt`` files that wrap their weights in ``{"state_dict": ...}`` are unwrapped;
    non-tensor entries (step counters and the like) are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such weight file: {path}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"corrupt or truncated safetensors file {path}: {err}") from None
    if suffix in PICKLE_SUFFIXES:
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise CheckpointError(
                f"{path} holds objects other than tensors and was not unpickled (weights_only=True): {first_line}"
            ) from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
            raise CheckpointError(f"corrupt or truncated checkpoint {path}: {err}") from None
        if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
            data = data["state_dict"]
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{path} does not hold a state dict (found {type(data).__name__})")
        return {k: v for k, v in data.items() if isinstance(v, Tensor)}
    raise CheckpointError(
        f"unknown weight file type {path.name!r}: expected one of "
        f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}"
    )


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_safetensors(state_dict: Mapping[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors to a ``.safetensors`` file atomically (tensors are made contiguous, unshared CPU copies)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata or {"format": "pt"})


def _name_some(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (and {len(keys) - limit} more)" if len(keys) > limit else shown


def check_state_dict(module: nn.Module, state_dict: Mapping[str, Tensor], what: str) -> None:
    """Raise CheckpointError naming missing keys, unexpected keys and shape mismatches."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_name_some(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_name_some(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_name_some(mismatched, 5)}")
    if problems:
        raise CheckpointError(f"{what} weights do not fit its config: " + "; ".join(problems))


def load_strict(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    what: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load every weight into ``module`` (which may live on the meta device), strictly.

    Tensors are cast to ``dtype`` (floating point only) and moved to ``device`` one by
    one, then assigned, so the model is never materialised twice in memory.
    """
    check_state_dict(module, state_dict, what)
    converted = {}
    for key, tensor in state_dict.items():
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        converted[key] = tensor.to(device)
    module.load_state_dict(converted, strict=True, assign=True)
    leftovers = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if leftovers:
        raise CheckpointError(f"{what}: tensors not set by the checkpoint: {_name_some(leftovers)}")
    return module.eval()
