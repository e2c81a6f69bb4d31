"""``latentdiff.load`` and ``latentdiff.load_component``: every checkpoint layout people have.

- a diffusers pipeline folder (``model_index.json``);
- an original single-file SD 1.x checkpoint (``.safetensors``, or ``.ckpt`` read with
  ``weights_only=True``), its configs worked out from the tensor shapes; the
  tokenizer then comes from a folder the user names (single files carry none);
- a lone component: a diffusers component folder, or a stand-alone VAE file in
  either layout (e.g. an ``ft-mse`` VAE to swap in).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .checkpoints import single_file
from .checkpoints.diffusers_folder import KINDS, build_model, kind_of_config, load_component_folder, read_json
from .checkpoints.errors import CheckpointError
from .errors import BadArgument, BadFile
from .checkpoints.io import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, StateDict, read_state_dict, trace_sources
from .models.clip import normalize_text_encoder_keys
from .models.tokenizer import CLIPTokenizer
from .checkpoints import taesd_files
from .models.taesd import TinyAutoencoder
from .models.vq import VQModel
from .models.vae import AutoencoderKL, VAEConfig
from .pipeline import PREVIEW_FOLDER, Pipeline
from .speed.dtype import DTYPES, choose_dtype
from .speed.compile import compile_unet
from .speed.prepack import prepack_convolutions
from .schedule import ScheduleConfig

BUILTIN_MODEL = Path(__file__).parent / "weights" / "shapes-v2"

WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES


def shown_path(path: str | Path) -> str:
    """``path`` as reports show it: inside the installed package as ``latentdiff/...`` (so a
    report names the built-in model's files the same way on every machine), else as given."""
    try:
        return str(Path("latentdiff") / Path(path).resolve().relative_to(Path(__file__).parent.resolve()))
    except ValueError:
        return str(path)


def load(
    path: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    *,
    tokenizer: str | Path | None = None,
    vae: str | Path | None = None,
    variant: str | None = None,
    lora_dirs: Sequence[str | Path] = (),
    compile: bool = False,
    preview_vae: str | Path | None = None,
) -> Pipeline:
    """Load a Stable Diffusion pipeline.

    Args:
        path: a diffusers folder or an original single file; None for the built-in model.
        device, dtype: where the networks live and their floating point type; ``None`` (or
            "auto") picks the machine's fastest safe one (:func:`latentdiff.speed.choose_dtype`:
            bfloat16 on a CPU with native bf16, float16 on CUDA, else float32), recorded in
            ``pipe.dtype_reason``.
        tokenizer: tokenizer folder for a single-file checkpoint (or to override a folder's).
        vae: a VAE folder or file that replaces the checkpoint's own (also TAESD: an
            ``AutoencoderTiny`` folder, an original ``taesd_decoder``/``taesd_encoder`` file or their folder).
        variant: weight-file variant to prefer in a diffusers folder (e.g. "fp16").
        lora_dirs: folders holding the LoRAs that prompts tag as ``<lora:NAME:WEIGHT>``.
        compile: compile the UNet with ``torch.compile`` (:mod:`latentdiff.speed.compile`; the
            first generation pays the compile time).
        preview_vae: a tiny autoencoder (TAESD) that decodes step previews (``pipe.preview``);
            default: the model folder's ``taesd/`` when it has one (the built-in model does).
    """
    device = check_device(device)
    if dtype is None or dtype == "auto":
        choice = choose_dtype(device)
        dtype, reason = choice.dtype, choice.reason
    else:
        dtype = check_dtype(dtype)
        reason = f"{str(dtype).removeprefix('torch.')} (asked for)"
    folders = [Path(d) for d in ([lora_dirs] if isinstance(lora_dirs, (str, Path)) else lora_dirs)]
    for folder in folders:
        if not folder.is_dir():
            raise BadFile(f"LoRA folder {folder} is not a folder")
    if path is None:
        if not (BUILTIN_MODEL / "model_index.json").is_file():
            raise CheckpointError(
                "the built-in model is not installed in this version of latentdiff; pass a model path"
            )
        path = BUILTIN_MODEL
    path = Path(path)
    if path.is_dir():
        pipe = _load_folder(path, device, dtype, variant)
        if tokenizer is not None:
            pipe.tokenizer = CLIPTokenizer.from_folder(tokenizer)
    elif path.is_file():
        if tokenizer is None:
            raise CheckpointError(
                f"{path.name} is a single-file checkpoint, which carries no tokenizer: "
                "name a tokenizer folder (vocab.json + merges.txt, or tokenizer.json)"
            )
        pipe = _load_single_file(path, device, dtype, CLIPTokenizer.from_folder(tokenizer))
    else:
        raise CheckpointError(f"no such model file or folder: {path}")
    if vae is not None:
        new_vae = load_component(vae, device=device, dtype=dtype)
        if not isinstance(new_vae, (AutoencoderKL, TinyAutoencoder, VQModel)):
            raise CheckpointError(f"{vae} is not a VAE")
        pipe.vae = new_vae
    if preview_vae is None and path.is_dir() and (path / PREVIEW_FOLDER / "config.json").is_file():
        preview_vae = path / PREVIEW_FOLDER
    if preview_vae is not None:
        tiny = load_component(preview_vae, device=device, dtype=dtype)
        if not isinstance(tiny, TinyAutoencoder):
            raise CheckpointError(f"{preview_vae} is not a tiny autoencoder (AutoencoderTiny / TAESD)")
        pipe.preview_vae = tiny
    pipe.lora_dirs = folders
    pipe.dtype_reason = reason
    for network in (pipe.unet, pipe.vae):
        prepack_convolutions(network)  # CPU inference reuses oneDNN-ordered conv weights (latentdiff.speed.prepack)
    if compile:
        compile_unet(pipe)
    return pipe


def _load_folder(folder: Path, device: torch.device | str, dtype: torch.dtype, variant: str | None) -> Pipeline:
    index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else None
    if index is None:
        raise CheckpointError(f"{folder} has no model_index.json: not a diffusers pipeline folder")
    parts: dict[str, nn.Module] = {}
    for name in KINDS:
        if not (folder / name).is_dir():
            raise CheckpointError(f"{folder} is missing its {name}/ folder")
        parts[name] = load_component_folder(folder / name, device, dtype, variant)  # type: ignore[assignment]
    tokenizer = CLIPTokenizer.from_folder(folder / "tokenizer")
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    schedule = read_schedule(scheduler_file) if scheduler_file.is_file() else ScheduleConfig()
    return Pipeline(
        unet=parts["unet"],
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=tokenizer,
        schedule=schedule,
        name=folder.name,
    )


def _build_from_original(sd: StateDict, device, dtype, where: str) -> tuple[nn.Module, nn.Module, nn.Module]:
    configs = single_file.infer_configs(sd)
    unet_sd, vae_sd, text_sd, ignored = single_file.split_single_file(sd)
    if ignored:
        warnings.warn(f"{where}: ignored {len(ignored)} non-weight entries (e.g. {', '.join(ignored[:3])})", stacklevel=3)
    models = []
    for kind, part, name in ((KINDS["unet"], unet_sd, "unet"), (KINDS["vae"], vae_sd, "vae"),
                             (KINDS["text_encoder"], text_sd, "text encoder")):
        config = kind.config_cls.from_dict(configs[kind.name], source=f"{where} (inferred {name} config)")
        sources = trace_sources(part, {where: sd})
        models.append(build_model(kind, config, part, device, dtype, f"{name} ({where})", sources))
    unet, vae, text = models
    return unet, vae, text


def _load_single_file(path: Path, device, dtype, tokenizer: CLIPTokenizer) -> Pipeline:
    sd = read_state_dict(path)
    unet, vae, text = _build_from_original(sd, device, dtype, path.name)
    return Pipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, schedule=ScheduleConfig(), name=path.stem)


def check_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A floating-point dtype, given as a torch dtype or its name ("float16"); else BadArgument."""
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    raise BadArgument(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def check_device(device: torch.device | str) -> torch.device:
    """A torch device that exists on this machine ("cpu", "cuda", "cuda:1", "mps"); else BadArgument."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise BadArgument(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:0, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BadArgument(f"device {str(device)!r}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BadArgument(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise BadArgument(f"device {str(device)!r}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise BadArgument(f"device {str(device)!r} is not supported (cpu, cuda, mps)")
    return device


def read_schedule(path: Path) -> ScheduleConfig:
    """A ``scheduler_config.json``; an impossible value is a :class:`CheckpointError` naming the file and field."""
    try:
        return ScheduleConfig.from_dict(read_json(path))
    except ValueError as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{path}: {err}") from None


def load_component(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    variant: str | None = None,
) -> nn.Module | CLIPTokenizer:
    """Load one component: a diffusers component folder (unet/, vae/, text_encoder/, tokenizer/),
    a weight file inside such a folder, or a stand-alone VAE single file in the original layout;
    for TAESD also an original ``taesd_decoder`` / ``taesd_encoder`` file (with its other half when
    it sits beside it) or a folder of them.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            found = taesd_files.find_in_folder(path)
            if found:
                return taesd_files.load_folder(path, found, device, dtype)
        return load_component_folder(path, device, dtype, variant)
    if not path.is_file():
        raise CheckpointError(f"no such component file or folder: {path}")
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise CheckpointError(f"{path.name}: not a weight file ({', '.join(WEIGHT_SUFFIXES)})")
    if (path.parent / "config.json").is_file():  # a weight file inside a component folder
        raw = read_json(path.parent / "config.json")
        kind = kind_of_config(raw, path.parent / "config.json")
        config = kind.config_cls.from_dict(raw, source=path.parent / "config.json")
        sd = read_state_dict(path)
        if kind.name == "text_encoder":
            sd, _ignored = normalize_text_encoder_keys(sd)
        return build_model(kind, config, sd, device, dtype, f"{kind.name} ({path})")
    return _load_lone_vae_file(path, device, dtype)


def load_vae(model: str | Path | None = None, device: torch.device | str = "cpu",
             dtype: torch.dtype | None = torch.float32) -> AutoencoderKL | TinyAutoencoder:
    """Only the VAE of ``model``: a diffusers pipeline folder (its ``vae/``), a lone VAE folder or
    file (either layout), an original single-file SD checkpoint (its ``first_stage_model.*``), or
    None for the built-in model."""
    if model is None:
        if not (BUILTIN_MODEL / "vae").is_dir():
            raise CheckpointError("the built-in model is not installed in this version of latentdiff; pass a model")
        path = BUILTIN_MODEL / "vae"
    else:
        path = Path(model)
        if path.is_dir() and (path / "model_index.json").is_file():
            if not (path / "vae").is_dir():
                raise CheckpointError(f"{path} is missing its vae/ folder")
            path = path / "vae"
    if path.is_file() and not (path.parent / "config.json").is_file() and path.suffix.lower() in WEIGHT_SUFFIXES:
        vae = _load_lone_vae_file(path, device, dtype, whole_checkpoint=True)
    else:
        vae = load_component(path, device=device, dtype=dtype)
    if not isinstance(vae, (AutoencoderKL, TinyAutoencoder, VQModel)):
        raise CheckpointError(f"{path} is a {type(vae).__name__}, not a VAE")
    return vae.eval()


def infer_vae_config(original: StateDict, source: str) -> VAEConfig:
    """The config of a VAE in the original layout (``first_stage_model.*`` keys), from its tensor shapes."""
    return VAEConfig.from_dict(single_file._infer_vae(original), source=f"{source} (inferred vae config)")


def _load_lone_vae_file(path: Path, device, dtype, *, whole_checkpoint: bool = False) -> nn.Module:
    """A VAE single file in the original layout (``encoder.down.0...`` or ``first_stage_model.*``);
    with ``whole_checkpoint`` a whole SD checkpoint gives its ``first_stage_model.*`` part.
    An original TAESD file (``nn.Sequential`` index keys) gives a TinyAutoencoder."""
    sd = read_state_dict(path)
    if taesd_files.is_original_layout(sd):
        return taesd_files.load_file(path, sd, device, dtype)
    keys = list(sd)
    if any(k.startswith(("encoder.layers.", "decoder.layers.")) for k in keys):  # diffusers' AutoencoderTiny
        raise CheckpointError(f"{path.name}: a diffusers-layout AutoencoderTiny file needs its config.json beside it")
    pipeline_file = any(k.startswith("model.diffusion_model.") for k in keys)
    if pipeline_file and not whole_checkpoint:
        raise CheckpointError(f"{path.name} is a whole pipeline checkpoint: load it with latentdiff.load()")
    if pipeline_file:
        sd = {k: v for k, v in sd.items() if k.startswith("first_stage_model.")}
        if not sd:
            raise CheckpointError(f"{path.name} holds no VAE weights (no first_stage_model.* keys)")
        keys = list(sd)
    if not any(k.startswith(("encoder.", "decoder.", "first_stage_model.")) for k in keys):
        raise CheckpointError(f"{path.name}: neither a VAE nor a pipeline checkpoint (first keys: {', '.join(keys[:3])})")
    vae_sd = {
        k.removeprefix("first_stage_model."): v
        for k, v in sd.items()
        if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "first_stage_model."))
    }
    if any(k.startswith("encoder.down_blocks.") for k in vae_sd):  # already the diffusers layout
        raise CheckpointError(f"{path.name}: a diffusers-layout VAE file needs its config.json beside it")
    ignored = sorted(set(sd) - {k for k in sd if k.removeprefix("first_stage_model.") in vae_sd})
    if ignored:
        warnings.warn(f"{path.name}: ignored {len(ignored)} non-VAE entries (e.g. {', '.join(ignored[:3])})", stacklevel=3)
    original = {f"first_stage_model.{k}": v for k, v in vae_sd.items()}
    config = infer_vae_config(original, path.name)
    diffusers_sd = single_file.vae_from_original(original, config)
    sources = trace_sources(diffusers_sd, {path.name: sd})
    return build_model(KINDS["vae"], config, diffusers_sd, device, dtype, f"vae ({path.name})", sources)
