"""Training checkpoints: everything needed to continue a run bit for bit, written atomically.

A checkpoint (``checkpoint.pt``, ``torch.save`` format, read back with
``weights_only=True`` so it can never run code) holds:

    format, kind, step, seconds, config
    modules     {name: state_dict}            trained networks (+ discriminator)
    optimizers  {name: optimizer.state_dict()}
    emas        {name: EMA.state_dict()}
    data        EpochOrder.state_dict()       epoch and position in it
    rng         every torch.Generator the trainer draws from, plus torch's global CPU
                generator, Python's ``random`` and NumPy's global state
    lr_step     the step the learning-rate schedule is at (= step: the schedule is a
                pure function of it, see :func:`latentdiff.train.optim.warmup_lr`)

It is written to a temporary file beside the target and renamed over it only
once complete (:func:`latentdiff.checkpoints.io.atomic_path`), so a crash while
saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoints.io import atomic_path

FORMAT = "latentdiff-train-1"


class TrainCheckpointError(RuntimeError):
    """A training checkpoint that cannot be read or does not fit the run."""


def capture_rng(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """States of the named generators and of the global RNGs (torch CPU, Python, NumPy)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "generators": {name: g.get_state() for name, g in generators.items()},
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached),
        },
    }


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    """Put every generator and the global RNGs back to ``capture_rng``'s state."""
    missing = sorted(set(generators) - set(state["generators"]))
    if missing:
        raise TrainCheckpointError(f"checkpoint lacks the state of generator(s) {', '.join(missing)}")
    for name, g in generators.items():
        g.set_state(state["generators"][name])
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))


class _CheckedFile:
    """A file for ``torch.save`` that writes every byte or remembers the OSError that stopped it.

    torch's zip writer reports a failed write (disk full, quota, file-size limit) only as a
    RuntimeError about a file position; this keeps the operating system's reason.
    """

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        try:
            while view:
                view = view[self.raw.write(view):]
        except OSError as err:
            self.error = self.error or err
            raise
        return len(data)

    def flush(self) -> None:
        self.raw.flush()


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename).

    A write the system refuses raises that OSError (e.g. ``ENOSPC``); the previous file at
    ``path`` is untouched and the temporary file removed.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb", buffering=0) as raw:
            sink = _CheckedFile(raw)
            try:
                torch.save(state, sink)  # type: ignore[arg-type]
            except RuntimeError:
                if sink.error is not None:
                    raise sink.error from None
                raise
            os.fsync(raw.fileno())  # on disk before the rename makes it the checkpoint
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain values only)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainCheckpointError(f"no checkpoint at {path}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise TrainCheckpointError(f"cannot read checkpoint {path}: {err}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrainCheckpointError(f"{path} is not a latentdiff training checkpoint ({FORMAT})")
    return state
