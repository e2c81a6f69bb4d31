"""``latentdiff eval``: sweep guidance scales and samplers, measure realism and faithfulness.

    latentdiff eval --prompts builtin --guidance 1,3,7.5 --samplers ddim:20,euler_a:20 \\
                    --images-per-prompt 4 --n-prompts 100 --out runs/eval

For every setting (guidance scale x ``sampler:steps``) the model draws ``images-per-prompt``
images of each prompt, and the run measures:

* **FD** (Frechet distance) between the generated images' features and reference
  statistics of real images. Features are the image embeddings (``encode_image``:
  projected, not normalised, as clean-fid's CLIP features) of a CLIP model by default,
  reported as ``FD (clip-<name>)``; ``--features inception:PATH`` uses the FID
  InceptionV3 (pytorch-fid's weight file) and reports ``FID``. FD values from different
  feature extractors are not comparable.
* **CLIP score**: ``mean(max(100 cos(image, prompt), 0))`` with the CLIP model.
* For the built-in Shapes World prompts, the world's **judge**: whole-caption and
  per-attribute accuracy (also split by one- and two-object prompts). Generated images
  that are not 64 x 64 are resized (bilinear) for the judge.

The CLIP model is ``--clip DIR`` (a transformers ``CLIPModel`` folder), else the model
folder's ``clip/`` subfolder (the built-in model ships one). Its tokenizer is read from
the CLIP folder when it has tokenizer files, else the pipeline's own is used.

Reference statistics (computed once, cached as ``.npz`` in ``--cache-dir``, keyed by the
reference images and the feature extractor's files):

* ``--prompts builtin`` (the Shapes World's held-out prompts): rendered world scenes
  that the prompts describe (``scene_from_caption``), ``--reference-per-prompt`` per
  prompt (default: as many as generated), at the world's 64 x 64; the feature extractor
  resizes both sets to its input size.
* a text file of prompts (one per line): ``--reference`` must name a folder of real
  images or a statistics ``.npz`` (``mu``/``sigma``, as pytorch-fid writes). A
  ``--reference`` also replaces the built-in reference.

Seeds: image ``g`` of a setting (prompt ``g // N``, copy ``g % N``) uses ``seed + g`` in
every setting, so settings are compared on the same starting noise. Under ``torchrun``
the images are shared among ranks (see :mod:`latentdiff.eval.distributed`).

Outputs in ``--out``: ``metrics.json``, ``report.md``, ``grid_<setting>.png`` and
``fd_vs_clip.png`` (see :mod:`latentdiff.eval.report`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import BadArgument
from .distributed import DistInfo, ProcessGroup, batches, device_for_rank, dist_info, merge_shards, shard

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REFERENCE_SEED = 20240917  # the built-in reference scenes' random stream (fixed: part of the cache key)
CACHE_VERSION = 1


# ---------------------------------------------------------------- parsing the settings

@dataclass(frozen=True)
class Setting:
    """One point of the sweep: a sampler with its step count, and a guidance scale."""

    sampler: str  # sampler id
    steps: int
    guidance: float

    @property
    def sampler_label(self) -> str:
        """``ddim:20``: the series this point belongs to in the plot."""
        return f"{self.sampler}:{self.steps}"

    @property
    def key(self) -> str:
        """File-name-safe name, e.g. ``ddim20_w7.5``."""
        return f"{self.sampler}{self.steps}_w{self.guidance:g}"


def parse_guidance(text: str) -> list[float]:
    """``"1,3,7.5"`` -> [1.0, 3.0, 7.5] (finite, non-negative, no repeats)."""
    values = []
    for item in str(text).split(","):
        item = item.strip()
        try:
            value = float(item)
        except ValueError:
            raise BadArgument(f"--guidance: {item!r} is not a number (use e.g. 1,3,7.5)") from None
        if not math.isfinite(value) or value < 0:
            raise BadArgument(f"--guidance: {item!r} must be a finite non-negative number")
        if value in values:
            raise BadArgument(f"--guidance: {item} is given twice")
        values.append(value)
    return values


def parse_samplers(text: str, default_steps: int = 20) -> list[tuple[str, int]]:
    """``"ddim:20,Euler a:30"`` -> [("ddim", 20), ("euler_a", 30)]; steps default to ``default_steps``."""
    from ..samplers import get_sampler

    out: list[tuple[str, int]] = []
    for item in str(text).split(","):
        item = item.strip()
        name, sep, steps_text = item.rpartition(":")
        if not sep:
            name, steps_text = item, str(default_steps)
        try:
            steps = int(steps_text)
        except ValueError:
            raise BadArgument(f"--samplers: {item!r} is not SAMPLER:STEPS (e.g. ddim:20)") from None
        if steps < 1:
            raise BadArgument(f"--samplers: {item!r} needs at least 1 step")
        spec = get_sampler(name)
        if (spec.id, steps) in out:
            raise BadArgument(f"--samplers: {spec.id}:{steps} is given twice")
        out.append((spec.id, steps))
    return out


@dataclass(frozen=True)
class FeatureSpec:
    kind: str  # "clip" or "inception"
    path: str | None = None


def parse_features(text: str) -> FeatureSpec:
    """``clip`` (the CLIP model's image tower) or ``inception:PATH`` (the FID InceptionV3 weight file)."""
    text = str(text).strip()
    if text == "clip":
        return FeatureSpec("clip")
    kind, sep, path = text.partition(":")
    if kind == "inception":
        if not sep or not path:
            raise BadArgument("--features inception needs the weight file: inception:PATH "
                             "(pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")
        if not Path(path).is_file():
            raise BadArgument(f"--features: no such Inception weight file: {path}")
        return FeatureSpec("inception", path)
    raise BadArgument(f"unknown feature extractor {text!r}: use clip or inception:PATH")


def default_cache_dir() -> Path:
    """``$LATENTDIFF_CACHE``, else ``$XDG_CACHE_HOME/latentdiff``, else ``~/.cache/latentdiff``; then ``reference/``."""
    if os.environ.get("LATENTDIFF_CACHE"):
        return Path(os.environ["LATENTDIFF_CACHE"]) / "reference"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "latentdiff" / "reference"


@dataclass
class EvalConfig:
    """Everything ``latentdiff eval`` takes (the CLI flags, one to one)."""

    out: str
    prompts: str = "builtin"
    guidance: Sequence[float] = (1.0, 3.0, 7.5)
    samplers: Sequence[tuple[str, int]] = (("ddim", 20),)
    images_per_prompt: int = 1
    n_prompts: int | None = None
    model: str | None = None
    reference: str | None = None
    reference_per_prompt: int | None = None
    features: str = "clip"
    clip: str | None = None
    seed: int = 0
    negative: str = ""
    width: int | None = None
    height: int | None = None
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    cache_dir: str | None = None
    grid_prompts: int = 8
    grid_columns: int = 8
    progress: bool = True

    @property
    def settings(self) -> list[Setting]:
        """Samplers outermost, guidance innermost (a plot line is one sampler's sweep)."""
        return [Setting(s, n, float(w)) for s, n in self.samplers for w in self.guidance]


# ---------------------------------------------------------------- inputs

def read_prompts(spec: str, n: int | None) -> tuple[list[str], bool]:
    """(prompts, is_builtin): ``builtin`` = the Shapes World's held-out prompts, else a text file (one per line)."""
    if spec == "builtin":
        from ..world import held_out_prompts

        total = len(held_out_prompts())
        if n is not None and not 1 <= n <= total:
            raise BadArgument(f"--n-prompts must be in 1..{total} for the built-in prompts, got {n}")
        return held_out_prompts(n), True
    path = Path(spec)
    if not path.is_file():
        raise BadArgument(f"prompts file {spec} does not exist (or use --prompts builtin)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise BadArgument(f"cannot read prompts file {spec}: {err}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise BadArgument(f"prompts file {spec} holds no prompts")
    if n is not None:
        if n < 1:
            raise BadArgument(f"--n-prompts must be at least 1, got {n}")
        prompts = prompts[:n]
    return prompts, False


def resolve_clip_folder(clip: str | None, model: str | None) -> Path:
    """``--clip``, else the model folder's (or the built-in model's) ``clip/`` subfolder."""
    from ..loading import BUILTIN_MODEL

    if clip is not None:
        folder = Path(clip)
        if not (folder / "config.json").is_file():
            raise BadArgument(f"--clip {clip} is not a CLIP model folder (no config.json)")
        return folder
    base = Path(model) if model is not None else BUILTIN_MODEL
    if (base / "clip" / "config.json").is_file():
        return base / "clip"
    where = "the built-in model" if model is None else f"{model}"
    raise BadArgument(f"{where} has no clip/ folder: CLIP score (and --features clip) need --clip DIR")


def clip_display_name(folder: Path) -> str:
    """``clip-<name>``: the model folder's name for a ``clip/`` subfolder, else the folder's own."""
    folder = folder.resolve()
    return f"clip-{folder.parent.name if folder.name == 'clip' else folder.name}"


def check_inputs(config: EvalConfig) -> tuple[list[str], bool, FeatureSpec, Path]:
    """Every check that needs no network: fail with one line before anything loads."""
    prompts, builtin = read_prompts(config.prompts, config.n_prompts)
    features = parse_features(config.features)
    if not config.guidance:
        raise BadArgument("--guidance needs at least one value")
    if not config.samplers:
        raise BadArgument("--samplers needs at least one SAMPLER:STEPS")
    if config.images_per_prompt < 1:
        raise BadArgument(f"--images-per-prompt must be at least 1, got {config.images_per_prompt}")
    if len(prompts) * config.images_per_prompt < 2:
        raise BadArgument("FD needs at least 2 images per setting: raise --n-prompts or --images-per-prompt")
    if config.batch_size < 1:
        raise BadArgument(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.reference_per_prompt is not None and config.reference_per_prompt < 1:
        raise BadArgument(f"--reference-per-prompt must be at least 1, got {config.reference_per_prompt}")
    if config.reference is not None:
        ref = Path(config.reference)
        if not ref.exists():
            raise BadArgument(f"reference {config.reference} does not exist")
        if ref.is_file() and ref.suffix.lower() != ".npz":
            raise BadArgument(f"--reference {config.reference} must be a folder of images or a statistics .npz")
    elif not builtin:
        raise BadArgument("a prompts file needs --reference: a folder of real images or a statistics .npz")
    clip_folder = resolve_clip_folder(config.clip, config.model)
    return prompts, builtin, features, clip_folder


# ---------------------------------------------------------------- models

def _files_identity(path: Path) -> list[tuple[str, int, int]]:
    """(relative name, size, mtime_ns) of a file or of every file under a folder: changes when the weights do."""
    path = path.resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [(str(p.relative_to(path.parent if path.is_file() else path)), p.stat().st_size, p.stat().st_mtime_ns)
            for p in files]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


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
    if spec.kind == "clip":
        return FeatureExtractor(clip.name, f"FD ({clip.name})", clip.model.config.projection_dim,
                                {"kind": "clip-image-embeds", "files": _files_identity(clip.folder)},
                                clip.image_features)
    from .inception import FEATURE_DIM, inception_features, load_fid_inception

    model = load_fid_inception(spec.path, device=device).eval()
    return FeatureExtractor("inception-v3-fid", "FID", FEATURE_DIM,
                            {"kind": "fid-inception-pool3", "files": _files_identity(Path(spec.path))},
                            lambda images: inception_features(list(images), model))


# ---------------------------------------------------------------- reference statistics

@dataclass
class Reference:
    mu: np.ndarray
    sigma: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def _cached(cache_dir: Path, key: dict[str, Any], describe: dict[str, Any],
            compute: Callable[[], tuple[np.ndarray, np.ndarray, int]]) -> Reference:
    """Statistics from ``cache_dir/ref-<hash of key>.npz`` when present, else computed and saved there."""
    from .metrics import load_statistics, save_statistics

    digest = _digest({"version": CACHE_VERSION, **key})
    stats_path = cache_dir / f"ref-{digest}.npz"
    meta_path = stats_path.with_suffix(".json")
    if stats_path.is_file():
        mu, sigma = load_statistics(stats_path)
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        return Reference(mu, sigma, {**describe, "n_images": meta.get("n_images"), "stats": str(stats_path),
                                     "cached": True})
    mu, sigma, n = compute()
    save_statistics(stats_path, mu, sigma)
    from ..checkpoints.io import atomic_path

    with atomic_path(meta_path) as tmp:
        tmp.write_text(json.dumps({**describe, "n_images": n, "key": key}, indent=2))
    return Reference(mu, sigma, {**describe, "n_images": n, "stats": str(stats_path), "cached": False})


def _statistics_of(images_iter, extractor: FeatureExtractor, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, int]:
    from .metrics import RunningStatistics

    running: RunningStatistics | None = None
    chunk: list[Any] = []

    def flush() -> None:
        nonlocal running
        feats = extractor(chunk)
        if running is None:
            running = RunningStatistics(feats.shape[1])
        running.update(feats)
        chunk.clear()

    for image in images_iter:
        chunk.append(image)
        if len(chunk) == batch_size:
            flush()
    if chunk:
        flush()
    if running is None or running.count < 2:
        raise BadArgument("the reference needs at least 2 images")
    mu, sigma = running.statistics()
    return mu, sigma, running.count


def builtin_reference_images(prompts: Sequence[str], per_prompt: int):
    """Rendered Shapes World scenes that the prompts describe: ``per_prompt`` per prompt, deterministic."""
    from ..world import render, scene_from_caption

    for p, prompt in enumerate(prompts):
        for r in range(per_prompt):
            rng = np.random.default_rng([REFERENCE_SEED, p, r])
            yield render(scene_from_caption(prompt, rng))


def folder_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _open_rgb(path: Path) -> Image.Image:
    from PIL import UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise BadArgument(f"reference image {path} is not readable: {err}") from None


def reference_statistics(config: EvalConfig, prompts: list[str], builtin: bool,
                         extractor: FeatureExtractor) -> Reference:
    """The reference's (mu, sigma): a given ``.npz``, or a folder / the built-in world's features, cached."""
    from .metrics import load_statistics

    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    if config.reference is not None:
        ref = Path(config.reference)
        if ref.is_file():
            mu, sigma = load_statistics(ref)
            return Reference(mu, sigma, {"source": f"statistics file {ref}", "n_images": None, "stats": str(ref),
                                         "cached": None})
        files = folder_images(ref)
        if len(files) < 2:
            raise BadArgument(f"reference folder {ref} holds {len(files)} images; FD needs at least 2")
        key = {"source": "folder", "files": _digest(_files_identity(ref)), "folder": str(ref.resolve()),
               "features": extractor.identity}
        return _cached(cache_dir, key, {"source": f"images in {ref}"},
                       lambda: _statistics_of((_open_rgb(p) for p in files), extractor))
    per_prompt = config.reference_per_prompt or config.images_per_prompt
    key = {"source": "shapes-world", "prompts": _digest(prompts), "per_prompt": per_prompt, "seed": REFERENCE_SEED,
           "features": extractor.identity}
    describe = {"source": f"Shapes World renders of the {len(prompts)} held-out prompts' scenes, {per_prompt} per prompt"}
    return _cached(cache_dir, key, describe,
                   lambda: _statistics_of(builtin_reference_images(prompts, per_prompt), extractor))


# ---------------------------------------------------------------- generation

def txt2img_seeded(pipe, prompts: list[str], seeds: list[int], *, negative_prompt: str = "", width: int | None = None,
                   height: int | None = None, steps: int = 20, guidance_scale: float = 7.5,
                   sampler: str = "ddim") -> list[Image.Image]:
    """``pipe.txt2img`` with one seed per image, so image ``i`` is exactly the image
    ``pipe.txt2img(prompts[i], seed=seeds[i])`` gives."""
    if len(prompts) != len(seeds):
        raise BadArgument(f"got {len(prompts)} prompts and {len(seeds)} seeds")
    return pipe.txt2img(prompts, negative_prompt=negative_prompt, width=width, height=height, steps=steps,
                        guidance_scale=guidance_scale, sampler=sampler, seed=[int(s) for s in seeds])


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


@dataclass
class ImageRecord:
    """What rank 0 needs of one generated image."""

    features: np.ndarray
    clip: float  # unfloored 100 cos
    verdict: dict[str, Any] | None
    image: np.ndarray | None  # kept only for the grid


# ---------------------------------------------------------------- the run

def run_eval(config: EvalConfig, info: DistInfo | None = None) -> dict[str, Any] | None:
    """Run the sweep; rank 0 writes the outputs and returns the metrics (other ranks return None)."""
    import latentdiff

    from . import report
    from .metrics import feature_statistics, frechet_distance_from_stats

    prompts, builtin, feature_spec, clip_folder = check_inputs(config)
    info = info or dist_info()
    out_dir = Path(config.out)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, config.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise BadArgument(f"unknown dtype {config.dtype!r}")
    device = device_for_rank(config.device, info)
    settings = config.settings
    n_per_prompt = config.images_per_prompt
    n_images = len(prompts) * n_per_prompt

    with ProcessGroup(info) as group:
        pipe = latentdiff.load(config.model, device=device, dtype=dtype)
        width, height = config.width or pipe.native_size, config.height or pipe.native_size
        for s in settings:  # sizes, steps and samplers checked before any work
            pipe.settings(["x"], negative_prompt=config.negative, width=width, height=height, steps=s.steps,
                          guidance_scale=s.guidance, sampler=s.sampler, seed=config.seed)
        clip = ClipScorer(clip_folder, pipe.tokenizer, device)
        extractor = make_feature_extractor(feature_spec, clip, device)

        reference = reference_statistics(config, prompts, builtin, extractor) if info.is_main else None
        if reference is not None and reference.mu.shape[0] != extractor.dim:
            raise BadArgument(f"reference statistics have dimension {reference.mu.shape[0]} but {extractor.name} "
                             f"features have {extractor.dim}: were they computed with another feature extractor?")

        mine = shard(n_images, info.rank, info.world_size)
        grid_rows = min(config.grid_prompts, len(prompts))
        grid_cols = min(config.grid_columns, n_per_prompt)
        from tqdm import tqdm

        desc = f"eval (rank 0 of {info.world_size})" if info.distributed else "eval"
        bar = tqdm(total=len(mine) * len(settings), desc=desc, unit="image", disable=not (config.progress and info.is_main),
                   dynamic_ncols=True)
        results = []
        try:
            for s in settings:
                bar.set_postfix_str(s.key)
                start = time.perf_counter()
                records: list[tuple[int, ImageRecord]] = []
                for chunk in batches(mine, config.batch_size):
                    chunk_prompts = [prompts[g // n_per_prompt] for g in chunk]
                    images = txt2img_seeded(pipe, chunk_prompts, [config.seed + g for g in chunk],
                                            negative_prompt=config.negative, width=width, height=height,
                                            steps=s.steps, guidance_scale=s.guidance, sampler=s.sampler)
                    feats = extractor(images)
                    sims = clip.scores(images, chunk_prompts)
                    for k, g in enumerate(chunk):
                        keep = g // n_per_prompt < grid_rows and g % n_per_prompt < grid_cols
                        verdict = judge_image(images[k], chunk_prompts[k]) if builtin else None
                        records.append((g, ImageRecord(feats[k].astype(np.float32), float(sims[k]), verdict,
                                                       np.asarray(images[k]) if keep else None)))
                    bar.update(len(chunk))
                parts = group.gather_to_main(records)
                if not info.is_main:
                    continue
                merged = merge_shards(parts, n_images)
                seconds = time.perf_counter() - start
                mu, sigma = feature_statistics(np.stack([r.features for r in merged]).astype(np.float64))
                fd = frechet_distance_from_stats(mu, sigma, reference.mu, reference.sigma)
                sims_all = np.array([r.clip for r in merged])
                result: dict[str, Any] = {
                    "setting": s.key, "sampler": s.sampler, "steps": s.steps, "guidance": s.guidance,
                    "n_images": n_images, "fd": fd, "clip_score": float(np.maximum(sims_all, 0).mean()),
                    "clip_score_std": float(np.maximum(sims_all, 0).std()),
                    "seconds": seconds, "images_per_second": n_images / seconds if seconds > 0 else None,
                }
                if builtin:
                    prompts_of = [prompts[g // n_per_prompt] for g in range(n_images)]
                    result["world"], result["world_by_objects"] = world_accuracy([r.verdict for r in merged], prompts_of)
                grid = [[merged[p * n_per_prompt + c].image for c in range(grid_cols)] for p in range(grid_rows)]
                if grid_cols == 1:  # one image per prompt: the prompts side by side in one row
                    grid = [[row[0] for row in grid]]
                result["grid"] = report.write_grid(out_dir, s, grid)
                results.append(result)
        finally:
            bar.close()
        if not info.is_main:
            return None
        metrics = {
            "latentdiff_version": latentdiff.__version__,
            "model": config.model or "built-in",
            "model_name": pipe.name,
            "prompts": config.prompts,
            "n_prompts": len(prompts),
            "images_per_prompt": n_per_prompt,
            "seed": config.seed,
            "negative_prompt": config.negative,
            "width": width,
            "height": height,
            "dtype": config.dtype,
            "device": str(config.device),
            "world_size": info.world_size,
            "guidance": [float(w) for w in config.guidance],
            "samplers": [f"{a}:{b}" for a, b in config.samplers],
            "features": {"name": extractor.name, "metric": extractor.metric, "source": str(feature_spec.path or clip_folder)},
            "fd_name": extractor.metric,
            "clip_model": str(clip_folder),
            "reference": reference.info,
            "grid_prompts": prompts[:grid_rows],
            "results": results,
        }
        report.write_outputs(out_dir, metrics)
        return metrics
