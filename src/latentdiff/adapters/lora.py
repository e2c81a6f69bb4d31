"""The LoRA core: low-rank updates merged into the weights, with an exact undo.

A LoRA file holds, for some linear or conv layers of the UNet and the text encoder, a
pair ``down`` (rank r x in [x k x k]) and ``up`` (out x r [x 1 x 1]) and optionally an
``alpha``.  Applying it at weight ``w`` adds ``w * alpha / r * up @ down`` (reshaped to a
conv kernel for convolutions) to the layer's weight.  The format families that name the
layers are read by :mod:`.kohya` and :mod:`.peft`; this module merges and unmerges.

Undo is exact: before a parameter is first touched a copy of its original tensor is
kept (on the CPU), and unloading copies it back, never subtracts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoints.errors import CheckpointError

#: the two networks a LoRA can patch
TARGETS = ("unet", "text_encoder")

# LyCORIS and other adapter kinds, recognised by a key's last components, refused by name.
_UNSUPPORTED = (
    (("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"), "LyCORIS LoHa (hada_*)"),
    (("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2"), "LyCORIS LoKr (lokr_*)"),
    (("lora_mid",), "LyCORIS LoCon with a CP-decomposed middle (lora_mid)"),
    (("dora_scale", "lora_magnitude_vector"), "DoRA (dora_scale)"),
    (("oft_blocks", "oft_diag", "oft_R"), "OFT / BOFT"),
    (("diff", "diff_b"), "LyCORIS full weight difference (diff)"),
    (("w_norm", "b_norm"), "LyCORIS norm-layer adapter (w_norm / b_norm)"),
    (("on_input",), "(IA)^3"),
)


def unsupported_kind(key: str) -> str | None:
    """The adapter kind a key belongs to when latentdiff cannot apply it, else None."""
    parts = key.split(".")
    names = {parts[-1], parts[-2] if len(parts) > 1 else ""}
    for leaves, kind in _UNSUPPORTED:
        if names & set(leaves):
            return kind
    return None


def refuse_unsupported(keys: Iterable[str], source: str) -> None:
    """Raise CheckpointError naming the kind and a key, for the first unsupported adapter key."""
    for key in keys:
        kind = unsupported_kind(key)
        if kind is not None:
            raise CheckpointError(f"{source}: {kind} adapters are not supported (key {key!r}); "
                                  "latentdiff applies plain LoRA / LoCon only")


@dataclass
class LoraPatch:
    """One layer's low-rank update: ``weight += multiplier * scale * up @ down``."""

    target: str  # "unet" or "text_encoder"
    module: str  # dotted module name inside the target network
    down: Tensor  # (r, in) or (r, in, kh, kw)
    up: Tensor  # (out, r) or (out, r, 1, 1)
    scale: float  # alpha / r (1 without an alpha)
    key: str  # the file's key for the down weight, for messages

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def patch(target: str, module: str, down: Tensor, up: Tensor, alpha: Tensor | float | None, key: str) -> LoraPatch:
    """A LoraPatch from a file's tensors; scale = alpha / rank, 1 without an alpha."""
    if down.ndim not in (2, 4) or up.ndim not in (2, 4):
        raise CheckpointError(f"{key}: LoRA weights must be 2-D or 4-D, got down {tuple(down.shape)} "
                              f"and up {tuple(up.shape)}")
    rank = down.shape[0]
    if alpha is None:
        scale = 1.0
    else:
        if isinstance(alpha, Tensor):
            if alpha.numel() != 1:
                raise CheckpointError(f"{key}: alpha must be one number, got shape {tuple(alpha.shape)}")
            alpha = alpha.float().item()
        scale = float(alpha) / rank
    return LoraPatch(target, module, down, up, scale, key)


def delta(p: LoraPatch, weight: Tensor, source: str, multiplier: float = 1.0) -> Tensor:
    """``(up @ down) * (scale * multiplier)`` in float32 with ``weight``'s shape (PEFT's order of
    operations); CheckpointError on a misfit."""
    up, down = p.up, p.down
    if up.ndim == 4 and up.shape[2:] != (1, 1):
        raise CheckpointError(f"{source}: {p.key}: up weight {tuple(up.shape)} is not a 1x1 kernel")
    up2 = up.reshape(up.shape[0], up.shape[1])  # (out, r)
    down2 = down.reshape(down.shape[0], -1)  # (r, in * kh * kw)
    fits = (
        up2.shape == (weight.shape[0], down.shape[0])
        and down2.shape[1] == weight[0].numel()
        and (down.ndim == 2 or weight.ndim == 2 or down.shape[1:] == weight.shape[1:])
    )
    if not fits:
        raise CheckpointError(
            f"{source}: {p.key}: LoRA down {tuple(down.shape)} / up {tuple(up.shape)} does not fit "
            f"{p.target}.{p.module}.weight {tuple(weight.shape)}"
        )
    d = up2.to(weight.device, torch.float32) @ down2.to(weight.device, torch.float32)  # (out, in * kh * kw)
    return (d * (p.scale * multiplier)).reshape(weight.shape)


def check_patches(patches: list[LoraPatch], networks: Mapping[str, nn.Module], source: str) -> None:
    """Every patch names a Linear/Conv2d of its network and its shapes fit: CheckpointError otherwise."""
    seen: dict[tuple[str, str], str] = {}
    modules = {t: dict(net.named_modules()) for t, net in networks.items()}
    for p in patches:
        module = modules[p.target].get(p.module)
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise CheckpointError(f"{source}: {p.key}: no linear or conv layer {p.target}.{p.module}")
        if (p.target, p.module) in seen:
            raise CheckpointError(f"{source}: {p.key} and {seen[p.target, p.module]} patch the same layer "
                                  f"{p.target}.{p.module}")
        seen[p.target, p.module] = p.key
        delta(p, module.weight.detach(), source)  # shape check


@dataclass
class LoadedLora:
    """A LoRA file applied to a pipeline, with its weights per network."""

    path: Path
    patches: list[LoraPatch]
    scales: dict[str, float]  # target -> multiplier
    scale: float  # the user's overall scale (what ``Pipeline.loras`` reports)
    hash: str = ""  # A1111's "Lora hashes" value (see latentdiff.adapters.lora_hash)


@dataclass
class LoraState:
    """The LoRAs merged into a pipeline and the original tensors of every parameter they touch."""

    loaded: dict[str, LoadedLora] = field(default_factory=dict)
    originals: dict[tuple[str, str], Tensor] = field(default_factory=dict)  # (target, param) -> CPU copy

    def add(self, name: str, lora: LoadedLora, networks: Mapping[str, nn.Module]) -> None:
        """Merge ``lora`` into ``networks`` (keeping originals first)."""
        self.loaded[name] = lora
        try:
            self._apply(lora, networks)
        except BaseException:
            self.remove(name, networks)
            raise

    def remove(self, names: str | Iterable[str] | None, networks: Mapping[str, nn.Module]) -> None:
        """Unmerge one LoRA, several, or all with None: restore every touched parameter once,
        re-merge the rest."""
        if names is None:
            self.loaded.clear()
        else:
            for name in [names] if isinstance(names, str) else names:
                self.loaded.pop(name)
        for (target, param), original in self.originals.items():
            weight = _param(networks[target], param)
            with torch.no_grad():
                weight.copy_(original)
        needed = {(p.target, p.module + ".weight") for lora in self.loaded.values() for p in lora.patches}
        self.originals = {k: v for k, v in self.originals.items() if k in needed}
        for lora in self.loaded.values():
            self._apply(lora, networks)

    def _apply(self, lora: LoadedLora, networks: Mapping[str, nn.Module]) -> None:
        for p in lora.patches:
            multiplier = lora.scales.get(p.target, 0.0)
            if multiplier == 0.0:
                continue
            param = p.module + ".weight"
            weight = _param(networks[p.target], param)
            key = (p.target, param)
            if key not in self.originals:
                self.originals[key] = weight.detach().to("cpu", copy=True)
            with torch.no_grad():
                d = delta(p, weight, str(lora.path), multiplier)  # (out, in[, kh, kw]) float32
                weight.copy_((weight.float() + d).to(weight.dtype))


def _param(network: nn.Module, name: str) -> Tensor:
    return network.get_parameter(name)
