"""Reading and writing weight files safely, and strict loading into a module.

- ``.safetensors`` is preferred everywhere; its header is checked in Python first
  (:func:`read_safetensors_header`: lengths, offsets, dtypes, shapes all consistent
  with the file's size), so a corrupt or hostile file is refused with one line before
  any tensor is read. ``.bin`` / ``.ckpt`` / ``.pt`` files are read with
  ``torch.load(weights_only=True)`` only, so a checkpoint can never run code on load.
- Writes are atomic (temporary file in the same folder, then ``os.replace``): an
  interrupted save never leaves a half-written checkpoint behind. The file gets the
  usual ``0o666 & ~umask`` mode, not the temporary file's 0600.
- ``load_strict`` accounts for every key and asserts every shape, refuses integer or
  bool tensors where the model has floating-point weights and NaN/inf values, naming
  what is wrong (the file and the tensor), instead of ``strict=False`` silently leaving
  random weights in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import stat
import struct
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")

StateDict = dict[str, Tensor]

# What torch.load raises for a damaged file (beyond RuntimeError/OSError/ValueError, found by
# fuzzing): the legacy and zip readers index, unpack and assert on what they read.
_CORRUPT_PICKLE = (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, IndexError, KeyError,
                   struct.error, AssertionError, TypeError, AttributeError, OverflowError)

# The safetensors library's own limit on the JSON header.
SAFETENSORS_MAX_HEADER = 100_000_000

# safetensors dtype names the torch reader understands -> bits per element.
SAFETENSORS_DTYPE_BITS: dict[str, int] = {
    name: bits
    for name, bits, torch_name in (
        ("F64", 64, "float64"), ("F32", 32, "float32"), ("F16", 16, "float16"), ("BF16", 16, "bfloat16"),
        ("I64", 64, "int64"), ("I32", 32, "int32"), ("I16", 16, "int16"), ("I8", 8, "int8"),
        ("U64", 64, "uint64"), ("U32", 32, "uint32"), ("U16", 16, "uint16"), ("U8", 8, "uint8"),
        ("BOOL", 8, "bool"), ("C64", 64, "complex64"),
        ("F8_E4M3", 8, "float8_e4m3fn"), ("F8_E5M2", 8, "float8_e5m2"),
        ("F8_E4M3FNUZ", 8, "float8_e4m3fnuz"), ("F8_E5M2FNUZ", 8, "float8_e5m2fnuz"),
        ("F8_E8M0", 8, "float8_e8m0fnu"), ("F4", 4, "float4_e2m1fn_x2"),
    )
    if hasattr(torch, torch_name)
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header; ``begin``/``end`` are offsets into the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsHeader(NamedTuple):
    """A checked safetensors header: tensors (in file order), ``__metadata__`` and the data section's size."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_size: int


def _is_count(value: Any) -> bool:
    """A non-negative JSON integer (not a bool, not a float)."""
    return type(value) is int and value >= 0


def parse_safetensors_header(blob: bytes, data_size: int) -> SafetensorsHeader:
    """Check the JSON header of a safetensors file whose data section has ``data_size`` bytes.

    Raises ValueError with a one-line reason; the checks are those of the safetensors
    library: a JSON object starting with ``{``; ``__metadata__`` maps strings to strings;
    every tensor has a known dtype, a shape of non-negative integers (whose strides fit in
    64 bits, as torch needs) and ``data_offsets`` whose length is the shape's size, and the
    tensors tile the data section exactly.
    """
    if not blob.startswith(b"{"):
        raise ValueError("the header does not start with '{'")
    try:
        header = json.loads(blob.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"the header is not UTF-8 ({err.reason} at byte {err.start})") from None
    except ValueError as err:  # JSONDecodeError, or an integer too long to convert
        raise ValueError(f"the header is not JSON ({err})") from None
    except RecursionError:
        raise ValueError("the header is JSON nested too deeply") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("__metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise ValueError(f"tensor {name!r}: entry is not a JSON object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BITS:
            raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
            raise ValueError(f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r}"[:200])
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(n) for n in offsets)):
            raise ValueError(f"tensor {name!r}: data_offsets must be two non-negative integers, got {offsets!r}"[:200])
        begin, end = offsets
        if not begin <= end <= data_size:
            raise ValueError(f"tensor {name!r}: data_offsets [{begin}, {end}] outside the {data_size}-byte data section")
        extent = 1  # product of the dimensions, zeros counted as 1: strides must fit in 64 bits
        for n in shape:
            extent *= max(n, 1)
            if extent >= 2**63:
                raise ValueError(f"tensor {name!r}: shape {tuple(shape)} is too large"[:200])
        numel = 0 if 0 in shape else extent
        bits = numel * SAFETENSORS_DTYPE_BITS[dtype]
        if bits % 8 or bits // 8 != end - begin:
            raise ValueError(
                f"tensor {name!r}: shape {tuple(shape)} of {dtype} does not fill its {end - begin} bytes"[:200]
            )
        tensors[name] = TensorInfo(dtype, tuple(shape), begin, end)
    position = 0
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin != position:
            what = "overlaps the previous tensor" if info.begin < position else "leaves a gap before it"
            raise ValueError(f"tensor {name!r}: data_offsets [{info.begin}, {info.end}] {what}")
        position = info.end
    if position != data_size:
        raise ValueError(f"the tensors cover {position} of the {data_size} data bytes")
    return SafetensorsHeader(tensors, metadata, data_size)


def read_safetensors_header(path: str | Path) -> SafetensorsHeader:
    """Read and check the header of a ``.safetensors`` file, reading no more than the header.

    Every problem (short file, header length beyond the file, bad JSON, bad dtype, shape or
    offsets, overlapping or missing data) raises CheckpointError naming the file.
    """
    path = Path(path)
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError as err:
        raise CheckpointError(f"cannot read safetensors file {path}: {err.strerror or err}") from None
    if not regular:  # a pipe or a device could block, or never end
        raise CheckpointError(f"safetensors file {path} is not a regular file")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise ValueError(f"{size} bytes is too short for a safetensors file")
            length = int.from_bytes(f.read(8), "little")
            if length > min(size - 8, SAFETENSORS_MAX_HEADER):
                limit = "the file" if length > size - 8 else f"the {SAFETENSORS_MAX_HEADER}-byte limit"
                raise ValueError(f"header length {length} exceeds {limit} ({size} bytes)")
            blob = f.read(length)
            if len(blob) != length:
                raise ValueError("the file changed while it was read")
    except OSError as err:
        raise CheckpointError(f"cannot read safetensors file {path}: {err.strerror or err}") from None
    except ValueError as err:
        raise CheckpointError(f"corrupt or truncated safetensors file {path}: {err}") from None
    try:
        return parse_safetensors_header(blob, size - 8 - length)
    except ValueError as err:
        raise CheckpointError(f"corrupt or truncated safetensors file {path}: {err}") from None


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
        read_safetensors_header(path)  # refuses a bad file before the library maps any of it
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"corrupt or truncated safetensors file {path}: {err}") from None
    if suffix in PICKLE_SUFFIXES:
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            reason = _unpickling_reason(err)
            if "global" not in reason.lower():  # not a forbidden object: damaged or not a checkpoint
                raise CheckpointError(f"corrupt or truncated checkpoint {path}: {reason}") from None
            raise CheckpointError(
                f"{path} holds objects other than tensors and was not unpickled (weights_only=True): {reason}"
            ) from None
        except _CORRUPT_PICKLE as err:
            raise CheckpointError(f"corrupt or truncated checkpoint {path}: {_first_line(err)}") from None
        if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
            data = data["state_dict"]
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{path} does not hold a state dict (found {type(data).__name__})")
        return {k: v for k, v in data.items() if isinstance(v, Tensor)}
    raise CheckpointError(
        f"unknown weight file type {path.name!r}: expected one of "
        f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}"
    )


def _unpickling_reason(err: BaseException) -> str:
    """The line of torch's (long) weights_only error that says what was refused."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "GLOBAL" in line:
            return line.split(". Please")[0].removeprefix("WeightsUnpickler error: ")
        if line.endswith("WeightsUnpickler error:") and i + 1 < len(lines):
            return lines[i + 1]
    return lines[0] if lines else type(err).__name__


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def trace_sources(state_dict: Mapping[str, Tensor], files: Mapping[str | Path, Mapping[str, Tensor]]) -> dict[str, str]:
    """Where each tensor of ``state_dict`` was read, for error messages: ``{key: "tensor 'k' of FILE"}``.

    ``files`` maps each weight file to the state dict read from it. Tensors are matched by
    identity, so keys renamed by a layout conversion (and reshaped views) are traced too.
    """
    exact: dict[int, str] = {}
    by_base: dict[int, str | None] = {}  # a view's root tensor -> its label (None: shared by several)
    for file, tensors in files.items():
        for key, tensor in tensors.items():
            label = f"tensor {key!r} of {file}"
            exact[id(tensor)] = label
            root = id(_root(tensor))
            by_base[root] = label if by_base.get(root, label) == label else None
    sources = {}
    for key, tensor in state_dict.items():
        found = exact.get(id(tensor)) or by_base.get(id(_root(tensor)))
        if found is not None:
            sources[key] = found
    return sources


def _root(tensor: Tensor) -> Tensor:
    """The tensor a view was taken from (itself if it is not a view)."""
    return tensor if tensor._base is None else tensor._base


def file_mode() -> int:
    """The mode a newly created file gets under the current umask (``0o666 & ~umask``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no way to read the umask without setting it elsewhere
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    The finished file gets ``0o666 & ~umask``, as if it had been opened for writing directly.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())  # mkstemp made it 0600
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


def _source(key: str, sources: Mapping[str, str] | None) -> str:
    """How an error names the tensor loaded into ``key``: its key in its file when known."""
    found = (sources or {}).get(key)
    if found is None:
        return f"tensor {key!r}"
    return found if f"{key!r}" in found else f"{found} (model key {key})"


def fit_problems(expected: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, Tensor],
                 source: str = "checkpoint") -> list[str]:
    """What keeps ``state_dict`` from fitting ``expected`` (key -> shape): missing keys, unexpected
    keys and shape mismatches, each named (``source`` names the file's side); empty when it fits."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [f"{k}: {source} {tuple(state_dict[k].shape)} vs model {tuple(expected[k])}"
                  for k in sorted(set(expected) & set(state_dict)) if tuple(state_dict[k].shape) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_name_some(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_name_some(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_name_some(mismatched, 5)}")
    return problems


def check_state_dict(
    module: nn.Module, state_dict: Mapping[str, Tensor], what: str, sources: Mapping[str, str] | None = None
) -> None:
    """Raise CheckpointError naming missing keys, unexpected keys, shape mismatches, and the first
    integer or bool tensor meant for a floating-point parameter or buffer.

    ``sources`` (see :func:`trace_sources`) lets the message name the file and key a tensor came from.
    """
    expected = module.state_dict()
    problems = fit_problems({k: tuple(v.shape) for k, v in expected.items()}, state_dict, "checkpoint")
    if problems:
        raise CheckpointError(f"{what} weights do not fit its config: " + "; ".join(problems))
    for key, tensor in state_dict.items():
        if expected[key].is_floating_point() and not tensor.is_floating_point():
            raise CheckpointError(
                f"{what}: {_source(key, sources)} has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                f"but {key} holds floating-point weights"
            )


def _all_finite(tensor: Tensor) -> bool:
    """No NaN or inf in a floating-point tensor (one pass)."""
    try:
        return bool(torch.isfinite(tensor).all())
    except (NotImplementedError, RuntimeError):  # float8 variants without isfinite on this device
        try:
            return bool(torch.isfinite(tensor.to(torch.float32)).all())
        except (NotImplementedError, RuntimeError):  # formats that cannot hold NaN/inf (float4)
            return True


def _nonfinite_problem(key: str, original: Tensor, converted: Tensor, sources: Mapping[str, str] | None) -> str:
    """Why a converted tensor is not finite: NaN/inf in the file, or values too large for the new dtype."""
    if not _all_finite(original):
        values = original.float()
        nan, inf = int(torch.isnan(values).sum()), int(torch.isinf(values).sum())
        found = " and ".join(f"{n} {word}" for n, word in ((nan, "NaN"), (inf, "inf")) if n)
        return f"{_source(key, sources)} contains {found} (of {original.numel()} values); weights must be finite"
    largest = float(original.float().abs().max())
    return (
        f"{_source(key, sources)} holds values up to {largest:.4g}, which overflow "
        f"{str(converted.dtype).removeprefix('torch.')}; load it in a wider dtype"
    )


def load_strict(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    what: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    sources: Mapping[str, str] | None = None,
) -> nn.Module:
    """Load every weight into ``module`` (which may live on the meta device), strictly.

    Keys, shapes and dtypes are checked first (:func:`check_state_dict`). Tensors are cast
    to ``dtype`` (floating point only) and moved to ``device`` one by one, then assigned,
    so the model is never materialised twice in memory; each floating-point tensor is
    checked for NaN/inf on the way (one pass). ``sources`` names the file and key each
    tensor came from in the errors.
    """
    check_state_dict(module, state_dict, what, sources)
    converted = {}
    for key, tensor in state_dict.items():
        moved = tensor
        if dtype is not None and moved.is_floating_point():
            moved = moved.to(dtype)
        moved = moved.to(device)
        if moved.is_floating_point() and not _all_finite(moved):
            raise CheckpointError(f"{what}: {_nonfinite_problem(key, tensor, moved, sources)}")
        converted[key] = moved
    module.load_state_dict(converted, strict=True, assign=True)
    leftovers = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if leftovers:
        raise CheckpointError(f"{what}: tensors not set by the checkpoint: {_name_some(leftovers)}")
    return module.eval()


def sha256_file(path: str | Path, start: int = 0) -> str:
    """Hex sha256 of a file's bytes from offset ``start`` on, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
