"""CLIP text transformer (the SD 1.x text encoder, OpenAI ViT-L/14 text tower).

Module names mirror the transformers-4 state dict that SD 1.x repositories ship
(``text_model.embeddings.token_embedding.weight`` ...), so loading their
``text_encoder`` weights is an identity copy with ``strict=True``. Weights saved
by transformers 5 (no ``text_model.`` prefix) or found in an original single
file (under ``cond_stage_model.transformer.``) go through
:func:`normalize_text_encoder_keys` first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from latentdiff.checkpoints.errors import CheckpointError
from latentdiff.models.config import ConfigError, ModelConfig

TEXT_MODEL_PREFIX = "text_model."
# Prefixes other layouts put in front of the transformers-4 keys (or of the keys without
# ``text_model.``), stripped by normalize_text_encoder_keys.
_OUTER_PREFIXES = ("cond_stage_model.transformer.",)
# First component of a transformers-5 key (saved without the ``text_model.`` prefix).
_INNER_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(ModelConfig):
    """Config of the CLIP text transformer; field names are transformers' CLIPTextConfig keys."""

    _class_name = "CLIPTextModel"

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1
    projection_dim: int = 768

    @classmethod
    def sd15(cls) -> CLIPTextConfig:
        """OpenAI CLIP ViT-L/14 text tower as used by SD 1.x (123,060,480 parameters).

        Token ids follow transformers' current CLIPTextConfig (bos 49406, eos 49407).
        SD 1.5's own ``text_encoder/config.json`` predates that and says bos 0 / eos 2;
        loading it keeps those values and :meth:`CLIPTextModel.pooled` then pools at the
        highest token id, as transformers does for ``eos_token_id == 2``.
        """
        return cls()

    @classmethod
    def tiny(cls) -> CLIPTextConfig:
        """A few-thousand-parameter model for tests (special tokens at the end of a 1000 vocab)."""
        return cls(
            vocab_size=1000,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=998,
            eos_token_id=999,
            pad_token_id=1,
            projection_dim=32,
        )

    def validate(self) -> None:
        if self.hidden_act not in _ACTIVATIONS:
            raise ConfigError(
                f"CLIPTextConfig.hidden_act must be one of {sorted(_ACTIVATIONS)}, got {self.hidden_act!r}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"CLIPTextConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"CLIPTextConfig.hidden_size ({self.hidden_size}) is not divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )

    def to_dict(self) -> dict[str, Any]:
        """The config as transformers writes it (``model_type``/``architectures``, no ``_class_name``)."""
        out = super().to_dict()
        out.pop("_class_name", None)
        out["model_type"] = "clip_text_model"
        out["architectures"] = [self._class_name]
        return out


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI's sigmoid approximation of GELU: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPAttention(nn.Module):
    """Multi-head self-attention: causal for the text tower, full for CLIP's image tower.

    ``config`` is any config with ``hidden_size`` and ``num_attention_heads`` (the text or
    the vision config); ``causal`` adds no weights, so keys are the same either way.
    """

    def __init__(self, config: CLIPTextConfig, causal: bool = True) -> None:
        super().__init__()
        self.causal = causal
        self.num_heads = config.num_attention_heads
        d = config.hidden_size
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.num_heads

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)  # (B, heads, T, d)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, heads, T, d)
        y = y.transpose(1, 2).reshape(b, t, d)  # (B, T, D)
        return self.out_proj(y)


class CLIPMLP(nn.Module):
    """Feed-forward block: fc1 -> activation -> fc2."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.act = _ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x)); causal unless told."""

    def __init__(self, config: CLIPTextConfig, causal: bool = True) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(config, causal=causal)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """The stack of layers (holds ``layers`` only, to match the checkpoint keys)."""

    def __init__(self, config: CLIPTextConfig, causal: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config, causal=causal) for _ in range(config.num_hidden_layers))


class CLIPTextEmbeddings(nn.Module):
    """Token plus learned absolute position embeddings."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Ids (B, T) -> token + position embeddings (B, T, D); ``inputs_embeds`` (B, T, D)
        replaces the token embeddings (as transformers' ``inputs_embeds``), positions are still added."""
        t = input_ids.shape[-1]
        if t > self.position_embedding.num_embeddings:
            raise ValueError(
                f"sequence of {t} tokens is longer than the {self.position_embedding.num_embeddings} "
                "positions of the text encoder"
            )
        # Positions are computed, not stored: no position_ids buffer in the state dict.
        positions = torch.arange(t, device=input_ids.device)
        tokens = self.token_embedding(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        return tokens + self.position_embedding(positions)  # (B, T, D)


class CLIPTextTransformer(nn.Module):
    """Embeddings -> causal encoder -> final layer norm (the ``text_model`` submodule)."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """The SD 1.x text encoder; ``state_dict()`` keys are the transformers-4 layout."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def forward(self, input_ids: torch.Tensor, skip_last_layers: int = 0,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) -> hidden states (B, T, D) after the final layer norm.

        ``inputs_embeds`` (B, T, D), when given, replaces the token embeddings of ``input_ids``
        (textual-inversion vectors); position embeddings are added to it as usual.

        ``skip_last_layers=n`` stops ``n`` layers before the end and applies the final
        layer norm to that hidden state (AUTOMATIC1111's "CLIP skip" = n + 1).
        """
        layers = self.text_model.encoder.layers
        if not 0 <= skip_last_layers < len(layers):
            raise ValueError(f"skip_last_layers must be in [0, {len(layers) - 1}], got {skip_last_layers}")
        x = self.text_model.embeddings(input_ids, inputs_embeds)  # (B, T, D)
        for layer in layers[: len(layers) - skip_last_layers]:
            x = layer(x)
        return self.text_model.final_layer_norm(x)

    def pooled(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden state at the first end token of each sequence: (B, D).

        As transformers: a config with the legacy ``eos_token_id == 2`` (SD 1.5's file)
        pools at the highest token id instead, which is the end token of CLIP's vocab.
        """
        hidden = self.forward(input_ids)  # (B, T, D)
        if self.config.eos_token_id == 2:
            index = input_ids.to(torch.int).argmax(dim=-1)
        else:
            index = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def normalize_text_encoder_keys(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map any known text-encoder layout onto :class:`CLIPTextModel`'s keys.

    Accepts transformers 4 / SD 1.x (``text_model.*``), transformers 5 (the same keys
    without ``text_model.``) and single-file keys (``cond_stage_model.transformer.*``).
    ``position_ids`` buffers are dropped and returned as the second element so the caller
    can report them once. Keys it does not recognise are passed through unchanged, so a
    strict ``load_state_dict`` names them.
    """
    out: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key, value in state_dict.items():
        if key.endswith("position_ids"):
            ignored.append(key)
            continue
        new = key
        for prefix in _OUTER_PREFIXES:
            if new.startswith(prefix):
                new = new[len(prefix):]
        if new.startswith(_INNER_ROOTS):
            new = TEXT_MODEL_PREFIX + new
        if new in out:
            raise CheckpointError(f"text encoder state dict holds {key!r} twice under different layouts")
        out[new] = value
    return out, ignored
