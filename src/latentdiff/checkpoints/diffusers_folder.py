"""The diffusers folder layout: ``model_index.json`` plus one folder per component.

    model_index.json
    unet/          config.json + diffusion_pytorch_model[.fp16].safetensors|.bin
    vae/           config.json + diffusion_pytorch_model[.fp16].safetensors|.bin
    text_encoder/  config.json + model[.fp16].safetensors | pytorch_model[.fp16].bin
    tokenizer/     vocab.json + merges.txt (SD 1.x) or tokenizer.json (transformers 5)
    scheduler/     scheduler_config.json

Because latentdiff's modules carry diffusers' parameter names, loading a
component is an identity copy of its state dict (after the text encoder's key
normalisation, which accepts both transformers 4 and 5 layouts).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..jsonfile import read_json_object
from ..models.clip import CLIPTextConfig, CLIPTextModel, normalize_text_encoder_keys
from ..models.config import ModelConfig
from ..models.tokenizer import CLIPTokenizer
from ..models.taesd import TAESDConfig, TinyAutoencoder
from ..models.unet import UNet2DCondition, UNetConfig
from ..models.vae import AutoencoderKL, VAEConfig
from ..models.vq import VQConfig, VQModel
from .errors import CheckpointError
from .io import StateDict, load_strict, read_state_dict, trace_sources, write_safetensors

DIFFUSERS_VERSION = "0.30.0"  # written into configs; the oldest diffusers layout we write is compatible with


@dataclass(frozen=True)
class ComponentKind:
    """How one network component is stored in a diffusers folder."""

    name: str  # folder name in a pipeline folder
    config_cls: type[ModelConfig]
    model_cls: Callable[[Any], nn.Module]
    weight_stem: str  # safetensors file stem
    bin_stem: str  # legacy pickle (.bin) file stem
    library: str  # as written in model_index.json


KINDS: dict[str, ComponentKind] = {
    "unet": ComponentKind("unet", UNetConfig, UNet2DCondition, "diffusion_pytorch_model", "diffusion_pytorch_model", "diffusers"),
    "vae": ComponentKind("vae", VAEConfig, AutoencoderKL, "diffusion_pytorch_model", "diffusion_pytorch_model", "diffusers"),
    "text_encoder": ComponentKind("text_encoder", CLIPTextConfig, CLIPTextModel, "model", "pytorch_model", "transformers"),
}
#: A ``vae/`` (or lone) folder holding diffusers' ``VQModel`` (a VQ-GAN) instead of an AutoencoderKL.
VQ_VAE = ComponentKind("vae", VQConfig, VQModel, "diffusion_pytorch_model", "diffusion_pytorch_model", "diffusers")
#: A ``vae/`` (or lone) folder holding diffusers' ``AutoencoderTiny`` (TAESD) instead of an AutoencoderKL.
TINY_VAE = ComponentKind("vae", TAESDConfig, TinyAutoencoder, "diffusion_pytorch_model", "diffusion_pytorch_model",
                         "diffusers")


def kind_of_config(config: dict[str, Any], where: Path) -> ComponentKind:
    """Which network a ``config.json`` describes."""
    class_name = config.get("_class_name") or ""
    architectures = config.get("architectures") or []
    if class_name == "UNet2DConditionModel":
        return KINDS["unet"]
    if class_name == "AutoencoderKL":
        return KINDS["vae"]
    if class_name == "AutoencoderTiny":
        return TINY_VAE
    if class_name == "VQModel":
        return VQ_VAE
    if "CLIPTextModel" in architectures or config.get("model_type") == "clip_text_model":
        return KINDS["text_encoder"]
    found = class_name or ", ".join(architectures) or config.get("model_type") or "nothing"
    raise CheckpointError(
        f"{where}: config describes {found!r}; latentdiff loads UNet2DConditionModel, AutoencoderKL, AutoencoderTiny, VQModel and CLIPTextModel"
    )


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or a CheckpointError naming the file."""
    return read_json_object(path, CheckpointError)


def find_weights(folder: Path, kind: ComponentKind, variant: str | None = None) -> list[Path]:
    """The weight file(s) of a component folder: safetensors before .bin, full precision before the variant.

    Returns several paths for a sharded checkpoint (``*.index.json``).
    """
    variants = [f".{variant}", ""] if variant else ["", ".fp16"]
    candidates = [f"{kind.weight_stem}{v}.safetensors" for v in variants] + [f"{kind.bin_stem}{v}.bin" for v in variants]
    for name in candidates:
        single = folder / name
        if single.is_file():
            return [single]
        index = folder / f"{name}.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no weight_map")
            return [folder / shard for shard in sorted(set(weight_map.values()))]
    raise CheckpointError(f"no weights in {folder}: looked for {', '.join(candidates)}")


def read_component_state_dict(folder: Path, kind: ComponentKind, variant: str | None = None) -> StateDict:
    """All tensors of a component folder, in latentdiff's (= diffusers') key layout."""
    return read_component(folder, kind, variant)[0]


def read_component(folder: Path, kind: ComponentKind, variant: str | None = None) -> tuple[StateDict, dict[str, str]]:
    """All tensors of a component folder (latentdiff's key layout) and where each was read (:func:`trace_sources`)."""
    files = {path: read_state_dict(path) for path in find_weights(folder, kind, variant)}
    state_dict: StateDict = {}
    for tensors in files.values():
        state_dict.update(tensors)
    if kind.name == "text_encoder":
        state_dict, _ignored = normalize_text_encoder_keys(state_dict)
    return state_dict, trace_sources(state_dict, files)


def build_model(
    kind: ComponentKind,
    config: ModelConfig,
    state_dict: StateDict,
    device: torch.device | str,
    dtype: torch.dtype | None,
    where: str,
    sources: Mapping[str, str] | None = None,
) -> nn.Module:
    """Instantiate on the meta device (no random init), then assign the weights strictly.

    ``sources`` (key -> file and key it was read from) makes load errors name the file.
    """
    with torch.device("meta"):
        model = kind.model_cls(config)
    return load_strict(model, state_dict, where, device=device, dtype=dtype, sources=sources)


def load_component_folder(
    folder: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    variant: str | None = None,
) -> nn.Module | CLIPTokenizer:
    """Load one component folder: a network (by its config.json) or a tokenizer."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"no such folder: {folder}")
    config_path = folder / "config.json"
    if not config_path.is_file():
        if any((folder / n).is_file() for n in ("vocab.json", "tokenizer.json")):
            return CLIPTokenizer.from_folder(folder)
        raise CheckpointError(f"{folder} has no config.json: not a diffusers component folder")
    raw = read_json(config_path)
    kind = kind_of_config(raw, config_path)
    config = kind.config_cls.from_dict(raw, source=config_path)
    state_dict, sources = read_component(folder, kind, variant)
    return build_model(kind, config, state_dict, device, dtype, f"{kind.name} ({folder})", sources)


def save_component(model: nn.Module, folder: str | Path, kind_name: str, dtype: torch.dtype | None = None) -> None:
    """Write ``config.json`` and ``<stem>.safetensors`` for one network."""
    kind = KINDS[kind_name]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config: ModelConfig = model.config  # type: ignore[assignment]
    extra = {"_diffusers_version": DIFFUSERS_VERSION} if kind.library == "diffusers" else {}
    if dtype is not None:
        extra["torch_dtype"] = str(dtype).removeprefix("torch.")
    config.save(folder / "config.json", **extra)
    state_dict = model.state_dict()
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    write_safetensors(state_dict, folder / f"{kind.weight_stem}.safetensors")


def save_pipeline_folder(folder: str | Path, components: dict[str, nn.Module], tokenizer: Any,
                         scheduler: dict[str, Any], dtype: torch.dtype | None = None) -> None:
    """Write a diffusers ``StableDiffusionPipeline`` folder: each component (``unet``, ``vae``,
    ``text_encoder``) in its sub-folder, ``tokenizer/``, ``scheduler/scheduler_config.json`` and
    ``model_index.json``, which diffusers' ``from_pretrained`` loads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, model in components.items():
        save_component(model, folder / name, name, dtype)
    tokenizer.save(folder / "tokenizer")
    (folder / "scheduler").mkdir(exist_ok=True)
    scheduler = {**scheduler, "_diffusers_version": DIFFUSERS_VERSION}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler.get("_class_name", "DDIMScheduler")],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", type(components["vae"].config)._class_name if "vae" in components else "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
