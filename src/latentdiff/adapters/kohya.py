"""kohya-ss / AUTOMATIC1111 LoRA files: ``lora_unet_*`` and ``lora_te_*`` keys.

Each layer is one flattened module name (dots as underscores) with
``.lora_down.weight`` (r x in [x k x k]), ``.lora_up.weight`` (out x r [x 1 x 1]) and an
optional ``.alpha`` (scale alpha / r; none means r, i.e. scale 1).  UNet names come in
diffusers form (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``)
or the original SD form (``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q``,
``lora_unet_middle_block_1_...``, ``lora_unet_output_blocks_...``, ResNets as
``in_layers_2`` / ``out_layers_3`` / ``emb_layers_1`` / ``skip_connection``, samplers as
``op`` / ``conv``); the text encoder's are transformers' CLIPTextModel names
(``lora_te_text_model_encoder_layers_0_self_attn_q_proj``).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from ..checkpoints.errors import CheckpointError
from ..checkpoints.single_file import _unet_key_table
from .lora import LoraPatch, patch

PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder"}
_LEAVES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def is_kohya_key(key: str) -> bool:
    return key.startswith(tuple(PREFIXES))


def _layers(network: nn.Module) -> list[str]:
    return [name for name, m in network.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _original_names(unet: nn.Module, names: list[str]) -> dict[str, str]:
    """{diffusers module name: original SD module name} for the UNet's layers.

    Whole modules come from the single-file key table; modules inside a transformer
    (whose leaves keep their names) through the table's block prefixes, so transformer
    blocks past the first are covered too.
    """
    table = _unet_key_table(unet.config)  # {diffusers key: original key}
    modules: dict[str, str] = {}
    prefixes: dict[str, str] = {}
    for d, o in table.items():
        dm, om = d.rsplit(".", 1)[0], o.rsplit(".", 1)[0]
        modules[dm] = om
        dp, op = dm.split("."), om.split(".")
        n = 0  # common trailing components
        while n < min(len(dp), len(op)) and dp[-1 - n] == op[-1 - n]:
            n += 1
        if n:
            prefixes[".".join(dp[:-n])] = ".".join(op[:-n])
    out: dict[str, str] = {}
    for name in names:
        if name in modules:
            out[name] = modules[name]
            continue
        parts = name.split(".")
        for i in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:i])
            if head in prefixes:
                out[name] = prefixes[head] + "." + ".".join(parts[i:])
                break
    return out


def name_table(networks: Mapping[str, nn.Module]) -> dict[str, tuple[str, str]]:
    """{kohya layer name: (target, module name)}, diffusers and original SD forms."""
    table: dict[str, tuple[str, str]] = {}
    unet_layers = _layers(networks["unet"])
    for name in unet_layers:
        table["lora_unet_" + name.replace(".", "_")] = ("unet", name)
    for name, original in _original_names(networks["unet"], unet_layers).items():
        table.setdefault("lora_unet_" + original.replace(".", "_"), ("unet", name))
    for name in _layers(networks["text_encoder"]):
        table["lora_te_" + name.replace(".", "_")] = ("text_encoder", name)
    return table


def parse(sd: Mapping[str, Tensor], networks: Mapping[str, nn.Module], source: str) -> list[LoraPatch]:
    """The patches of a kohya state dict; every key must be accounted for (CheckpointError naming it)."""
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        leaf = next((leaf for leaf in _LEAVES if key.endswith(leaf)), None)
        if leaf is None or not is_kohya_key(key):
            raise CheckpointError(f"{source}: unexpected key {key!r} in a kohya LoRA file "
                                  "(expected <layer>.lora_down.weight / .lora_up.weight / .alpha)")
        groups.setdefault(key[: -len(leaf)], {})[leaf] = value
    table = name_table(networks)
    patches = []
    for layer, parts in groups.items():
        down_key = layer + ".lora_down.weight"
        if ".lora_down.weight" not in parts or ".lora_up.weight" not in parts:
            missing = "lora_down" if ".lora_down.weight" not in parts else "lora_up"
            raise CheckpointError(f"{source}: LoRA layer {layer!r} has no {missing}.weight")
        if layer not in table:
            raise CheckpointError(f"{source}: LoRA key {down_key!r} names no layer of this model")
        target, module = table[layer]
        patches.append(patch(target, module, parts[".lora_down.weight"], parts[".lora_up.weight"],
                             parts.get(".alpha"), down_key))
    return patches
