"""Textual inversion: learn ``num_vectors`` token embeddings for a new word, everything else frozen.

    from latentdiff.train import EmbeddingTrainConfig, train_embedding
    result = train_embedding(EmbeddingTrainConfig(pretrained="my-sd15", data="my-cat/", token="mycat",
                                                  init_word="cat", num_vectors=2))
    pipe.load_textual_inversion(result.exported)      # then "a photo of mycat on a sofa"

The new word works as A1111's embeddings do (:mod:`latentdiff.adapters.embeddings`): wherever the
prompt spells ``token``, its vectors (n, D) replace the token embeddings. The vectors start as the
token embeddings of ``init_word`` (its tokens cycled to ``num_vectors``). Each sample's caption is
one of ``templates`` (picked from the sample's own draws): ``{token}`` is the new word,
``{caption}`` the image's own caption. The loss is the UNet trainer's denoising loss; only the
vectors train (AdamW, default lr 5e-3 as A1111's).

Export: ``out_dir/<token>.pt`` in A1111's format (``string_to_token``, ``string_to_param``
``{"*": (n, D)}``, ``name``, ``step``) and ``out_dir/<token>.safetensors`` (``emb_params``), both read
by latentdiff, A1111 and diffusers' ``load_textual_inversion``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoints.io import atomic_path, write_safetensors
from ..pipeline import Pipeline
from .build import base_pipeline
from .config import TrainConfigError, UNetTrainConfig
from .data import ImageCaptionSource
from .draws import EMBEDDING, sample_generator
from .loop import TrainResult, run_training
from .optim import make_adamw
from .unet import DiffusionTrainer

DEFAULT_TEMPLATES = ("a photo of {token}", "a rendering of {token}", "a picture of {token}", "{token}, {caption}")


@dataclasses.dataclass
class EmbeddingTrainConfig(UNetTrainConfig):
    """Textual inversion of a pipeline (see the module docstring)."""

    out_dir: str = "runs/embedding"
    token: str = "my-concept"  # the new word, and the exported files' stem
    init_word: str = "*"  # the vectors start as this text's token embeddings
    num_vectors: int = 1
    templates: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    lr: float = 5e-3
    warmup_steps: int = 0
    weight_decay: float = 0.0
    ema_decay: float = 0.0
    caption_dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        if not self.token.strip() or any(c in self.token for c in "/\\:{}"):
            raise TrainConfigError(f"token must be a plain word usable as a file name, got {self.token!r}")
        if not 1 <= self.num_vectors <= 75:
            raise TrainConfigError(f"num_vectors must be in [1, 75], got {self.num_vectors}")
        if not self.templates or any("{token}" not in t for t in self.templates):
            raise TrainConfigError("every template must contain {token} (and may contain {caption})")


class _Vectors(nn.Module):
    def __init__(self, vectors: Tensor) -> None:
        super().__init__()
        self.vectors = nn.Parameter(vectors)  # (n, D)


class EmbeddingTrainer(DiffusionTrainer):
    """Textual inversion as a :class:`~latentdiff.train.loop.TrainTask`."""

    kind = "embedding"

    def build_pipeline(self) -> Pipeline:
        return base_pipeline(self.config.pretrained)

    def setup_training(self) -> None:
        cfg: EmbeddingTrainConfig = self.config  # type: ignore[assignment]
        self.token = cfg.token
        if not self.tokenizer.encode(self.token):
            raise TrainConfigError(f"token {self.token!r} tokenizes to nothing and could never be triggered")
        ids = self.tokenizer.encode(cfg.init_word)
        if not ids:
            raise TrainConfigError(f"init_word {cfg.init_word!r} tokenizes to nothing")
        table = self.text_encoder.text_model.embeddings.token_embedding.weight.detach()  # (V, D)
        start = table[[ids[i % len(ids)] for i in range(cfg.num_vectors)]].clone().float()  # (n, D)
        self.embedding = _Vectors(start)
        self.modules = {"embedding": self.embedding}
        if not cfg.sample_prompts:  # the first template, filled with the first captions
            self.prompts = [self.fill(cfg.templates[0], c) for c in self.prompts]
        self.optimizers = {"embedding": make_adamw(self.embedding.parameters(), cfg.lr,
                                                   (cfg.adam_beta1, cfg.adam_beta2), cfg.weight_decay)}

    def text_is_frozen(self) -> bool:
        return False

    @property
    def vectors(self) -> Tensor:
        return self.embedding.vectors

    def captions_of(self, indices: list[int], ids: list[int]) -> list[str]:
        """Template ``k`` of sample ``n`` (k from the sample's draws), filled with the token and the caption."""
        templates = self.config.templates  # type: ignore[attr-defined]
        out = []
        for i, n in zip(indices, ids):
            k = int(torch.randint(0, len(templates), (), generator=sample_generator(self.config.seed, EMBEDDING, n)))
            out.append(self.fill(templates[k], self.captions[i]))
        return out

    def fill(self, template: str, caption: str) -> str:
        return template.replace("{token}", self.token).replace("{caption}", caption)

    def condition(self, captions: list[str]) -> Tensor:
        pipe = dataclasses.replace(self.pipe, embeddings={**self.pipe.embeddings, self.token: self.vectors})
        return pipe.text_states(captions).float()  # (B, 77 * chunks, D), gradients into the vectors

    # ------------------------------------------------------------------ previews and export
    def sampling_pipeline(self) -> Pipeline:
        return dataclasses.replace(self.pipe, embeddings={**self.pipe.embeddings, self.token: self.vectors.detach()})

    @property
    def export_name(self) -> str:
        return self.token + ".pt"

    def export(self, folder: Path) -> Path:
        """``<token>.pt`` (A1111) at ``folder`` (a file path) and ``<token>.safetensors`` beside it."""
        vectors = self.vectors.detach().float().cpu().contiguous()  # (n, D)
        step = max((int(s["step"]) for s in self.optimizers["embedding"].state.values() if "step" in s), default=0)
        with atomic_path(folder) as tmp:
            torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": self.token,
                        "step": step, "sd_checkpoint": None, "sd_checkpoint_name": None}, tmp)
        write_safetensors({"emb_params": vectors}, folder.with_suffix(".safetensors"),
                          metadata={"name": self.token, "step": str(step)})
        return folder


def train_embedding(
    config: EmbeddingTrainConfig,
    *,
    source: ImageCaptionSource | None = None,
    pipeline: Pipeline | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Learn ``config.token``'s vectors on ``config.pretrained`` (default the built-in model);
    ``result.exported`` is the A1111 ``.pt`` (the ``.safetensors`` lies beside it)."""
    return run_training(EmbeddingTrainer(config, source=source, pipeline=pipeline), resume=resume, progress=progress)
