"""The original (CompVis / LDM) single-file Stable Diffusion 1.x layout.

A single ``.ckpt`` / ``.safetensors`` file holds three models under three
prefixes::

    model.diffusion_model.                      UNet   (input_blocks / middle_block / output_blocks)
    first_stage_model.                          VAE    (encoder.down / decoder.up / mid.attn_1 ...)
    cond_stage_model.transformer.text_model.    CLIP text encoder (some files omit ``text_model.``)

latentdiff names its modules as diffusers does, so converting is a pure
rename of state-dict keys (plus one reshape: the VAE mid-block attention
projections are 1x1 convolutions, ``(C, C, 1, 1)``, in the original file and
linear layers, ``(C, C)``, in diffusers/latentdiff).

Each model's mapping is one table, ``{diffusers key: original key}``, built
from the model config by walking the blocks in order (``_unet_key_table``,
``_vae_key_table``, ``_text_key_table``); both directions use the same table,
and a conversion is strict: a key missing from the input, or one the table
does not know, raises :class:`CheckpointError` naming it.

Public API::

    unet_to_original(sd, cfg) / unet_from_original(sd, cfg)
    vae_to_original(sd, cfg)  / vae_from_original(sd, cfg)
    text_to_original(sd, cfg=None) / text_from_original(sd, cfg=None)
    split_single_file(sd) -> (unet_sd, vae_sd, text_sd, ignored_keys)
    merge_to_single_file(unet_sd, vae_sd, text_sd, unet_cfg, vae_cfg) -> sd
    infer_configs(sd) -> {"unet": {...}, "vae": {...}, "text_encoder": {...}}

All ``*_original`` state dicts carry their single-file prefix (e.g.
``model.diffusion_model.input_blocks.0.0.weight``), so a merged file is the
union of the three.  ``cfg`` is a dict of diffusers config keys or any object
with those attributes (e.g. latentdiff's config dataclasses).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from latentdiff.checkpoints.errors import CheckpointError

Tensor = torch.Tensor
StateDict = dict[str, Tensor]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."
# Some files store the CLIP text model one level up, without ``text_model.``.
TEXT_PREFIX_SHORT = "cond_stage_model.transformer."

# Non-weight entries a single file may carry: EMA copies, the training noise
# schedule, the learned-variance log, the CLIP position-id buffer, the
# autoencoder's training loss (LPIPS / discriminator).  Matched against full keys.
IGNORED_KEY_PATTERNS: tuple[str, ...] = (
    r"model_ema\..*",
    r"betas",
    r"alphas_cumprod.*",
    r"posterior_.*",
    r"log_one_minus_alphas_cumprod",
    r"sqrt_.*",
    r"logvar",
    r"lvlb_weights",
    r"cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids",
    r"first_stage_model\.loss\..*",
)
_IGNORED_RE = re.compile("|".join(f"(?:{p})" for p in IGNORED_KEY_PATTERNS))

_WB = ("weight", "bias")

# ----------------------------------------------------------------------------
# Per-module tables: diffusers leaf -> original leaf (inside one block).
# ----------------------------------------------------------------------------

# UNet ResBlock (openaimodel.ResBlock): Sequential indices hold the layers.
_UNET_RESNET_MODULES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
}
_UNET_RESNET_SHORTCUT = {"conv_shortcut": "skip_connection"}

# UNet SpatialTransformer: identical names in both layouts.  One transformer
# block per attention (SD 1.x); q/k/v projections have no bias.
_UNET_TRANSFORMER_LEAVES = (
    [f"{m}.{p}" for m in ("norm", "proj_in", "proj_out") for p in _WB]
    + [
        f"transformer_blocks.0.{leaf}"
        for leaf in (
            [f"{attn}.to_{x}.weight" for attn in ("attn1", "attn2") for x in "qkv"]
            + [f"{attn}.to_out.0.{p}" for attn in ("attn1", "attn2") for p in _WB]
            + [f"{m}.{p}" for m in ("norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2") for p in _WB]
        )
    ]
)

# VAE ResnetBlock (no time embedding).
_VAE_RESNET_MODULES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2"}
_VAE_RESNET_SHORTCUT = {"conv_shortcut": "nin_shortcut"}

# VAE mid-block AttnBlock: the projections are 1x1 convs in the original.
_VAE_ATTENTION_MODULES = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
_VAE_ATTENTION_CONV_WEIGHTS = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")

# CLIP text encoder: identical names, only the prefix differs.
_TEXT_LAYER_LEAVES = [
    f"{m}.{p}"
    for m in (
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.q_proj",
        "self_attn.out_proj",
        "layer_norm1",
        "mlp.fc1",
        "mlp.fc2",
        "layer_norm2",
    )
    for p in _WB
]


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def _cfg(cfg: Any, name: str, default: Any = None) -> Any:
    """Read a config field from a dict or from an object with attributes."""
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def _module(table: dict[str, str], d_module: str, o_module: str) -> None:
    """Add weight and bias of one module: diffusers name -> original name."""
    for p in _WB:
        table[f"{d_module}.{p}"] = f"{o_module}.{p}"


def _modules(table: dict[str, str], d_prefix: str, o_prefix: str, modules: Mapping[str, str]) -> None:
    """Add weight and bias of each (diffusers module, original module) pair inside a block."""
    for d_mod, o_mod in modules.items():
        _module(table, f"{d_prefix}.{d_mod}", f"{o_prefix}.{o_mod}")


def _leaves(table: dict[str, str], d_prefix: str, o_prefix: str, leaves: Iterable[str]) -> None:
    """Add leaves whose names are the same in both layouts."""
    for leaf in leaves:
        table[f"{d_prefix}.{leaf}"] = f"{o_prefix}.{leaf}"


def _format_keys(keys: Iterable[str], limit: int = 10) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{len(keys)}: {shown}{more}"


def _check_keys(what: str, got: Iterable[str], expected: Iterable[str]) -> None:
    """Raise CheckpointError naming missing and unexpected keys (up to 10 each)."""
    got, expected = set(got), set(expected)
    missing, unexpected = expected - got, got - expected
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"missing keys {_format_keys(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {_format_keys(unexpected)}")
    raise CheckpointError(f"{what}: " + "; ".join(parts))


def _rename(sd: Mapping[str, Tensor], table: Mapping[str, str], what: str) -> StateDict:
    """Strictly rename ``sd`` through ``table`` ({input key: output key})."""
    _check_keys(what, sd.keys(), table.keys())
    return {table[k]: v for k, v in sd.items()}


def _linear_from_conv1x1(key: str, w: Tensor) -> Tensor:
    """(C_out, C_in, 1, 1) or (C_out, C_in) -> (C_out, C_in)."""
    if w.ndim == 2:
        return w
    if w.ndim == 4 and w.shape[2:] == (1, 1):
        return w.reshape(w.shape[0], w.shape[1])  # (C_out, C_in)
    raise CheckpointError(f"{key}: expected a 1x1 conv or linear weight, got shape {tuple(w.shape)}")


# ----------------------------------------------------------------------------
# UNet
# ----------------------------------------------------------------------------


def _has_attention(block_type: str) -> bool:
    return "CrossAttn" in block_type


def _unet_key_table(cfg: Any) -> dict[str, str]:
    """{diffusers key: original key (without prefix)} for an SD 1.x UNet config.

    Original layout: ``input_blocks.0`` is conv_in; then per level ``L``
    (layers_per_block) ``[ResBlock, SpatialTransformer?]`` entries and, except
    on the last level, one ``Downsample`` entry.  ``output_blocks`` hold
    ``L + 1`` entries per level ``[ResBlock, SpatialTransformer?, Upsample?]``.
    """
    channels = list(_cfg(cfg, "block_out_channels", (320, 640, 1280, 1280)))
    n_levels = len(channels)
    layers = int(_cfg(cfg, "layers_per_block", 2))
    down_types = list(_cfg(cfg, "down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    up_types = list(_cfg(cfg, "up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
    if len(down_types) != n_levels or len(up_types) != n_levels:
        raise CheckpointError(
            f"UNet config: {n_levels} block_out_channels but {len(down_types)} down_block_types "
            f"and {len(up_types)} up_block_types"
        )

    t: dict[str, str] = {}
    _modules(t, "time_embedding", "time_embed", {"linear_1": "0", "linear_2": "2"})
    _module(t, "conv_in", "input_blocks.0.0")
    _module(t, "conv_norm_out", "out.0")
    _module(t, "conv_out", "out.2")

    def resnet(d: str, o: str, shortcut: bool) -> None:
        _modules(t, d, o, _UNET_RESNET_MODULES)
        if shortcut:
            _modules(t, d, o, _UNET_RESNET_SHORTCUT)

    # Down path.
    index = 1
    for level in range(n_levels):
        attn = _has_attention(down_types[level])
        for j in range(layers):
            in_ch = channels[max(level - 1, 0)] if j == 0 else channels[level]
            resnet(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{index}.0", in_ch != channels[level])
            if attn:
                _leaves(t, f"down_blocks.{level}.attentions.{j}", f"input_blocks.{index}.1", _UNET_TRANSFORMER_LEAVES)
            index += 1
        if level < n_levels - 1:
            _module(t, f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{index}.0.op")
            index += 1

    # Middle: ResBlock, SpatialTransformer, ResBlock.
    resnet("mid_block.resnets.0", "middle_block.0", False)
    _leaves(t, "mid_block.attentions.0", "middle_block.1", _UNET_TRANSFORMER_LEAVES)
    resnet("mid_block.resnets.1", "middle_block.2", False)

    # Up path: every ResBlock takes a skip connection, so its input width
    # (h + skip) always differs from its output and it has a shortcut conv.
    index = 0
    for level in range(n_levels):
        attn = _has_attention(up_types[level])
        for j in range(layers + 1):
            resnet(f"up_blocks.{level}.resnets.{j}", f"output_blocks.{index}.0", True)
            sub = 1
            if attn:
                _leaves(t, f"up_blocks.{level}.attentions.{j}", f"output_blocks.{index}.1", _UNET_TRANSFORMER_LEAVES)
                sub = 2
            if j == layers and level < n_levels - 1:
                _module(t, f"up_blocks.{level}.upsamplers.0.conv", f"output_blocks.{index}.{sub}.conv")
            index += 1
    return t


def unet_to_original(sd: Mapping[str, Tensor], cfg: Any) -> StateDict:
    """diffusers/latentdiff UNet state dict -> ``model.diffusion_model.*`` keys."""
    table = {d: UNET_PREFIX + o for d, o in _unet_key_table(cfg).items()}
    return _rename(sd, table, "UNet state dict (diffusers layout)")


def unet_from_original(sd: Mapping[str, Tensor], cfg: Any) -> StateDict:
    """``model.diffusion_model.*`` state dict -> diffusers/latentdiff UNet keys."""
    table = {UNET_PREFIX + o: d for d, o in _unet_key_table(cfg).items()}
    return _rename(sd, table, "UNet state dict (original single-file layout)")


# ----------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------


def _vae_key_table(cfg: Any) -> dict[str, str]:
    """{diffusers key: original key (without prefix)} for an SD 1.x VAE config.

    The original decoder numbers its ``up`` levels from the lowest resolution
    *up* (``up.0`` is the last one run), diffusers numbers ``up_blocks`` in
    execution order: ``up_blocks.i`` <-> ``up.{N-1-i}``.
    """
    channels = list(_cfg(cfg, "block_out_channels", (128, 256, 512, 512)))
    n_levels = len(channels)
    layers = int(_cfg(cfg, "layers_per_block", 2))
    mid_attention = bool(_cfg(cfg, "mid_block_add_attention", True))

    t: dict[str, str] = {}
    for part in ("encoder", "decoder"):
        _modules(t, part, part, {"conv_in": "conv_in", "conv_norm_out": "norm_out", "conv_out": "conv_out"})
        for i, name in ((0, "block_1"), (1, "block_2")):
            _modules(t, f"{part}.mid_block.resnets.{i}", f"{part}.mid.{name}", _VAE_RESNET_MODULES)
        if mid_attention:
            _modules(t, f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION_MODULES)
    _module(t, "quant_conv", "quant_conv")
    _module(t, "post_quant_conv", "post_quant_conv")

    def resnet(d: str, o: str, in_ch: int, out_ch: int) -> None:
        _modules(t, d, o, _VAE_RESNET_MODULES)
        if in_ch != out_ch:
            _modules(t, d, o, _VAE_RESNET_SHORTCUT)

    for i in range(n_levels):
        for j in range(layers):
            in_ch = channels[max(i - 1, 0)] if j == 0 else channels[i]
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", in_ch, channels[i])
        if i < n_levels - 1:
            _module(t, f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv")

    rev = channels[::-1]
    for i in range(n_levels):
        o = n_levels - 1 - i
        for j in range(layers + 1):
            in_ch = rev[max(i - 1, 0)] if j == 0 else rev[i]
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{o}.block.{j}", in_ch, rev[i])
        if i < n_levels - 1:
            _module(t, f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{o}.upsample.conv")
    return t


def _vae_conv_weight_keys(table: Mapping[str, str]) -> set[str]:
    """Diffusers keys of the mid-attention projections stored as 1x1 convs."""
    return {
        k
        for k in table
        if ".mid_block.attentions." in k and k.endswith(_VAE_ATTENTION_CONV_WEIGHTS)
    }


def vae_to_original(sd: Mapping[str, Tensor], cfg: Any) -> StateDict:
    """diffusers/latentdiff VAE state dict -> ``first_stage_model.*`` keys.

    The mid-block attention q/k/v/out weights become 1x1 convs, (C, C, 1, 1).
    """
    table = _vae_key_table(cfg)
    conv = _vae_conv_weight_keys(table)
    out = _rename(sd, {d: VAE_PREFIX + o for d, o in table.items()}, "VAE state dict (diffusers layout)")
    for d in conv:
        key = VAE_PREFIX + table[d]
        w = _linear_from_conv1x1(d, out[key])
        out[key] = w.reshape(w.shape[0], w.shape[1], 1, 1)  # (C_out, C_in, 1, 1)
    return out


def vae_from_original(sd: Mapping[str, Tensor], cfg: Any) -> StateDict:
    """``first_stage_model.*`` state dict -> diffusers/latentdiff VAE keys.

    The mid-block attention q/k/v/proj_out weights may be 1x1 convs (4-D, as
    the original files store them) or already linear (2-D); both give 2-D.
    """
    table = _vae_key_table(cfg)
    conv = _vae_conv_weight_keys(table)
    out = _rename(sd, {VAE_PREFIX + o: d for d, o in table.items()}, "VAE state dict (original single-file layout)")
    for d in conv:
        out[d] = _linear_from_conv1x1(VAE_PREFIX + table[d], out[d])
    return out


# ----------------------------------------------------------------------------
# CLIP text encoder
# ----------------------------------------------------------------------------

_TEXT_LAYER_RE = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.")


def _text_num_layers(keys: Iterable[str], cfg: Any) -> int:
    n = _cfg(cfg, "num_hidden_layers")
    if n is not None:
        return int(n)
    found = [int(m.group(1)) for k in keys if (m := _TEXT_LAYER_RE.search(k))]
    return max(found) + 1 if found else 0


def _text_key_table(num_layers: int) -> dict[str, str]:
    """{latentdiff key (transformers-4 layout): original key} for the CLIP text model."""
    t: dict[str, str] = {}
    leaves = ["embeddings.token_embedding.weight", "embeddings.position_embedding.weight"]
    leaves += [f"final_layer_norm.{p}" for p in _WB]
    for i in range(num_layers):
        leaves += [f"encoder.layers.{i}.{leaf}" for leaf in _TEXT_LAYER_LEAVES]
    _leaves(t, "text_model", TEXT_PREFIX.rstrip("."), leaves)
    return t


_POSITION_IDS = "text_model.embeddings.position_ids"


def text_to_original(sd: Mapping[str, Tensor], cfg: Any = None) -> StateDict:
    """latentdiff text encoder (``text_model.*``) -> ``cond_stage_model.transformer.text_model.*``.

    ``cfg`` (``num_hidden_layers``) is optional; without it the layer count
    is read from the keys.  A ``position_ids`` buffer, if present, is dropped.
    """
    sd = {k: v for k, v in sd.items() if k != _POSITION_IDS}
    table = _text_key_table(_text_num_layers(sd, cfg))
    return _rename(sd, table, "text encoder state dict (transformers-4 layout)")


def text_from_original(sd: Mapping[str, Tensor], cfg: Any = None) -> StateDict:
    """``cond_stage_model.transformer.[text_model.]*`` -> latentdiff ``text_model.*`` keys.

    Accepts both the usual prefix and the short one without ``text_model.``;
    the ``position_ids`` buffer, if present, is dropped.
    """
    sd = {_normalize_text_key(k): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if k != TEXT_PREFIX + "embeddings.position_ids"}
    table = _text_key_table(_text_num_layers(sd, cfg))
    return _rename(sd, {o: d for d, o in table.items()}, "text encoder state dict (original single-file layout)")


def _normalize_text_key(key: str) -> str:
    if key.startswith(TEXT_PREFIX_SHORT) and not key.startswith(TEXT_PREFIX):
        return TEXT_PREFIX + key[len(TEXT_PREFIX_SHORT):]
    return key


# ----------------------------------------------------------------------------
# Whole file
# ----------------------------------------------------------------------------


def _unwrap(sd: Mapping[str, Any]) -> Mapping[str, Any]:
    """``.ckpt`` files from training nest the weights under ``state_dict``."""
    inner = sd.get("state_dict")
    return inner if isinstance(inner, Mapping) else sd


def _require_sd1(sd: Mapping[str, Any]) -> None:
    if not any(k.startswith(UNET_PREFIX) for k in sd):
        sample = ", ".join(sorted(sd)[:5]) or "no keys at all"
        raise CheckpointError(
            f"not an SD 1.x single-file checkpoint: no '{UNET_PREFIX}*' keys (first keys: {sample})"
        )


def _partition(sd: Mapping[str, Tensor]) -> tuple[StateDict, StateDict, StateDict, list[str]]:
    """Split by prefix: (unet, vae, text) still in original layout, plus ignored key names."""
    unet: StateDict = {}
    vae: StateDict = {}
    text: StateDict = {}
    ignored: list[str] = []
    unknown: list[str] = []
    for key, value in sd.items():
        if _IGNORED_RE.fullmatch(key) or not isinstance(value, Tensor):
            ignored.append(key)
        elif key.startswith(UNET_PREFIX):
            unet[key] = value
        elif key.startswith(VAE_PREFIX):
            vae[key] = value
        elif key.startswith(TEXT_PREFIX_SHORT):
            text[_normalize_text_key(key)] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"single-file checkpoint: unexpected keys {_format_keys(unknown)}")
    for name, part, prefix in (("VAE", vae, VAE_PREFIX), ("text encoder", text, TEXT_PREFIX_SHORT)):
        if not part:
            raise CheckpointError(f"single-file checkpoint has no {name} weights ('{prefix}*' keys)")
    return unet, vae, text, sorted(ignored)


def split_single_file(sd: Mapping[str, Tensor]) -> tuple[StateDict, StateDict, StateDict, list[str]]:
    """Split an original SD 1.x single file into latentdiff state dicts.

    Returns ``(unet_sd, vae_sd, text_sd, ignored_keys)``: the three models in
    diffusers/latentdiff layout (configs from :func:`infer_configs`), and the
    sorted names of the non-weight entries that were skipped (EMA weights,
    noise-schedule buffers, position ids, ...; see ``IGNORED_KEY_PATTERNS``).
    Raises :class:`CheckpointError` for a file that is not SD 1.x, a key that
    belongs to no model, or a model whose keys do not match its config.
    """
    sd = _unwrap(sd)
    _require_sd1(sd)
    unet, vae, text, ignored = _partition(sd)
    cfgs = _infer_from_parts(unet, vae, text)
    return (
        unet_from_original(unet, cfgs["unet"]),
        vae_from_original(vae, cfgs["vae"]),
        text_from_original(text, cfgs["text_encoder"]),
        ignored,
    )


def merge_to_single_file(
    unet_sd: Mapping[str, Tensor],
    vae_sd: Mapping[str, Tensor],
    text_sd: Mapping[str, Tensor],
    unet_cfg: Any,
    vae_cfg: Any,
) -> StateDict:
    """The reverse of :func:`split_single_file`: one state dict in the original layout."""
    out = unet_to_original(unet_sd, unet_cfg)
    out.update(vae_to_original(vae_sd, vae_cfg))
    out.update(text_to_original(text_sd))
    return out


# ----------------------------------------------------------------------------
# Config inference
# ----------------------------------------------------------------------------

_SD1_UNET_DEFAULTS: dict[str, Any] = {
    "sample_size": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
_SD1_VAE_DEFAULTS: dict[str, Any] = {
    "sample_size": 512,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}
_SD1_TEXT_DEFAULTS: dict[str, Any] = {
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}


def _indices(keys: Iterable[str], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def _get(sd: Mapping[str, Tensor], key: str, what: str) -> Tensor:
    try:
        return sd[key]
    except KeyError:
        raise CheckpointError(f"cannot infer the {what} config: missing key {key}") from None


def _infer_unet(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    p = UNET_PREFIX
    n_in = len(_indices(sd, re.escape(p) + r"input_blocks\.(\d+)\."))
    n_down = len([k for k in sd if re.fullmatch(re.escape(p) + r"input_blocks\.\d+\.0\.op\.weight", k)])
    n_levels = n_down + 1
    # input_blocks = 1 (conv_in) + n_levels * layers + n_down downsamplers.
    layers, rem = divmod(n_in - 1 - n_down, n_levels)
    if rem or layers < 1:
        raise CheckpointError(
            f"cannot infer the UNet config: {n_in} input blocks and {n_down} downsamplers "
            "do not form an SD 1.x UNet"
        )
    first = [1 + level * (layers + 1) for level in range(n_levels)]
    channels = [int(_get(sd, f"{p}input_blocks.{i}.0.out_layers.3.weight", "UNet").shape[0]) for i in first]
    down_types = [
        "CrossAttnDownBlock2D" if f"{p}input_blocks.{i}.1.proj_in.weight" in sd else "DownBlock2D" for i in first
    ]
    up_types = [
        "CrossAttnUpBlock2D" if f"{p}output_blocks.{level * (layers + 1)}.1.proj_in.weight" in sd else "UpBlock2D"
        for level in range(n_levels)
    ]
    cross = _get(sd, f"{p}middle_block.1.transformer_blocks.0.attn2.to_k.weight", "UNet")
    proj_in = _get(sd, f"{p}middle_block.1.proj_in.weight", "UNet")
    cfg = {
        "in_channels": int(_get(sd, f"{p}input_blocks.0.0.weight", "UNet").shape[1]),
        "out_channels": int(_get(sd, f"{p}out.2.weight", "UNet").shape[0]),
        "block_out_channels": channels,
        "layers_per_block": layers,
        "down_block_types": down_types,
        "up_block_types": up_types,
        "cross_attention_dim": int(cross.shape[1]),
        "use_linear_projection": proj_in.ndim == 2,
    }
    return {**_SD1_UNET_DEFAULTS, **cfg}


def _infer_vae(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    p = VAE_PREFIX
    levels = _indices(sd, re.escape(p) + r"encoder\.down\.(\d+)\.")
    if not levels:
        raise CheckpointError("cannot infer the VAE config: no encoder.down.* keys")
    layers = len(_indices(sd, re.escape(p) + r"encoder\.down\.0\.block\.(\d+)\."))
    channels = [int(_get(sd, f"{p}encoder.down.{i}.block.0.conv1.weight", "VAE").shape[0]) for i in levels]
    cfg = {
        "in_channels": int(_get(sd, f"{p}encoder.conv_in.weight", "VAE").shape[1]),
        "out_channels": int(_get(sd, f"{p}decoder.conv_out.weight", "VAE").shape[0]),
        "latent_channels": int(_get(sd, f"{p}post_quant_conv.weight", "VAE").shape[0]),
        "block_out_channels": channels,
        "layers_per_block": layers,
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "mid_block_add_attention": f"{p}encoder.mid.attn_1.q.weight" in sd,
    }
    return {**_SD1_VAE_DEFAULTS, **cfg}


def _infer_text(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    p = TEXT_PREFIX
    tokens = _get(sd, f"{p}embeddings.token_embedding.weight", "text encoder")
    hidden = int(tokens.shape[1])
    cfg = {
        "hidden_size": hidden,
        "intermediate_size": int(_get(sd, f"{p}encoder.layers.0.mlp.fc1.weight", "text encoder").shape[0]),
        "num_hidden_layers": len(_indices(sd, re.escape(p) + r"encoder\.layers\.(\d+)\.")),
        "num_attention_heads": hidden // 64,
        "vocab_size": int(tokens.shape[0]),
        "max_position_embeddings": int(
            _get(sd, f"{p}embeddings.position_embedding.weight", "text encoder").shape[0]
        ),
    }
    return {**_SD1_TEXT_DEFAULTS, **cfg}


def _infer_from_parts(unet: StateDict, vae: StateDict, text: StateDict) -> dict[str, dict[str, Any]]:
    return {"unet": _infer_unet(unet), "vae": _infer_vae(vae), "text_encoder": _infer_text(text)}


def infer_configs(sd: Mapping[str, Tensor]) -> dict[str, dict[str, Any]]:
    """What the tensor shapes of an original SD 1.x single file say about its models.

    Returns ``{"unet": {...}, "vae": {...}, "text_encoder": {...}}``, plain
    dicts of diffusers / transformers config keys.

    Read from shapes: UNet ``in_channels`` (4, or 9 for inpainting),
    ``out_channels``, ``block_out_channels``, ``layers_per_block``,
    ``down_block_types`` / ``up_block_types`` (which levels have attention),
    ``cross_attention_dim``, ``use_linear_projection``; VAE ``in_channels``,
    ``out_channels``, ``latent_channels``, ``block_out_channels``,
    ``layers_per_block``, ``mid_block_add_attention``; text encoder
    ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
    ``vocab_size``, ``max_position_embeddings``.

    Not readable from shapes, so set to SD 1.x values:

    - UNet ``attention_head_dim`` = 8: the q/k/v weights are (inner, inner)
      whatever the split into heads, so the head count cannot be seen; SD 1.x
      uses 8 heads (diffusers' misnamed ``attention_head_dim`` is that count).
    - ``norm_num_groups`` = 32 (GroupNorm has one weight per channel, not per
      group), UNet ``sample_size`` = 64, VAE ``sample_size`` = 512 and
      ``scaling_factor`` = 0.18215.
    - text ``num_attention_heads`` = ``hidden_size // 64`` (CLIP's 64-wide
      heads: 12 for ViT-L/14's 768), ``hidden_act`` = "quick_gelu",
      ``layer_norm_eps`` = 1e-5 and the CLIP token ids bos 0 / eos 2 / pad 1
      as in SD 1.x's ``text_encoder/config.json``.
    """
    sd = _unwrap(sd)
    _require_sd1(sd)
    unet, vae, text, _ = _partition(sd)
    return _infer_from_parts(unet, vae, text)
