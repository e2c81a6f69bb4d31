"""Contrastive training of a small CLIP on Shapes World, whose frozen text tower conditions the UNet.

    from latentdiff.train.clip import CLIPTrainConfig, train_clip
    result = train_clip(CLIPTrainConfig(out_dir="runs/clip", max_steps=3000))
    # runs/clip/text_encoder/ + runs/clip/tokenizer/  -> UNetTrainConfig(text_encoder=..., tokenizer=...)
    # runs/clip/clip/                                 -> the whole CLIP (transformers CLIPModel layout)

As SD uses OpenAI's CLIP text tower, the built-in model uses the text tower of this CLIP.

This module holds the config, the run's tokenizer, the stream order and the trainer. The hard
negatives come from :mod:`latentdiff.world.negatives`, the loss is
:func:`latentdiff.train.losses.clip_loss`, the metric and the encode helpers are in
:mod:`latentdiff.eval.zero_shot`.

**Data.** A stream of world scenes: optimizer step ``s`` (micro-batch ``m``) takes stream
positions ``p = (s * grad_accum + m) * batch_size + j``; position ``p`` is item
``p % world_length`` of ``WorldDataset(world_seed, world_length)`` (a training scene, never a
held-out one, with its full caption half the time and a partial one otherwise, as the UNet
sees them) plus ``hard_negatives`` captions drawn from ``numpy.random.default_rng([world_seed,
p, _NEGATIVE_TAG])``. Everything is a pure function of the stream position, so the data state
is one integer and a resumed run continues exactly. The default ``world_length`` is
effectively endless (every step sees fresh scenes).

**Hard negatives** (:func:`~latentdiff.world.negatives.hard_negatives`). For each image,
captions that differ from its caption in exactly one *named* attribute: one object's colour,
shape, size or position, the background, or a swap of one attribute (colour, shape, size,
position) between the two objects (attribute binding).
Kinds are visited in a random order, one random variant per kind, round-robin until there are
``hard_negatives`` of them; a variant that still describes the image (e.g. swapping the colours
of a red and a blue circle) is never used. Every caption has at least 7 variants (``a red
circle``: 5 colours + 2 shapes), hence ``hard_negatives <= 7``.

**Loss** (:func:`~latentdiff.train.losses.clip_loss`). Symmetric InfoNCE (CLIP) with a learnable
temperature, plus the hard negatives:

    logits[i, j] = exp(logit_scale) * cos(image_i, text_j)          (B, B)
    image -> text, row i: [logits[i, :], exp(logit_scale) * cos(image_i, hard_ik) for k < K]
                          softmax over B + K candidates, target column i
    text -> image, column j: logits[:, j], softmax over the B images, target row i = j
    loss = (CE_image->text + CE_text->image) / 2

Choice: hard negatives are extra candidates **only in their own image's row** (each is built to
be wrong for that image; for the other images of the batch it would be one more easy negative).
They take no part in the text -> image direction (they have no matching image).
With ``mask_false_negatives`` an in-batch caption that also describes another image of the batch
(common with partial captions: ``a red circle`` fits every image with only a red circle) is
removed from that image's row and from its column, instead of being pushed away as a negative.
``logit_scale`` starts at log(1 / 0.07) and is clamped to [0, log 100] after every step, as in
CLIP. Weight decay skips gains, biases, the class token and ``logit_scale`` (tensors of < 2 dims).

**Texts.** The text tower is causal and pools at the first end token, so tokens after it cannot
change the loss (nor get a gradient, as in CLIP's own 77-token training): texts are sorted by
length and encoded in chunks of 128, each cut after its longest text's end token (captions are
5 to 23 tokens), which gives the same embeddings (up to rounding) at about a fifth of the cost
of 77 positions. Images go through
:func:`~latentdiff.models.clip_model.image_preprocess` (CLIP's mean/std), as
:func:`~latentdiff.eval.metrics.clip_scores` feeds them, so the exported CLIP scores images too.

**Tokenizer.** Trained at the start of a run with :func:`train_clip_bpe` on the full captions of
``tokenizer_captions`` scenes (full captions use every word of the world), saved in
``out_dir/tokenizer/``; every world word must come out as one token. Its start/end/pad ids go into
the text config. A run folder already holding a different tokenizer is refused.

**Metric.** :func:`~latentdiff.eval.zero_shot.zero_shot_accuracy`: for held-out full captions,
an image is rendered from the caption and the caption is ranked among itself and 8 one-attribute variants
(:func:`~latentdiff.world.dataset.zero_shot_candidates`) by cosine similarity. It replaces the
sample grid: every ``sample_every`` steps ``samples/step_N.png`` (a bar chart) and ``.json`` are
written and a row is added to ``out_dir/zero_shot.csv``.

**Fine-tuning.** ``pretrained`` starts from an exported ``clip/`` folder (its tokenizer too);
with ``freeze_text_tower`` the text transformer is fixed and only the image tower, both
projections and the temperature learn; ``fresh_image_tower`` also replaces the image tower by a
new one of the ``vision_*`` sizes (smaller patches, say) before training. The UNet reads the text transformer's hidden states,
never the projection, so a UNet trained on this CLIP's text tower stays valid: the image side
(zero-shot ranking, CLIP score, FD features) can keep improving after the UNet is trained.

Run folder::

    out_dir/
      config.json  log.csv  checkpoint.pt  zero_shot.csv  samples/step_N.{png,json}
      tokenizer/      the BPE tokenizer (SD's tokenizer/ folder)
      text_encoder/   the text tower as an SD CLIPTextModel (config.json + model.safetensors)
      clip/           the whole CLIP: transformers CLIPModel layout + tokenizer files
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..checkpoints.diffusers_folder import save_component
from ..checkpoints.io import atomic_path
from ..models.clip import CLIPTextConfig
from ..checkpoints.clip_folder import load_clip_model, save_clip_model
from ..eval.zero_shot import _bar_chart, encode_text_by_length, world_pixels, zero_shot_accuracy
from ..models.clip_model import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionTransformer
from ..models.tokenizer import CLIPTokenizer, train_clip_bpe
from ..world.captions import caption, parse_caption, sample_scene
from ..world.dataset import WorldDataset
from ..world.negatives import ATTRIBUTE_KINDS, MIN_VARIANTS, describes, hard_negatives, world_words
from ..world.render import render
from .build import resolve_device, seeded
from .config import TrainConfig, TrainConfigError
from .distributed import (
    average_gradients, broadcast_parameters, gather_with_grad, join_world, training_device,
)
from .ema import EMA
from .losses import clip_loss
from .loop import TrainResult, TrainTask, run_training
from .optim import autocast, clipped_step, set_lr

MAX_LOGIT_SCALE = math.log(100.0)
LONGEST_CAPTION_TOKENS = 23  # 21 words ("a large purple triangle in the bottom right and ... background") + 2
_NEGATIVE_TAG = 0x4E4547  # "NEG": separates the hard-negative stream from the world's own draws
_TOKENIZER_TAG = 0x544F4B  # "TOK"


# ============================================================================= config
@dataclasses.dataclass
class CLIPTrainConfig(TrainConfig):
    """Contrastive CLIP training on the Shapes World (see the module docstring for the recipe)."""

    out_dir: str = "runs/clip"
    # fine-tune a CLIP folder (transformers layout with its tokenizer files, as this trainer exports it);
    # its sizes and tokenizer replace the tower and tokenizer settings below
    pretrained: str | None = None
    # keep the text tower fixed (projections, image tower and temperature still train): the text states a
    # UNet was trained on stay exactly the same, so the CLIP's image side can improve after the UNet exists
    freeze_text_tower: bool = False
    # with pretrained: replace its image tower (and visual projection) by a fresh one of the vision_*
    # sizes below, e.g. smaller patches; the text tower, its projection and the tokenizer are kept
    fresh_image_tower: bool = False
    world_length: int = 2**40  # stream of fresh scenes; a smaller value repeats them (epochs)
    # ---- text tower (SD's CLIPTextModel) ----
    text_hidden_size: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate_size: int = 512
    text_max_positions: int = 77  # the UNet reads (77, text_hidden_size) embeddings, as SD
    # ---- image tower (ViT) ----
    vision_image_size: int = 64
    vision_patch_size: int = 8
    vision_hidden_size: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate_size: int = 512
    projection_dim: int = 128
    hidden_act: str = "quick_gelu"
    # ---- tokenizer ----
    tokenizer_vocab_size: int = 1024  # upper bound: merges stop once every world word is one token (597 ids)
    tokenizer_captions: int = 20000  # full captions the BPE is trained on
    # ---- data and loss ----
    partial_captions: bool = True  # half full, half partial captions (as the UNet sees them)
    hard_negatives: int = 4  # one-attribute caption variants per image, 0..7
    mask_false_negatives: bool = True
    logit_scale_init: float = 2.6592  # log(1 / 0.07)
    # ---- optimisation (CLIP's AdamW settings) ----
    max_steps: int = 3000
    batch_size: int = 128
    lr: float = 5e-4
    warmup_steps: int = 100
    decay_steps: int = 3000  # keep it at max_steps: annealing is what lifts shape and position (see optim)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    weight_decay: float = 0.1
    # ---- evaluation (replaces the sample grids) ----
    zero_shot_n: int = 400  # held-out captions (first n: balanced one/two objects), 1..400
    zero_shot_seed: int = 0
    sample_every: int = 250
    checkpoint_every: int = 250

    def validate(self) -> None:
        super().validate()
        if self.data != "world":
            raise TrainConfigError(f"CLIP training needs the built-in world (data='world'), got {self.data!r}")
        for name in ("text_hidden_size", "text_layers", "text_heads", "text_intermediate_size", "text_max_positions",
                     "vision_image_size", "vision_patch_size", "vision_hidden_size", "vision_layers",
                     "vision_heads", "vision_intermediate_size", "projection_dim", "tokenizer_captions"):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.text_max_positions < LONGEST_CAPTION_TOKENS:
            raise TrainConfigError(
                f"text_max_positions must be >= {LONGEST_CAPTION_TOKENS} (the longest caption: 21 words, start and "
                f"end tokens), got {self.text_max_positions}"
            )
        if not 0 <= self.hard_negatives <= MIN_VARIANTS:
            raise TrainConfigError(
                f"hard_negatives must be in 0..{MIN_VARIANTS} (the fewest variants a caption has), "
                f"got {self.hard_negatives}"
            )
        if self.batch_size < 2:
            raise TrainConfigError(f"contrastive training needs batch_size >= 2, got {self.batch_size}")
        if self.fresh_image_tower and not self.pretrained:
            raise TrainConfigError("fresh_image_tower replaces the image tower of a pretrained CLIP: set pretrained")
        if not 1 <= self.zero_shot_n <= 400:
            raise TrainConfigError(f"zero_shot_n must be in 1..400 (held-out prompts), got {self.zero_shot_n}")
        if not 0.0 <= self.logit_scale_init <= MAX_LOGIT_SCALE:
            raise TrainConfigError(f"logit_scale_init must be in [0, log 100], got {self.logit_scale_init}")
        try:
            self.clip_config(vocab_size=600, bos=598, eos=599, pad=599).validate()
        except ValueError as err:
            raise TrainConfigError(str(err)) from None

    def clip_config(self, vocab_size: int, bos: int, eos: int, pad: int) -> CLIPConfig:
        """The :class:`CLIPConfig` of these sizes for a tokenizer with these ids."""
        text = CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=self.text_hidden_size, intermediate_size=self.text_intermediate_size,
            num_hidden_layers=self.text_layers, num_attention_heads=self.text_heads,
            max_position_embeddings=self.text_max_positions, hidden_act=self.hidden_act,
            bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, projection_dim=self.projection_dim,
        )
        return CLIPConfig(text_config=text, vision_config=self.vision_config(self.projection_dim),
                          projection_dim=self.projection_dim, logit_scale_init_value=self.logit_scale_init)

    def vision_config(self, projection_dim: int) -> CLIPVisionConfig:
        """The image tower of these sizes."""
        return CLIPVisionConfig(
            hidden_size=self.vision_hidden_size, intermediate_size=self.vision_intermediate_size,
            num_hidden_layers=self.vision_layers, num_attention_heads=self.vision_heads,
            image_size=self.vision_image_size, patch_size=self.vision_patch_size, hidden_act=self.hidden_act,
            projection_dim=projection_dim,
        )


def replace_image_tower(model: CLIPModel, vision: CLIPVisionConfig) -> None:
    """Give ``model`` a freshly initialised image tower and visual projection of config ``vision``."""
    vision.validate()
    model.config = dataclasses.replace(model.config, vision_config=vision)
    model.vision_model = CLIPVisionTransformer(vision)
    model.visual_projection = torch.nn.Linear(vision.hidden_size, model.config.projection_dim, bias=False)


# ============================================================================= tokenizer
def train_world_tokenizer(config: CLIPTrainConfig) -> CLIPTokenizer:
    """The run's BPE: trained on ``tokenizer_captions`` full captions; every world word is one token."""
    rng = np.random.default_rng([config.world_seed, _TOKENIZER_TAG])
    texts = [caption(sample_scene(rng)) for _ in range(config.tokenizer_captions)]
    bpe = train_clip_bpe(texts, config.tokenizer_vocab_size)
    tokenizer = CLIPTokenizer(bpe.vocab, bpe.merges, model_max_length=config.text_max_positions)
    split = [w for w in world_words() if len(tokenizer.encode(w)) != 1]
    if split:
        raise TrainConfigError(
            f"tokenizer_vocab_size={config.tokenizer_vocab_size} (or tokenizer_captions={config.tokenizer_captions}) "
            f"leaves world word(s) {', '.join(split)} in several tokens; raise it (about 600 suffices)"
        )
    return tokenizer


def tokenize_batch(tokenizer: CLIPTokenizer, texts: Sequence[str]) -> Tensor:
    """Ids (N, L) cut after the longest text's end token (the causal text tower ignores what follows)."""
    ids = tokenizer(list(texts))  # (N, model_max_length)
    ends = (ids == tokenizer.eos_token_id).int().argmax(dim=1)
    return ids[:, : int(ends.max()) + 1]


# ============================================================================= data order
class StreamOrder:
    """Positions in the endless stream of training examples; the state is one integer."""

    def __init__(self, length: int) -> None:
        self.length = int(length)
        self.position = 0

    def next(self, count: int) -> list[int]:
        out = list(range(self.position, self.position + count))
        self.position += count
        return out

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "length": self.length}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["length"]) != self.length:
            raise TrainConfigError(
                f"the checkpoint streamed a world of {state['length']} items, this run {self.length}"
            )
        self.position = int(state["position"])


# ============================================================================= trainer
class CLIPTrainer(TrainTask):
    """Contrastive CLIP training as a :class:`~latentdiff.train.loop.TrainTask`."""

    kind = "clip"
    loss_names = ("loss", "i2t", "t2i", "acc", "hard_acc", "logit_scale", "grad_norm")

    def __init__(self, config: CLIPTrainConfig) -> None:
        config.validate()
        self.config = cfg = config
        self.ranks = join_world(resolve_device(cfg.device))
        self.device = resolve_device(training_device(cfg.device, self.ranks))
        if cfg.pretrained:
            model = load_clip_model(cfg.pretrained, dtype=torch.float32)  # names a missing or wrong folder
            self.tokenizer = CLIPTokenizer.from_folder(cfg.pretrained)
            if cfg.fresh_image_tower:
                with seeded(cfg.seed):
                    replace_image_tower(model, cfg.vision_config(model.config.projection_dim))
        else:
            self.tokenizer = train_world_tokenizer(cfg)
            tok = self.tokenizer
            clip_config = cfg.clip_config(tok.vocab_size, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
            with seeded(cfg.seed):
                model = CLIPModel(clip_config)
        self._store_tokenizer(Path(cfg.out_dir) / "tokenizer")
        self.model = model.to(self.device, torch.float32).train().requires_grad_(True)
        if cfg.freeze_text_tower:
            self.model.text_model.requires_grad_(False)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in trainable if p.ndim >= 2]
        no_decay = [p for p in trainable if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), foreach=False,
        )
        self.modules = {"clip": self.model}
        self.optimizers = {"clip": self.optimizer}
        self.emas = {"clip": EMA(self.model, cfg.ema_decay, cfg.ema_warmup, cfg.ema_power)} if cfg.ema_decay > 0 else {}
        self.generators: dict[str, torch.Generator] = {}  # every draw is a pure function of the stream position
        self.world = WorldDataset(cfg.world_seed, cfg.world_length, partial_captions=cfg.partial_captions)
        self.order = StreamOrder(cfg.world_length)  # type: ignore[assignment]
        broadcast_parameters(self.modules, self.ranks)

    def _store_tokenizer(self, folder: Path) -> None:
        if (folder / "vocab.json").is_file():
            stored = CLIPTokenizer.from_folder(folder)
            if stored.vocab != self.tokenizer.vocab or stored.merges != self.tokenizer.merges:
                raise TrainConfigError(
                    f"{folder} holds a tokenizer other than this config trains: use another out_dir"
                )
            return
        self.tokenizer.save(folder)

    @property
    def export_name(self) -> str:
        return "clip"

    # ------------------------------------------------------------------ data
    def batch(self, positions: Sequence[int]) -> tuple[Tensor, list[str], list[list[str]], Tensor]:
        """Pixels (B, 3, S, S), captions, hard negatives (B lists of K) and the false-negative mask (B, B)."""
        cfg = self.config
        images, texts, negatives, specs, scenes = [], [], [], [], []
        for p in positions:
            scene, text = self.world.scene_and_caption(p % cfg.world_length)
            spec = parse_caption(text)
            rng = np.random.default_rng([cfg.world_seed, p, _NEGATIVE_TAG])
            images.append(render(scene))
            texts.append(text)
            negatives.append(hard_negatives(spec, scene, cfg.hard_negatives, rng))
            specs.append(spec)
            scenes.append(scene)
        b = len(positions)
        mask = torch.zeros(b, b, dtype=torch.bool)
        if cfg.mask_false_negatives:
            for i, j in itertools.product(range(b), range(b)):
                if i != j and describes(specs[j], scenes[i]):
                    mask[i, j] = True
        return world_pixels(np.stack(images), self.model.config.vision_config.image_size), texts, negatives, mask

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> dict[str, float]:
        cfg, model = self.config, self.model
        lr = cfg.lr_at(step)
        set_lr(self.optimizer, lr)
        totals = dict.fromkeys(("loss", "i2t", "t2i", "acc", "hard_acc"), 0.0)
        for micro in self.micro_batches(step):
            # the global batch's false-negative mask; this rank encodes its slice, and the loss is
            # taken over every rank's embeddings (gathered with their gradients)
            _, _, _, mask = self.batch(micro.items) if self.ranks.distributed else (None, None, None, None)
            pixels, texts, negatives, own_mask = self.batch(micro.mine)
            mask = own_mask if mask is None else mask
            ids = tokenize_batch(self.tokenizer, texts + [t for row in negatives for t in row]).to(self.device)
            b, k = len(texts), cfg.hard_negatives
            with autocast(self.device, cfg.bf16):
                image_emb = model.encode_image(pixels.to(self.device))
                text_emb = encode_text_by_length(model, ids)
            hard = text_emb[b:].reshape(b, k, -1) if k else None
            image_emb, captions_emb = gather_with_grad(image_emb, self.ranks), gather_with_grad(text_emb[:b], self.ranks)
            hard = gather_with_grad(hard, self.ranks) if hard is not None else None
            loss, parts = clip_loss(image_emb, captions_emb, model.logit_scale, hard, mask.to(self.device))
            (loss / cfg.grad_accum).backward()
            totals["loss"] += loss.item() / cfg.grad_accum
            for key, value in parts.items():
                totals[key] += value.item() / cfg.grad_accum
        average_gradients(model.parameters(), self.ranks)
        grad_norm = float(clipped_step(self.optimizer, cfg.grad_clip))
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        for ema in self.emas.values():
            ema.update(model)
        return {**totals, "logit_scale": float(model.logit_scale.detach().exp()), "grad_norm": grad_norm, "lr": lr}

    # ------------------------------------------------------------------ evaluation and export
    def write_samples(self, step: int, path: Path) -> None:
        """Zero-shot accuracy instead of a grid: ``path`` (bar chart PNG), ``path.json``, ``zero_shot.csv``."""
        cfg = self.config
        result = zero_shot_accuracy(self.inference_model("clip"), self.tokenizer, cfg.zero_shot_n, cfg.zero_shot_seed)
        result = {"step": step, **result}
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        bars = {"top-1 (all)": result["accuracy"], "top-1 1 object": result["accuracy_1obj"],
                "top-1 2 objects": result["accuracy_2obj"],
                **{f"vs {kind}": v for kind, v in result["pairwise"].items()}}
        _bar_chart(bars, f"zero-shot, 1 of 9, n={result['n']}, step {step}", path)
        self._append_zero_shot(step, result)

    def _append_zero_shot(self, step: int, result: dict[str, Any]) -> None:
        """One row per evaluation; rows at or after ``step`` (from before a resume) are replaced."""
        file = Path(self.config.out_dir) / "zero_shot.csv"
        columns = ["step", "accuracy", "accuracy_1obj", "accuracy_2obj", *(f"vs_{k}" for k in ATTRIBUTE_KINDS[:5])]
        rows: list[dict[str, str]] = []
        if file.is_file():
            with file.open(newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) < step]
        row = {"step": step, **{k: f"{result[k]:.4f}" for k in ("accuracy", "accuracy_1obj", "accuracy_2obj")},
               **{f"vs_{k}": f"{v:.4f}" for k, v in result["pairwise"].items()}}
        with atomic_path(file) as tmp:
            with tmp.open("w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows([*rows, row])

    def export(self, folder: Path) -> Path:
        """``folder``: the whole CLIP (transformers layout) + tokenizer files; beside it, SD's
        ``text_encoder/`` and ``tokenizer/`` (EMA weights when EMA is on)."""
        model = self.inference_model("clip")
        save_clip_model(model, folder)
        self.tokenizer.save(folder)
        save_component(model.text_encoder(), folder.parent / "text_encoder", "text_encoder")
        self.tokenizer.save(folder.parent / "tokenizer")
        return folder


def train_clip(config: CLIPTrainConfig, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train the Shapes World CLIP; ``result.exported`` is the ``clip/`` folder (see the module docstring)."""
    return run_training(CLIPTrainer(config), resume=resume, progress=progress)
