"""A transformers ``CLIPModel`` folder (``config.json`` + ``model.safetensors``): read strictly, written
so ``transformers.CLIPModel.from_pretrained`` loads it."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..models.clip_model import CLIPConfig, CLIPModel, normalize_clip_keys
from .diffusers_folder import ComponentKind, find_weights, read_json
from .errors import CheckpointError
from .io import load_strict, read_state_dict, write_safetensors

__all__ = ["load_clip_model", "save_clip_model"]


def save_clip_model(model: CLIPModel, folder: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write ``config.json`` + ``model.safetensors``, a folder ``transformers.CLIPModel.from_pretrained`` loads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    extra = {"torch_dtype": str(dtype).removeprefix("torch.")} if dtype is not None else {}
    model.config.save(folder / "config.json", **extra)
    state_dict = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
                  for k, v in model.state_dict().items()}
    write_safetensors(state_dict, folder / "model.safetensors")


def load_clip_model(
    folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> CLIPModel:
    """Load a transformers CLIPModel folder (``config.json`` + ``model.safetensors``, its shards, or
    ``pytorch_model.bin`` read with ``weights_only=True``), strictly: every key and shape must fit."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"no such folder: {folder}")
    raw = read_json(folder / "config.json")
    if raw.get("model_type") not in (None, "clip") or "CLIPModel" not in (raw.get("architectures") or ["CLIPModel"]):
        found = ", ".join(raw.get("architectures") or []) or raw.get("model_type")
        raise CheckpointError(f"{folder / 'config.json'} describes {found!r}, not a CLIPModel")
    config = CLIPConfig.from_dict(raw, source=folder / "config.json")
    kind = ComponentKind("clip", CLIPConfig, CLIPModel, "model", "pytorch_model", "transformers")
    state_dict: dict[str, Tensor] = {}
    for path in find_weights(folder, kind):
        state_dict.update(read_state_dict(path))
    state_dict, _dropped = normalize_clip_keys(state_dict)
    with torch.device("meta"):
        model = CLIPModel(config)
    load_strict(model, state_dict, f"CLIP model ({folder})", device=device, dtype=dtype)
    return model  # type: ignore[return-value]
