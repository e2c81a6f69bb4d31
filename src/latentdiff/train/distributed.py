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

What depends on the whole batch is computed over the global batch: the CLIP trainer's
contrastive loss gathers every rank's embeddings (:func:`gather_with_grad`), the VAE
discriminator's BatchNorm takes global statistics (:class:`GlobalBatchNorm2d`), and the VAE's
adaptive GAN weight uses the all-reduced gradients (:func:`all_reduce_mean_tensor`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..eval.distributed import DistInfo, device_for_rank, dist_info

__all__ = [
    "DistInfo", "GlobalBatchNorm2d", "all_reduce_mean", "all_reduce_mean_tensor", "average_gradients", "barrier",
    "broadcast_parameters", "gather_with_grad", "globalise_batch_norms", "join_world", "leave_world", "rank_slice",
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
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(info.local_rank)  # NCCL's collectives run on this rank's GPU
        dist.init_process_group("nccl" if cuda else "gloo", rank=info.rank, world_size=info.world_size)
    return info


def leave_world() -> None:
    """Destroy the process group :func:`join_world` joined, if any: a process that exits with gloo's
    threads still running can abort ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears down while another's last collective is in flight
        dist.destroy_process_group()


def training_device(device: str, info: DistInfo) -> str:
    """A config's device on this rank: plain ``cuda`` means ``cuda:LOCAL_RANK`` under torchrun."""
    return device_for_rank(device, info)


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


class _GatherWithGrad(torch.autograd.Function):
    """All-gather forward; backward: the sum over ranks of the gradient of this rank's slice.

    (``torch.distributed.nn.functional.all_gather`` gets this wrong over gloo when the incoming
    gradients are not contiguous: its all-to-all fills ``empty_like`` buffers of their strides.)
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:  # type: ignore[override]
        import torch.distributed as dist

        ctx.rank, ctx.world = dist.get_rank(), dist.get_world_size()
        parts = [torch.empty_like(tensor) for _ in range(ctx.world)]
        dist.all_gather(parts, tensor)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        import torch.distributed as dist

        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.chunk(ctx.world)[ctx.rank]


def gather_with_grad(tensor: Tensor, info: DistInfo) -> Tensor:
    """Every rank's ``tensor`` (B, ...) concatenated in rank order (R * B, ...), differentiable.

    Each rank then computes the same global loss; the backward sums every rank's gradient of
    this rank's slice, so :func:`average_gradients` afterwards gives exactly one process's gradient.
    """
    if not info.distributed:
        return tensor
    return _GatherWithGrad.apply(tensor.contiguous())


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


def all_reduce_mean_tensor(tensor: Tensor, info: DistInfo) -> Tensor:
    """The mean over the ranks of ``tensor`` (a new tensor; ``tensor`` itself in a single process)."""
    if not info.distributed:
        return tensor
    import torch.distributed as dist

    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / info.world_size


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch (all ranks' inputs),
    differentiable through the all-reduce: what one process with the whole batch computes.

    ``torch.nn.SyncBatchNorm`` needs a GPU; this works over gloo on the CPU too.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and torch.distributed.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xf = x.float()
        local = torch.cat([xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3)),
                           xf.new_tensor([x.numel() / c])])  # (2c + 1,): sums, sums of squares, count
        total = all_reduce(local)
        count = total[-1]
        mean = total[:c] / count  # (c,)
        var = (total[c : 2 * c] / count - mean * mean).clamp(min=0)  # biased, as BatchNorm normalises
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * count / (count - 1).clamp(min=1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def globalise_batch_norms(module: nn.Module, info: DistInfo) -> nn.Module:
    """Swap every BatchNorm2d of ``module`` for a :class:`GlobalBatchNorm2d` (same state) under torchrun."""
    if not info.distributed:
        return module
    for name, child in list(module.named_children()):
        if type(child) is nn.BatchNorm2d:
            replacement = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                            child.track_running_stats).to(next(child.buffers()).device)
            replacement.load_state_dict(child.state_dict())
            setattr(module, name, replacement)
        else:
            globalise_batch_norms(child, info)
    return module
