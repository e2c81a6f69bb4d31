"""diffusers / PEFT LoRA files, and diffusers' older attention-processor keys.

- PEFT (what ``save_lora_weights`` writes today): ``unet.<module>.lora_A.weight`` (r x in
  [x k x k]), ``unet.<module>.lora_B.weight`` (out x r [x 1 x 1]), likewise
  ``text_encoder.<module>...``; optional ``<module>.alpha`` (scale alpha / r, else 1).
- Attention processors (diffusers <= 0.20): ``unet.<block>.attn1.processor.to_q_lora.down.weight``
  / ``.up.weight`` (``to_k_lora``, ``to_v_lora``, ``to_out_lora`` = ``to_out.0``), the text
  encoder's ``self_attn.to_q_lora`` (= ``q_proj``; ``to_out_lora`` = ``out_proj``) and
  ``<module>.lora_linear_layer.down.weight``; files without the ``unet.`` prefix are UNet files.
Module names are latentdiff's, which mirror diffusers' UNet and transformers' CLIPTextModel.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from ..checkpoints.errors import CheckpointError
from .lora import TARGETS, LoraPatch, patch

# (suffix of the key, role)
_LEAVES = (
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".down.weight", "down"), (".up.weight", "up"),  # processor form: to_q_lora.down.weight
    (".alpha", "alpha"),
)
_UNET_PROCESSOR = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
_TEXT_PROCESSOR = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}
_PROCESSOR_RE = re.compile(r"^(?P<head>.*?)(?:\.processor)?\.(?P<leaf>to_(?:q|k|v|out)_lora)$")


def _split(key: str) -> tuple[str, str, str]:
    """key -> (target, module path as written, role); CheckpointError for a key of no known form."""
    target, rest = "unet", key
    for t in TARGETS:
        if key.startswith(t + "."):
            target, rest = t, key[len(t) + 1:]
    for leaf, role in _LEAVES:
        if rest.endswith(leaf):
            written = rest[: -len(leaf)]
            if leaf in (".down.weight", ".up.weight") and not _PROCESSOR_RE.match(written):
                break  # a bare down/up only after to_q_lora & co.
            return target, written, role
    raise CheckpointError(f"unexpected key {key!r} (expected <module>.lora_A.weight / .lora_B.weight / .alpha)")


def _module_name(target: str, written: str) -> str:
    """The processor form's names -> the layer's module name; other forms pass through."""
    m = _PROCESSOR_RE.match(written)
    if m:
        table = _UNET_PROCESSOR if target == "unet" else _TEXT_PROCESSOR
        return f"{m['head']}.{table[m['leaf']]}"
    return written


def parse(sd: Mapping[str, Tensor], source: str) -> list[LoraPatch]:
    """The patches of a diffusers/PEFT state dict; every key must be accounted for."""
    groups: dict[tuple[str, str], dict[str, tuple[str, Tensor]]] = {}
    for key, value in sd.items():
        try:
            target, written, role = _split(key)
        except CheckpointError as err:
            raise CheckpointError(f"{source}: {err}") from None
        module = _module_name(target, written)
        group = groups.setdefault((target, module), {})
        if role in group:
            raise CheckpointError(f"{source}: keys {group[role][0]!r} and {key!r} both give the {role} "
                                  f"weight of {target}.{module}")
        group[role] = (key, value)
    patches = []
    for (target, module), parts in groups.items():
        for role in ("down", "up"):
            if role not in parts:
                other = next(iter(parts.values()))[0]
                raise CheckpointError(f"{source}: {other!r} has no matching LoRA {role} weight")
        alpha = parts["alpha"][1] if "alpha" in parts else None
        patches.append(patch(target, module, parts["down"][1], parts["up"][1], alpha, parts["down"][0]))
    return patches
