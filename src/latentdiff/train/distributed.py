"""Data-parallel training under ``torchrun``: the process group, gradient averaging, rank-0 writes.

    torchrun --standalone --nproc_per_node 2 -m latentdiff.cli train unet --config unet.toml

Every rank runs the same command on its own copy of the networks. Each optimizer step draws
one *global* batch of ``batch_size x ranks`` items from the shared data order; rank ``r``
takes the ``r``-th slice of ``batch_size`` (:func:`rank_slice`), and every random draw of a
sample (noise, timestep, caption dropout) comes from the sample's global index
(:mod:`latentdiff.train.draws`), not from the rank. After the ``grad_accum`` micro-batches,
the gradients are averaged over the ranks with one all-reduce per step
(:func:`average_gradients`: the arithmetic of ``DistributedDataParallel`` under ``no_sync``
for the accumulation steps), so every rank takes the same optimizer step and the run learns
what one process with a batch of ``batch_size x ranks`` learns, up to float rounding.

Backends: ``gloo`` when the networks run on the CPU, ``nccl`` on CUDA (one GPU per rank,
``cuda:LOCAL_RANK``). Only rank 0 writes logs, sample grids, checkpoints and exports; a
single-process run never touches :mod:`torch.distributed`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..eval.distributed import DistInfo, device_for_rank, dist_info

__all__ = [
    "DistInfo", "all_reduce_mean", "average_gradients", "barrier", "broadcast_parameters", "join_world",
    "rank_slice", "refuse_distributed",
]


def join_world(device: torch.device | str) -> DistInfo:
    """This process's place in the job; joins torchrun's process group the first time (``WORLD_SIZE`` > 1).

    ``device`` picks the backend (``nccl`` for CUDA, else ``gloo``). Returns ``DistInfo()`` (rank 0 of 1)
    outside torchrun.
    """
    info = dist_info()
    if not info.distributed:
        return info
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=info.rank, world_size=info.world_size)
    return info


def training_device(device: str, info: DistInfo) -> str:
    """A config's device on this rank: plain ``cuda`` means ``cuda:LOCAL_RANK`` under torchrun."""
    return device_for_rank(device, info)


def refuse_distributed(kind: str) -> None:
    """Raise for a trainer that has no data-parallel mode, instead of running independent copies."""
    info = dist_info()
    if info.distributed:
        from .config import TrainConfigError

        raise TrainConfigError(
            f"train {kind} runs in one process only (WORLD_SIZE={info.world_size}); data-parallel training "
            "covers unet, lora, embedding and lcm"
        )


def rank_slice(items: list[int], info: DistInfo) -> tuple[list[int], int]:
    """This rank's share of a global batch ``items`` (equal parts) and the position it starts at."""
    if len(items) % info.world_size:
        raise ValueError(f"a global batch of {len(items)} does not split over {info.world_size} ranks")
    size = len(items) // info.world_size
    start = info.rank * size
    return items[start : start + size], start


def average_gradients(parameters: Iterable[nn.Parameter], info: DistInfo) -> None:
    """Replace every gradient by its mean over the ranks (one all-reduce of all of them, flattened).

    A parameter without a gradient on this rank takes part as zeros, so the ranks always agree
    on the buffer's layout.
    """
    if not info.distributed:
        return
    import torch.distributed as dist

    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])  # (sum of numels,)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n


def broadcast_parameters(modules: Mapping[str, nn.Module], info: DistInfo) -> None:
    """Rank 0's parameters and buffers on every rank (they start equal anyway; this makes sure)."""
    if not info.distributed:
        return
    import torch.distributed as dist

    for name in sorted(modules):
        for tensor in modules[name].state_dict().values():
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                dist.broadcast(tensor, src=0)


def all_reduce_mean(values: Mapping[str, float], info: DistInfo) -> dict[str, float]:
    """The mean over the ranks of each logged value (keys in the same order on every rank)."""
    if not info.distributed or not values:
        return dict(values)
    import torch.distributed as dist

    keys = list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flat = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return {k: float(v) / info.world_size for k, v in zip(keys, flat.tolist())}


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op in a single process)."""
    if info.distributed:
        import torch.distributed as dist

        dist.barrier()
