"""madebyollin's original TAESD files: ``taesd_encoder.pth`` / ``taesd_decoder.pth`` (or ``.safetensors``).

Each file is the state dict of an ``nn.Sequential`` with integer keys (``0.weight``,
``1.conv.0.weight``, ...). The layers are diffusers' ``EncoderTiny.layers`` /
``DecoderTiny.layers`` one for one, except that the original decoder starts with a
parameterless clamp at index 0, so::

    encoder:  "{i}.rest"  <->  "encoder.layers.{i}.rest"
    decoder:  "{i}.rest"  <->  "decoder.layers.{i - 1}.rest"

Which half a file holds is read from its content (an encoder has ``0.weight``; a decoder's
index 0 is the clamp). The config (widths, blocks per level, channels) is worked out from the
tensor shapes; the upsampling factor is TAESD's 2. The other half is looked for beside the
file under the matching name (``taesd_decoder.safetensors`` -> ``taesd_encoder.*``); without
it the model holds one half only.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..models.config import ConfigError
from ..models.taesd import TAESDConfig, TinyAutoencoder
from .errors import CheckpointError
from .io import (PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, StateDict, fit_problems, load_strict, read_state_dict,
                 trace_sources)

HALVES = ("encoder", "decoder")
SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES  # preferred first
_OFFSET = {"encoder": 0, "decoder": 1}  # original index - diffusers index
_KEY = re.compile(r"^(\d+)\.(.+)$")
_NAME = re.compile(r"^(.*?)(encoder|decoder)$", re.IGNORECASE)


def is_original_layout(sd: StateDict) -> bool:
    """Whether every key is an ``nn.Sequential`` index key (``0.weight``, ``3.conv.2.bias``)."""
    return bool(sd) and all(_KEY.match(k) for k in sd)


def half_of(sd: StateDict) -> str:
    """"encoder" or "decoder": an encoder's first layer is a conv, a decoder's a parameterless clamp."""
    return "encoder" if "0.weight" in sd else "decoder"


def to_original(key: str) -> tuple[str, str]:
    """A diffusers key (``decoder.layers.3.conv.0.weight``) -> (half, original key ``4.conv.0.weight``)."""
    half, _, rest = key.partition(".layers.")
    index, _, tail = rest.partition(".")
    return half, f"{int(index) + _OFFSET[half]}.{tail}"


def from_original(half: str, key: str) -> str:
    """An original key of ``half``'s file -> its diffusers key."""
    index, _, tail = key.partition(".")
    return f"{half}.layers.{int(index) - _OFFSET[half]}.{tail}"


def _layers(sd: StateDict) -> list[tuple[int, str, torch.Tensor]]:
    """(index, "conv" | "block", weight) per layer, in order; entries of neither shape are skipped
    (the strict key check reports them)."""
    by_index: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in sd.items():
        m = _KEY.match(key)
        if m:
            by_index.setdefault(int(m.group(1)), {})[m.group(2)] = tensor
    out = []
    for index in sorted(by_index):
        entries = by_index[index]
        if "conv.0.weight" in entries and entries["conv.0.weight"].ndim == 4:
            out.append((index, "block", entries["conv.0.weight"]))
        elif "weight" in entries and entries["weight"].ndim == 4:
            out.append((index, "conv", entries["weight"]))
    return out


def _not_taesd(where: str, half: str, why: str) -> CheckpointError:
    return CheckpointError(f"{where}: not a TAESD {half} file in the original layout ({why})")


def _infer_encoder(sd: StateDict, where: str) -> dict:
    """conv(in -> w), blocks, [conv stride 2, blocks] ..., conv(w -> latent)."""
    layers = _layers(sd)
    if len(layers) < 2 or layers[0][1] != "conv" or layers[-1][1] != "conv":
        raise _not_taesd(where, "encoder", "it must start and end with a convolution")
    counts: list[int] = []
    widths: list[int] = []
    for _, kind, weight in layers[:-1]:
        if kind == "conv":
            counts.append(0)
            widths.append(int(weight.shape[0]))
        else:
            counts[-1] += 1
    return {
        "in_channels": int(layers[0][2].shape[1]),
        "latent_channels": int(layers[-1][2].shape[0]),
        "encoder_block_out_channels": widths,
        "num_encoder_blocks": counts,
    }


def _infer_decoder(sd: StateDict, where: str) -> dict:
    """conv(latent -> w), [blocks, conv] per level (the last conv to RGB)."""
    layers = _layers(sd)
    if len(layers) < 2 or layers[0][1] != "conv" or layers[-1][1] != "conv":
        raise _not_taesd(where, "decoder", "it must start and end with a convolution")
    counts: list[int] = [0]
    widths: list[int] = []
    for _, kind, weight in layers[1:]:
        if kind == "block":
            counts[-1] += 1
        else:
            widths.append(int(weight.shape[1]))
            counts.append(0)
    return {
        "latent_channels": int(layers[0][2].shape[1]),
        "out_channels": int(layers[-1][2].shape[0]),
        "decoder_block_out_channels": widths,
        "num_decoder_blocks": counts[:-1],
    }


def infer_config(files: dict[str, tuple[Path, StateDict]]) -> TAESDConfig:
    """The config of one or both halves (``{"encoder": (path, sd), "decoder": ...}``), from their shapes.

    A missing half gets a config of the same width and depth (it is not built).
    """
    fields: dict = {}
    for half, (path, sd) in files.items():
        part = (_infer_encoder if half == "encoder" else _infer_decoder)(sd, path.name)
        if "latent_channels" in fields and fields["latent_channels"] != part["latent_channels"]:
            names = " and ".join(p.name for p, _ in files.values())
            raise CheckpointError(f"{names} do not belong together: their latent channels differ "
                                  f"({fields['latent_channels']} vs {part['latent_channels']})")
        fields.update(part)
    if "encoder" not in files:
        levels, width = len(fields["decoder_block_out_channels"]), fields["decoder_block_out_channels"][-1:]
        fields.update(encoder_block_out_channels=width * levels, num_encoder_blocks=[1] + [3] * (levels - 1))
    if "decoder" not in files:
        levels, width = len(fields["encoder_block_out_channels"]), fields["encoder_block_out_channels"][-1:]
        fields.update(decoder_block_out_channels=width * levels, num_decoder_blocks=[3] * (levels - 1) + [1])
    source = " + ".join(p.name for p, _ in files.values()) + " (inferred TAESD config)"
    try:
        return TAESDConfig.from_dict(fields, source=source)
    except ConfigError as err:
        raise CheckpointError(str(err)) from None


def _check_keys(model: TinyAutoencoder, files: dict[str, tuple[Path, StateDict]]) -> None:
    """Missing / unexpected keys and shape mismatches, named by each file's own (original) keys."""
    expected: dict[str, dict[str, tuple[int, ...]]] = {half: {} for half in files}
    for key, tensor in model.state_dict().items():
        half, original = to_original(key)
        expected[half][original] = tuple(tensor.shape)
    for half, (path, sd) in files.items():
        problems = fit_problems(expected[half], sd, "file")
        if problems:
            raise CheckpointError(f"{path.name}: TAESD {half} weights do not fit the layout: " + "; ".join(problems))


def build(files: dict[str, tuple[Path, StateDict]], device: torch.device | str = "cpu",
          dtype: torch.dtype | None = None) -> TinyAutoencoder:
    """A TinyAutoencoder from one or both original files (already read), loaded strictly."""
    config = infer_config(files)
    with torch.device("meta"):
        model = TinyAutoencoder(config, encoder="encoder" in files, decoder="decoder" in files)
    _check_keys(model, files)
    converted = {from_original(half, k): v for half, (_, sd) in files.items() for k, v in sd.items()}
    sources = trace_sources(converted, {path.name: sd for path, sd in files.values()})
    where = "TAESD (" + " + ".join(p.name for p, _ in files.values()) + ")"
    model = load_strict(model, converted, where, device=device, dtype=dtype, sources=sources)
    if len(files) == 1:
        (path, _), = files.values()
        model.missing = {half: _partner_hint(path, half) for half in HALVES if half not in files}
    return model


def _partner_stem(path: Path, half: str) -> str | None:
    """``taesd_decoder.pth`` -> ``taesd_encoder`` for half "encoder"; None if the name has no half in it."""
    m = _NAME.match(path.stem)
    if not m:
        return None
    word = m.group(2)
    other = half if word.islower() else (half.upper() if word.isupper() else half.capitalize())
    return m.group(1) + other


def _partner_hint(path: Path, half: str) -> str:
    stem = _partner_stem(path, half)
    if stem is None:
        return f"the {half} file (e.g. taesd_{half}.safetensors)"
    return f"{stem}.safetensors (or .pth)"


def partner(path: Path, half: str) -> Path | None:
    """The file beside ``path`` holding ``half``, by name (safetensors preferred), if there is one."""
    stem = _partner_stem(path, half)
    if stem is None:
        return None
    for suffix in SUFFIXES:
        candidate = path.with_name(stem + suffix)
        if candidate.is_file() and candidate != path:
            return candidate
    return None


def load_file(path: Path, sd: StateDict, device: torch.device | str = "cpu",
              dtype: torch.dtype | None = None) -> TinyAutoencoder:
    """An original TAESD file (already read as ``sd``) and, when it sits beside it, its other half."""
    half = half_of(sd)
    files = {half: (path, sd)}
    other = "decoder" if half == "encoder" else "encoder"
    found = partner(path, other)
    if found is not None:
        other_sd = read_state_dict(found)
        if not is_original_layout(other_sd) or half_of(other_sd) != other:
            raise CheckpointError(f"{found.name} beside {path.name} is not a TAESD {other} file in the original layout")
        files[other] = (found, other_sd)
    return build({h: files[h] for h in HALVES if h in files}, device, dtype)


def find_in_folder(folder: Path) -> dict[str, Path]:
    """The original TAESD files of a folder: ``{"encoder": ..., "decoder": ...}`` (either may be
    absent; empty when there are none). Several sets (``taesd_*`` and ``taesdxl_*``) are an error."""
    sets: dict[str, dict[str, Path]] = {}
    for path in sorted(folder.iterdir()):
        m = _NAME.match(path.stem)
        if not m or path.suffix.lower() not in SUFFIXES or not path.is_file():
            continue
        chosen = sets.setdefault(m.group(1).lower(), {})
        half = m.group(2).lower()
        if half not in chosen or SUFFIXES.index(path.suffix.lower()) < SUFFIXES.index(chosen[half].suffix.lower()):
            chosen[half] = path
    if len(sets) > 1:
        names = ", ".join(p.name for s in sets.values() for p in s.values())
        raise CheckpointError(f"{folder} holds several TAESD encoder/decoder sets ({names}): name the file to load")
    return next(iter(sets.values()), {})


def load_folder(folder: Path, found: dict[str, Path], device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None) -> TinyAutoencoder:
    """The TAESD files ``found`` in ``folder`` (see :func:`find_in_folder`), read and built."""
    files = {}
    for half in HALVES:
        if half in found:
            sd = read_state_dict(found[half])
            if not is_original_layout(sd) or half_of(sd) != half:
                raise CheckpointError(f"{found[half].name} is not a TAESD {half} file in the original layout")
            files[half] = (found[half], sd)
    return build(files, device, dtype)
