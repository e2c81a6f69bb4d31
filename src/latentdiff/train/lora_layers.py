"""Trainable LoRA adapters on a frozen network, attached by forward hooks (module names stay put).

    lora = LoRANetwork(unet, rank=8, alpha=8, targets=DEFAULT_TARGETS, seed=0)
    lora.attach(unet)                      # unet(x) now adds  scale * up(down(x))  at every target
    with lora.disabled(): teacher = unet(x, t, c)
    sd = lora.kohya_state_dict()           # lora_unet_<name>.lora_down.weight / .lora_up.weight / .alpha

Each target layer (an ``nn.Linear`` or ``nn.Conv2d``) with weight W gets a ``down`` of rank r
(a Linear ``in -> r``, or a Conv2d with W's kernel, stride and padding) and an ``up``
(``r -> out``, a 1x1 Conv2d for convolutions); its output becomes
``base(x) + (alpha / r) * up(down(x))``, i.e. the weight ``W + (alpha / r) up @ down``, which is
what a kohya / PEFT LoRA file merges.  ``down`` is initialised kaiming-uniform (a = sqrt(5)), as
kohya and PEFT do, and ``up`` to zero, so a fresh adapter leaves the network's outputs
unchanged bit for bit.  Several networks may be attached to one model; each adds its term only
while ``enabled``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from .build import seeded

#: Module-name suffixes a LoRA-LCM adapts by default: attention projections, feed-forward
#: linears and the transformers' proj_in / proj_out (1x1 convolutions or linears).
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")


def kohya_name(module: str, prefix: str = "lora_unet_") -> str:
    """``down_blocks.0.attentions.0.proj_in`` -> ``lora_unet_down_blocks_0_attentions_0_proj_in``."""
    return prefix + module.replace(".", "_")


def target_modules(network: nn.Module, targets: Sequence[str]) -> list[str]:
    """Names of the Linear / Conv2d modules of ``network`` whose name ends with one of ``targets``."""
    out = []
    for name, module in network.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if any(name == t or name.endswith("." + t) for t in targets):
            out.append(name)
    return out


class LoRAAdapter(nn.Module):
    """``scale * up(down(x))`` for one Linear or Conv2d ``base`` (not stored here)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float) -> None:
        super().__init__()
        if isinstance(base, nn.Linear):
            self.down: nn.Module = nn.Linear(base.in_features, rank, bias=False)
            self.up: nn.Module = nn.Linear(rank, base.out_features, bias=False)
        elif isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise ValueError("LoRA on grouped convolutions is not supported")
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,  # type: ignore[arg-type]
                                  base.dilation, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            raise TypeError(f"LoRA adapts nn.Linear and nn.Conv2d, not {type(base).__name__}")
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        # drawn on the CPU in float32 (the CPU generator decides, whatever the device), then moved
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))  # kohya / PEFT
        nn.init.zeros_(self.up.weight)
        self.to(device=base.weight.device, dtype=base.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x)) * self.scale


class LoRANetwork(nn.Module):
    """The adapters of one network, keyed by their kohya layer name (without the prefix).

    Its ``state_dict`` holds only the adapters' weights (``adapters.<key>.down.weight`` ...).
    """

    def __init__(self, network: nn.Module, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_TARGETS,
                 seed: int = 0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        names = target_modules(network, targets)
        if not names:
            raise ValueError(f"no layer of the network matches the LoRA targets {list(targets)}")
        modules = dict(network.named_modules())
        self.module_names: dict[str, str] = {}  # key -> dotted module name
        adapters = {}
        with seeded(seed):  # a reproducible draw that leaves the global RNG as it was
            for name in names:
                key = kohya_name(name, "")
                adapters[key] = LoRAAdapter(modules[name], rank, alpha)
                self.module_names[key] = name
        self.adapters = nn.ModuleDict(adapters)
        self.rank, self.alpha = rank, float(alpha)
        self.enabled = True
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    # ------------------------------------------------------------------ hooks
    def attach(self, network: nn.Module) -> None:
        """Add each adapter's output to its layer's output in ``network`` (forward hooks)."""
        modules = dict(network.named_modules())
        for key, name in self.module_names.items():
            adapter = self.adapters[key]

            def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor, adapter: nn.Module = adapter) -> Tensor:
                if not self.enabled:
                    return output
                return output + adapter(inputs[0]).to(output.dtype)

            self._hooks.append(modules[name].register_forward_hook(hook))

    def detach_from(self, network: nn.Module) -> None:
        """Remove this network's hooks from ``network`` (the model attached to, or a deep copy of it)."""
        ids = {h.id for h in self._hooks}
        for module in network.modules():
            for i in ids & set(module._forward_hooks):
                del module._forward_hooks[i]

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        before = self.enabled
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = before

    # ------------------------------------------------------------------ export
    @torch.no_grad()
    def kohya_state_dict(self, prefix: str = "lora_unet_") -> dict[str, Tensor]:
        """kohya-format tensors (float32, CPU): ``<prefix><layer>.lora_down.weight`` (r, in[, k, k]),
        ``.lora_up.weight`` (out, r[, 1, 1]) and ``.alpha`` (a 0-d tensor)."""
        out: dict[str, Tensor] = {}
        for key, adapter in self.adapters.items():
            layer = prefix + key
            out[layer + ".lora_down.weight"] = adapter.down.weight.detach().float().cpu().contiguous()
            out[layer + ".lora_up.weight"] = adapter.up.weight.detach().float().cpu().contiguous()
            out[layer + ".alpha"] = torch.tensor(self.alpha, dtype=torch.float32)
        return out


@torch.no_grad()
def merge_into(network: nn.Module, lora: LoRANetwork) -> None:
    """Add ``lora``'s update to the weights of ``network`` (a hook-free copy of the model it adapts):
    ``W += (alpha / r) up @ down``, computed in float32."""
    modules = dict(network.named_modules())
    for key, name in lora.module_names.items():
        adapter = lora.adapters[key]
        weight = modules[name].weight
        up = adapter.up.weight.float().reshape(adapter.up.weight.shape[0], -1)
        down = adapter.down.weight.float().reshape(adapter.rank, -1)
        weight.copy_((weight.float() + ((up @ down) * adapter.scale).reshape(weight.shape)).to(weight.dtype))


def merged_copy(network: nn.Module, lora: LoRANetwork, *others: LoRANetwork) -> nn.Module:
    """A deep copy of ``network`` without the hooks of ``lora`` and ``others``, ``lora`` merged in."""
    out = copy.deepcopy(network)
    for net in (lora, *others):
        net.detach_from(out)
    merge_into(out, lora)
    return out.requires_grad_(False)
