"""The training loop every trainer shares: steps, progress bar, CSV log, samples, checkpoints, export.

A trainer (:mod:`latentdiff.train.vae`, :mod:`latentdiff.train.unet`) is a
:class:`TrainTask`: it owns its networks, optimizers, EMAs, random generators
and data order, and knows how to take one optimizer step, draw a sample grid
and export its model. :func:`run_training` does the rest, identically for all:

    out_dir/
      config.json       the run's config
      log.csv           step, <loss terms>, lr, seconds (cumulative training time)
      samples/          step_000250.png ... (every ``sample_every`` steps and at the end)
      checkpoint.pt     every ``checkpoint_every`` steps and at the end (see checkpoint.py)
      <export>/         the finished model in the diffusers layout

``resume=True`` loads ``checkpoint.pt`` (weights, optimizers, EMAs, data position,
every RNG state, step counter), drops log rows written after it, and continues:
N steps in one run and N/2 + resume + N/2 give bitwise-identical weights on a CPU.
A checkpoint write the system refuses (a full disk) stops the run with a
:class:`~latentdiff.train.checkpoint.TrainCheckpointError` naming the reason and the
step still on disk. Under torchrun every rank steps and only rank 0 writes
(:mod:`latentdiff.train.distributed`); the logged values are the ranks' means.
"""

from __future__ import annotations

import copy
import csv
from collections import defaultdict
from collections.abc import Callable
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..checkpoints.io import atomic_path
from .checkpoint import FORMAT, TrainCheckpointError, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from .config import TrainConfig
from .data import EpochOrder, load_batch
from .distributed import DistInfo, all_reduce_mean, barrier, rank_slice
from .draws import sample_ids
from .ema import EMA

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.csv"
# Config fields a resumed run may change without breaking exact continuation.
_RESUMABLE_CHANGES = {
    "max_steps", "out_dir", "log_every", "sample_every", "checkpoint_every", "export",
    "sample_prompts", "num_sample_images", "sample_steps", "guidance_scale", "sample_seed",
}


def average_over_image_batches(task: "TrainTask", step: int,
                               micro_step: Callable[[Tensor, list[int]], dict[str, float]]) -> dict[str, float]:
    """Run ``micro_step(images, sample_ids)`` on this rank's part of each micro-batch of ``step``
    (images of ``task.source`` on ``task.device``); the terms averaged over the micro-batches."""
    accum = task.config.grad_accum
    totals: dict[str, float] = defaultdict(float)
    for batch in task.micro_batches(step):
        images, _ = load_batch(task.source, batch.mine)  # type: ignore[attr-defined]
        for key, value in micro_step(images.to(task.device), batch.ids).items():  # type: ignore[attr-defined]
            totals[key] += value / accum
    return totals


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of a step (see :meth:`TrainTask.micro_batches`)."""

    items: list[int]  # the whole global batch (data indices), the same on every rank
    mine: list[int]  # this rank's slice of it
    ids: list[int]  # the slice's global sample indices (the key of every per-sample draw)


class TrainTask:
    """What a trainer hands to :func:`run_training` (subclasses fill every attribute)."""

    kind: str = ""
    config: TrainConfig
    loss_names: tuple[str, ...] = ()  # the keys train_step returns, besides "lr"
    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    emas: dict[str, EMA]
    generators: dict[str, torch.Generator]
    order: EpochOrder
    ranks: DistInfo = DistInfo()  # this process's rank under torchrun (rank 0 of 1 otherwise)

    def train_step(self, step: int) -> dict[str, float]:
        """Take optimizer step number ``step`` (0-based); return loss terms and "lr"."""
        raise NotImplementedError

    def micro_batches(self, step: int) -> list[MicroBatch]:
        """The ``grad_accum`` micro-batches of ``step``: each a global batch of ``batch_size x ranks``
        items from ``order``, this rank's slice of it, and the slice's global sample indices."""
        cfg = self.config
        global_batch = cfg.batch_size * self.ranks.world_size
        out = []
        for micro in range(cfg.grad_accum):
            items = self.order.next(global_batch)
            mine, start = rank_slice(items, self.ranks)
            out.append(MicroBatch(items, mine, sample_ids(step, micro, cfg.grad_accum, global_batch, start, len(mine))))
        return out

    def write_samples(self, step: int, path: Path) -> None:
        """Write a preview grid PNG to ``path``; must not touch training state or generators."""
        raise NotImplementedError

    def export(self, folder: Path) -> Path:
        """Write the finished model (EMA weights when there are) in the diffusers layout."""
        raise NotImplementedError

    @property
    def export_name(self) -> str:
        return "model"

    def inference_model(self, name: str) -> nn.Module:
        """Module ``name`` with its EMA weights (a separate copy) when it has an EMA, else itself."""
        ema = self.emas.get(name)
        if ema is None:
            return self.modules[name]
        copies = self.__dict__.setdefault("_ema_copies", {})
        if name not in copies:
            copies[name] = copy.deepcopy(self.modules[name]).requires_grad_(False)
        ema.copy_to(copies[name])
        return copies[name]


@dataclass
class TrainResult:
    """Where a finished run left things."""

    step: int
    out_dir: Path
    checkpoint: Path
    log: Path
    samples: list[Path] = field(default_factory=list)
    exported: Path | None = None
    last: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------- state
def task_state(task: TrainTask, step: int, seconds: float) -> dict[str, Any]:
    """Everything :func:`restore_task` needs, as plain values and tensors."""
    return {
        "format": FORMAT,
        "kind": task.kind,
        "step": step,
        "lr_step": step,
        "seconds": seconds,
        "config": task.config.to_dict(),
        "modules": {name: m.state_dict() for name, m in task.modules.items()},
        "optimizers": {name: o.state_dict() for name, o in task.optimizers.items()},
        "emas": {name: e.state_dict() for name, e in task.emas.items()},
        "data": task.order.state_dict(),
        "rng": capture_rng(task.generators),
    }


def restore_task(task: TrainTask, state: dict[str, Any]) -> tuple[int, float]:
    """Load a checkpoint into ``task``; returns (step, seconds)."""
    if state["kind"] != task.kind:
        raise TrainCheckpointError(f"the checkpoint is from a {state['kind']!r} run, not {task.kind!r}")
    changed = sorted(
        k for k, v in state["config"].items()
        if k not in _RESUMABLE_CHANGES and task.config.to_dict().get(k, v) != v
    )
    if changed:
        warnings.warn(
            f"resuming with changed setting(s) {', '.join(changed)}: the run will not match an uninterrupted one",
            stacklevel=3,
        )
    for name, module in task.modules.items():
        module.load_state_dict(state["modules"][name], strict=True)
    for name, opt in task.optimizers.items():
        opt.load_state_dict(state["optimizers"][name])
    for name, ema in task.emas.items():
        ema.load_state_dict(state["emas"][name])
    task.order.load_state_dict(state["data"])
    restore_rng(state["rng"], task.generators)
    return int(state["step"]), float(state["seconds"])


# ---------------------------------------------------------------------------- log
class CSVLog:
    """``log.csv`` with a fixed header; on resume, rows after the checkpoint's step are dropped."""

    def __init__(self, path: Path, columns: list[str], resume_step: int | None) -> None:
        self.path, self.columns = path, columns
        rows: list[dict[str, str]] = []
        if resume_step is not None and path.is_file():
            with path.open(newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with atomic_path(path) as tmp:
            with tmp.open("w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
            )


# ---------------------------------------------------------------------------- loop
def run_training(task: TrainTask, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train ``task`` until ``config.max_steps`` optimizer steps, writing logs, samples and checkpoints.

    Without ``resume``, an ``out_dir`` that already holds a checkpoint is refused (nothing
    is overwritten by accident); with it and no checkpoint yet, the run starts from step 0.
    """
    cfg = task.config
    main = task.ranks.is_main  # only rank 0 writes; every rank steps
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT_NAME
    step, seconds = 0, 0.0
    if resume and ckpt_path.is_file():
        step, seconds = restore_task(task, load_checkpoint(ckpt_path))
    elif resume:
        if main:
            warnings.warn(f"resume: no checkpoint in {out}, starting from step 0", stacklevel=2)
    elif ckpt_path.is_file():
        raise FileExistsError(f"{out} already holds a training checkpoint: pass resume=True (--resume) or another out_dir")
    barrier(task.ranks)  # every rank has looked for the checkpoint before rank 0 may write one
    log: CSVLog | None = None
    if main:
        cfg.save(out / "config.json")
        log = CSVLog(out / LOG_NAME, ["step", *task.loss_names, "lr", "seconds"], step if resume else None)
    result = TrainResult(step=step, out_dir=out, checkpoint=ckpt_path, log=out / LOG_NAME)
    samples = out / "samples"
    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"train {task.kind}", disable=not (progress and main),
               dynamic_ncols=True)
    started = time.perf_counter() - seconds
    last_saved = step if resume and ckpt_path.is_file() else -1
    try:
        while step < cfg.max_steps:
            values = all_reduce_mean(task.train_step(step), task.ranks)
            step += 1
            seconds = time.perf_counter() - started
            result.last = values
            bar.update(1)
            bar.set_postfix({k: f"{values[k]:.4g}" for k in task.loss_names[:3]}, refresh=False)
            if not main:
                continue
            if log is not None and (step % cfg.log_every == 0 or step == cfg.max_steps):
                log.write({"step": step, **values, "seconds": seconds})
            if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.max_steps:
                result.samples.append(_sample(task, step, samples))
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                _save(task, step, seconds, ckpt_path, last_saved)
                last_saved = step
    finally:
        bar.close()
    if main:
        if last_saved != step:
            _save(task, step, seconds, ckpt_path, last_saved)
        result.samples.append(_sample(task, step, samples))
        if cfg.export:
            result.exported = task.export(out / task.export_name)
    barrier(task.ranks)  # the others wait for rank 0's files
    result.step = step
    return result


def _save(task: TrainTask, step: int, seconds: float, path: Path, previous: int) -> None:
    """Write the checkpoint of ``step``; a failed write (disk full, quota, file size limit) stops the
    run with a TrainCheckpointError that says why and which checkpoint is still there."""
    try:
        save_checkpoint(task_state(task, step, seconds), path)
    except OSError as err:
        reason = err.strerror or str(err)
        kept = (f"the checkpoint of step {previous} in {path} is kept: free space and continue with --resume"
                if previous >= 0 else "no earlier checkpoint exists")
        raise TrainCheckpointError(f"stopped at step {step}: writing its checkpoint failed ({reason}); {kept}") from err


def _sample(task: TrainTask, step: int, folder: Path) -> Path:
    path = folder / f"step_{step:06d}.png"
    task.write_samples(step, path)
    return path
