"""Building the networks a training run starts from: presets, config files, checkpoints.

A fresh network is initialised inside ``torch.random.fork_rng`` seeded from the
run's seed: the draw is reproducible, and the caller's global RNG is left as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..models.config import ModelConfig
from ..models.unet import UNetConfig
from ..jsonfile import read_json_object
from ..models.vae import AutoencoderKL, VAEConfig
from ..models.vq import VQConfig, VQModel

if TYPE_CHECKING:
    from ..pipeline import Pipeline


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's global CPU RNG seeded to ``seed``, restoring it afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def model_config(spec: str, cls: type[ModelConfig]) -> ModelConfig:
    """A preset name (a classmethod of ``cls``: "tiny", "sd15", ...) or a ``config.json`` path."""
    preset = getattr(cls, spec, None) if spec.isidentifier() else None
    if callable(preset) and not Path(spec).exists():
        return preset()
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"{spec!r} is neither a {cls.__name__} preset (e.g. 'tiny', 'sd15') nor a config.json")
    return cls.load(path)


def fresh_vae(spec: str, seed: int) -> AutoencoderKL:
    """A randomly initialised VAE from a preset or config file."""
    config = model_config(spec, VAEConfig)
    with seeded(seed):
        return AutoencoderKL(config)  # type: ignore[arg-type]


def fresh_vq(spec: str, seed: int, num_codes: int, code_dim: int | None) -> VQModel:
    """A randomly initialised VQ autoencoder: a ``VQModel`` config.json, or a VAE preset / config
    (its encoder and decoder layout) with a codebook of ``num_codes`` vectors of width ``code_dim``."""
    path = Path(spec)
    if path.is_file() and read_json_object(path).get("_class_name") == "VQModel":
        config = VQConfig.load(path)
    else:
        layout = model_config(spec, VAEConfig)
        shared = {f.name: getattr(layout, f.name) for f in dataclasses.fields(VQConfig) if hasattr(layout, f.name)}
        config = VQConfig(**{**shared, "num_vq_embeddings": num_codes, "vq_embed_dim": code_dim,
                             "force_upcast": False})
    with seeded(seed):
        return VQModel(config)


def load_vae(path: str | Path, device: torch.device | str = "cpu") -> AutoencoderKL:
    """A float32 VAE from a component folder or file, a pipeline folder's ``vae/`` or a single file."""
    from ..loading import load_vae as load

    return load(path, device=device, dtype=torch.float32)


def base_pipeline(pretrained: str | None) -> Pipeline:
    """The float32 pipeline an adapter is trained on: ``pretrained``, or the built-in model."""
    from ..loading import BUILTIN_MODEL, load

    return load(pretrained or BUILTIN_MODEL, device="cpu", dtype=torch.float32)


def unet_config(spec: str) -> UNetConfig:
    return model_config(spec, UNetConfig)  # type: ignore[return-value]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"auto" -> CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
