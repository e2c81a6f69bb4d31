"""Sharing an evaluation across processes launched by ``torchrun``.

    torchrun --standalone --nproc_per_node 4 -m latentdiff.cli eval --prompts builtin ... --out DIR

Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank runs the same command: rank ``r`` of
``W`` generates the images whose global index ``g`` has ``g % W == r`` (:func:`shard`:
strided, so each rank gets a similar mix of prompts), computes their per-image metric
inputs (features, CLIP similarities, judgements), and sends them to rank 0
(:func:`gather_to_main`), which puts them back in index order (:func:`merge_shards`),
computes the metrics and writes every output. Image ``g`` is seeded with ``seed + g``
whatever rank makes it, so the images are those of a single-process run (up to
floating-point differences from different batch compositions).

The process group uses the ``gloo`` backend: only Python objects are exchanged (on the
CPU), so it works the same whether the networks run on CPU or GPU. Single-process runs
never touch :mod:`torch.distributed`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (from torchrun's environment variables)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def dist_info() -> DistInfo:
    """``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` as torchrun sets them (0, 1, 0 when absent)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return DistInfo(rank, world, _env_int("LOCAL_RANK", rank))


def shard(n: int, rank: int, world_size: int) -> list[int]:
    """The global indices ``0..n-1`` that ``rank`` handles: ``rank, rank + W, rank + 2W, ...``.

    Over all ranks the shards partition ``range(n)``; their sizes differ by at most one.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    return list(range(rank, n, world_size))


def merge_shards(parts: Iterable[Iterable[tuple[int, T]]], n: int) -> list[T]:
    """``(index, item)`` pairs from every rank -> the items in index order; every index 0..n-1 exactly once."""
    items: dict[int, T] = {}
    for part in parts:
        for index, item in part:
            if index in items:
                raise ValueError(f"index {index} came from two ranks")
            items[index] = item
    missing = sorted(set(range(n)) - set(items))
    if missing or len(items) != n:
        raise ValueError(f"{len(missing)} of {n} results missing (e.g. index {missing[:3]})")
    return [items[i] for i in range(n)]


class ProcessGroup:
    """Context manager: joins torchrun's process group (gloo) when ``WORLD_SIZE`` > 1, leaves it on exit.

    An already initialised default group is used as it is (and left alone on exit).
    """

    def __init__(self, info: DistInfo | None = None) -> None:
        self.info = info or dist_info()
        self._owns = False

    def __enter__(self) -> ProcessGroup:
        if self.info.distributed:
            import torch.distributed as dist

            if not dist.is_available():
                raise RuntimeError("torch.distributed is not available in this PyTorch build")
            if not dist.is_initialized():
                dist.init_process_group("gloo", rank=self.info.rank, world_size=self.info.world_size)
                self._owns = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._owns:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owns = False

    def gather_to_main(self, obj: T) -> list[T] | None:
        """Every rank's ``obj`` on rank 0 (in rank order), None elsewhere; ``[obj]`` without a group."""
        return gather_to_main(obj, self.info)

    def broadcast_from_main(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        return broadcast_from_main(obj, self.info)


def gather_to_main(obj: T, info: DistInfo) -> list[T] | None:
    """Every rank's ``obj`` on rank 0 (in rank order), None on the others; ``[obj]`` in a single process."""
    if not info.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: T, info: DistInfo) -> T:
    """Rank 0's ``obj`` on every rank (``obj`` itself in a single process)."""
    if not info.distributed:
        return obj
    import torch.distributed as dist

    box: list[Any] = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def device_for_rank(device: str, info: DistInfo) -> str:
    """``cuda`` without an index means ``cuda:LOCAL_RANK`` under torchrun (one GPU per process)."""
    if info.distributed and device == "cuda":
        return f"cuda:{info.local_rank}"
    return device


def batches(items: Sequence[T], size: int) -> list[list[T]]:
    """Consecutive chunks of at most ``size`` items (a rank's generation batches)."""
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    return [list(items[i: i + size]) for i in range(0, len(items), size)]
