"""Optimizer, learning-rate schedule, clipped optimizer step and bf16 autocast shared by the trainers.

The learning rate is a pure function of the number of optimizer steps already taken
(``warmup_lr``), set on the optimizer before each step. Resuming therefore needs
only the step counter, and no scheduler object can drift out of sync with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import Tensor, nn


def warmup_lr(step: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warm-up then constant: ``base_lr * min(1, (step + 1) / warmup_steps)``.

    ``step`` counts optimizer steps already taken, so the first step uses
    ``base_lr / warmup_steps`` (never 0) and step ``warmup_steps - 1`` reaches ``base_lr``
    (SD: 10,000 warm-up steps to 1e-4).
    """
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, (step + 1) / warmup_steps)


def make_adamw(
    params: Iterable[nn.Parameter], lr: float, betas: tuple[float, float], weight_decay: float
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (single-tensor implementation, so CPU runs are bitwise reproducible)."""
    trainable = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=lr, betas=betas, weight_decay=weight_decay, foreach=False)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clipped_step(optimizer: torch.optim.Optimizer, max_norm: float) -> Tensor:
    """Clip the global grad norm to ``max_norm`` (0: no clipping), step, zero the grads.

    Returns the grad norm before clipping (for the log).
    """
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm() for p in params])) if params else torch.zeros(())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.detach()


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when enabled, else a no-op."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
