"""Exponential moving average of a model's weights.

    ema = EMA(model, decay=0.9999, warmup=True)
    ...optimizer.step(); ema.update(model)
    ema.copy_to(other_model)          # e.g. for sampling or export

Update per optimizer step t (counted from 0)::

    decay_t = min(decay, 1 - (1 + t) ** -power)   if warmup   (diffusers' use_ema_warmup, inv_gamma = 1)
    decay_t = decay                                otherwise
    shadow  = decay_t * shadow + (1 - decay_t) * param

so early steps follow the model closely and the average settles later. Buffers
(non-learned tensors) are copied, not averaged. The shadow weights are float32
whatever the model's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def ema_decay_at(step: int, decay: float, warmup: bool = True, power: float = 2 / 3) -> float:
    """The decay used for update number ``step`` (0-based)."""
    if not warmup:
        return decay
    return min(decay, 1.0 - (1.0 + step) ** -power)


class EMA:
    """Float32 shadow copies of a model's parameters (by name), and the update counter."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True, power: float = 2 / 3) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup, self.power = decay, warmup, power
        self.step = 0
        self.shadow: dict[str, Tensor] = {
            name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad
        }
        self.buffers: dict[str, Tensor] = {name: b.detach().clone() for name, b in model.named_buffers()}

    def current_decay(self) -> float:
        return ema_decay_at(self.step, self.decay, self.warmup, self.power)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- d * shadow + (1 - d) * param, for the current decay d; then count the step."""
        d = self.current_decay()
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1.0 - d)
        for name, b in model.named_buffers():
            self.buffers[name].copy_(b.detach())
        self.step += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model`` (same architecture), cast to its dtype."""
        params = dict(model.named_parameters())
        for name, value in self.shadow.items():
            params[name].copy_(value.to(params[name].dtype))
        buffers = dict(model.named_buffers())
        for name, value in self.buffers.items():
            buffers[name].copy_(value)

    def state_dict(self) -> dict:
        return {
            "decay": self.decay, "warmup": self.warmup, "power": self.power, "step": self.step,
            "shadow": self.shadow, "buffers": self.buffers,
        }

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(set(self.shadow) ^ set(state["shadow"]))
        if missing:
            raise ValueError(f"EMA state does not match the model: {', '.join(missing[:5])}")
        self.decay, self.warmup, self.power, self.step = state["decay"], state["warmup"], state["power"], state["step"]
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
        for name, value in state["buffers"].items():
            self.buffers[name].copy_(value)
