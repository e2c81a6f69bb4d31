"""``latentdiff eval``'s scorers: the CLIP model (image features and CLIP scores), the feature extractor
for the Frechet distance, and the Shapes World judge."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import BadArgument
from .config import FeatureSpec, clip_display_name
from .reference import files_identity


class ClipScorer:
    """A CLIP model with its tokenizer: image features (for FD) and CLIP scores."""

    def __init__(self, folder: Path, fallback_tokenizer: Any, device: torch.device | str) -> None:
        from ..checkpoints.clip_folder import load_clip_model
        from ..models.tokenizer import CLIPTokenizer

        self.folder = folder
        self.model = load_clip_model(folder, device=device, dtype=torch.float32).eval()
        if any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json", "merges.txt")):
            self.tokenizer = CLIPTokenizer.from_folder(folder)
        elif fallback_tokenizer is not None:
            self.tokenizer = fallback_tokenizer
        else:
            raise BadArgument(f"{folder} has no tokenizer files and no other tokenizer is at hand")
        text = self.model.config.text_config
        if self.tokenizer.vocab_size > text.vocab_size:
            raise BadArgument(f"the tokenizer has {self.tokenizer.vocab_size} tokens but the CLIP model at {folder} "
                             f"only {text.vocab_size}: they do not belong together")
        self.max_length = min(self.tokenizer.model_max_length, text.max_position_embeddings)
        self.name = clip_display_name(folder)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts, max_length=self.max_length)

    @torch.no_grad()
    def image_features(self, images: Sequence[Any], batch_size: int = 64) -> np.ndarray:
        """Image embeddings (N, P) float64: ``encode_image`` (projected, not normalised)."""
        from ..models.clip_model import image_preprocess

        param = next(self.model.parameters())
        size = self.model.config.vision_config.image_size
        out = []
        for start in range(0, len(images), batch_size):
            pixels = image_preprocess(list(images[start: start + batch_size]), size)
            out.append(self.model.encode_image(pixels.to(param.device, param.dtype)).double().cpu().numpy())
        return np.concatenate(out)

    def scores(self, images: Sequence[Any], texts: list[str]) -> np.ndarray:
        """Unfloored ``100 cos`` per image-text pair (N,)."""
        from .metrics import clip_scores

        return clip_scores(list(images), texts, self.model, self.tokenize).double().numpy()


@dataclass
class FeatureExtractor:
    """Images -> feature rows (N, D) for the Frechet distance, with the metric's name and cache identity."""

    name: str  # "clip-shapes-v2", "inception-v3-fid"
    metric: str  # "FD (clip-shapes-v2)", "FID"
    dim: int
    identity: dict[str, Any]
    fn: Callable[[Sequence[Any]], np.ndarray]

    def __call__(self, images: Sequence[Any]) -> np.ndarray:
        return np.asarray(self.fn(images), dtype=np.float64)


def make_feature_extractor(spec: FeatureSpec, clip: ClipScorer, device: torch.device | str) -> FeatureExtractor:
    """The ``--features`` extractor: the CLIP model's image embeddings, or the FID InceptionV3 from its weight file."""
    if spec.kind == "clip":
        return FeatureExtractor(clip.name, f"FD ({clip.name})", clip.model.config.projection_dim,
                                {"kind": "clip-image-embeds", "files": files_identity(clip.folder)},
                                clip.image_features)
    from .inception import FEATURE_DIM, inception_features, load_fid_inception

    model = load_fid_inception(spec.path, device=device).eval()
    return FeatureExtractor("inception-v3-fid", "FID", FEATURE_DIM,
                            {"kind": "fid-inception-pool3", "files": files_identity(Path(spec.path))},
                            lambda images: inception_features(list(images), model))


def judge_image(image: Image.Image, prompt: str) -> dict[str, bool | None]:
    """The world judge's verdicts (``correct`` + each attribute) on an image, resized to 64 x 64 when needed."""
    from ..world import ATTRIBUTES, CANVAS, judge

    if image.size != (CANVAS, CANVAS):
        image = image.convert("RGB").resize((CANVAS, CANVAS), resample=Image.BILINEAR)
    j = judge(np.asarray(image.convert("RGB")), prompt)
    return {"correct": bool(j.correct), **{a: getattr(j, a) for a in ATTRIBUTES}}


def world_accuracy(verdicts: list[dict[str, Any]], prompts_of_images: list[str]) -> tuple[dict, dict]:
    """(accuracy report over all images, reports for 1-object and 2-object prompts)."""
    from ..world import accuracy_report, parse_caption

    judged = [SimpleNamespace(**v) for v in verdicts]
    by_count: dict[str, list] = {}
    for j, prompt in zip(judged, prompts_of_images):
        n = len(parse_caption(prompt).objects)
        by_count.setdefault(f"{n} object{'s' if n > 1 else ''}", []).append(j)
    return accuracy_report(judged), {k: accuracy_report(v) for k, v in sorted(by_count.items())}
