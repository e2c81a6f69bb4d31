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

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from ..errors import BadArgument
from ..loading import shown_path
from .config import EvalConfig, FeatureSpec, Setting, check_inputs
from .distributed import DistInfo, ProcessGroup, batches, device_for_rank, dist_info, merge_shards, shard
from .reference import Reference, reference_statistics
from .scorers import ClipScorer, FeatureExtractor, judge_image, make_feature_extractor, world_accuracy

if TYPE_CHECKING:
    from tqdm import tqdm

    from ..pipeline import Pipeline


def txt2img_seeded(pipe: Pipeline, prompts: list[str], seeds: list[int], *, negative_prompt: str = "",
                   width: int | None = None, height: int | None = None, steps: int = 20, guidance_scale: float = 7.5,
                   sampler: str = "ddim") -> list[Image.Image]:
    """``pipe.txt2img`` with one seed per image, so image ``i`` is exactly the image
    ``pipe.txt2img(prompts[i], seed=seeds[i])`` gives."""
    if len(prompts) != len(seeds):
        raise BadArgument(f"got {len(prompts)} prompts and {len(seeds)} seeds")
    return pipe.txt2img(prompts, negative_prompt=negative_prompt, width=width, height=height, steps=steps,
                        guidance_scale=guidance_scale, sampler=sampler, seed=[int(s) for s in seeds])


@dataclass
class ImageRecord:
    """What rank 0 needs of one generated image."""

    features: np.ndarray
    clip: float  # unfloored 100 cos
    verdict: dict[str, Any] | None
    image: np.ndarray | None  # kept only for the grid


@dataclass
class EvalRun:
    """What the steps of a run share: its inputs, this process's place, the models and the reference."""

    config: EvalConfig
    prompts: list[str]
    builtin: bool
    feature_spec: FeatureSpec
    clip_folder: Path
    info: DistInfo
    out_dir: Path
    pipe: Pipeline
    width: int
    height: int
    clip: ClipScorer
    extractor: FeatureExtractor
    reference: Reference | None  # rank 0's only

    @property
    def n_per_prompt(self) -> int:
        return self.config.images_per_prompt

    @property
    def n_images(self) -> int:
        """Images per setting: every prompt ``images_per_prompt`` times."""
        return len(self.prompts) * self.n_per_prompt

    @property
    def grid_rows(self) -> int:
        return min(self.config.grid_prompts, len(self.prompts))

    @property
    def grid_cols(self) -> int:
        return min(self.config.grid_columns, self.n_per_prompt)


def torch_dtype(name: str) -> torch.dtype:
    """``float32`` -> ``torch.float32``; anything that is not a torch dtype is a bad argument."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise BadArgument(f"unknown dtype {name!r}")
    return dtype


def load_models(config: EvalConfig, clip_folder: Path, feature_spec: FeatureSpec, device: torch.device | str,
                dtype: torch.dtype) -> tuple[Pipeline, int, int, ClipScorer, FeatureExtractor]:
    """(pipeline, width, height, CLIP scorer, feature extractor); every setting is checked before any work."""
    import latentdiff

    pipe = latentdiff.load(config.model, device=device, dtype=dtype)
    width, height = config.width or pipe.native_size, config.height or pipe.native_size
    for s in config.settings:  # sizes, steps and samplers checked before any work
        pipe.settings(["x"], negative_prompt=config.negative, width=width, height=height, steps=s.steps,
                      guidance_scale=s.guidance, sampler=s.sampler, seed=config.seed)
    clip = ClipScorer(clip_folder, pipe.tokenizer, device)
    extractor = make_feature_extractor(feature_spec, clip, device)
    return pipe, width, height, clip, extractor


def main_reference(config: EvalConfig, prompts: list[str], builtin: bool, extractor: FeatureExtractor,
                   info: DistInfo) -> Reference | None:
    """Rank 0's reference statistics (None on other ranks), checked against the extractor's dimension."""
    reference = reference_statistics(config, prompts, builtin, extractor) if info.is_main else None
    if reference is not None and reference.mu.shape[0] != extractor.dim:
        raise BadArgument(f"reference statistics have dimension {reference.mu.shape[0]} but {extractor.name} "
                         f"features have {extractor.dim}: were they computed with another feature extractor?")
    return reference


def progress_bar(run: EvalRun, total: int) -> tqdm:
    """The images bar, shown by rank 0 only (and only with ``progress``)."""
    from tqdm import tqdm

    info = run.info
    desc = f"eval (rank 0 of {info.world_size})" if info.distributed else "eval"
    return tqdm(total=total, desc=desc, unit="image", disable=not (run.config.progress and info.is_main),
                dynamic_ncols=True)


def generate_records(run: EvalRun, s: Setting, mine: list[int], bar: tqdm) -> list[tuple[int, ImageRecord]]:
    """Draw and score this rank's images of one setting: (global index, record) per image."""
    config, n_per_prompt = run.config, run.n_per_prompt
    records: list[tuple[int, ImageRecord]] = []
    for chunk in batches(mine, config.batch_size):
        chunk_prompts = [run.prompts[g // n_per_prompt] for g in chunk]
        images = txt2img_seeded(run.pipe, chunk_prompts, [config.seed + g for g in chunk],
                                negative_prompt=config.negative, width=run.width, height=run.height,
                                steps=s.steps, guidance_scale=s.guidance, sampler=s.sampler)
        feats = run.extractor(images)
        sims = run.clip.scores(images, chunk_prompts)
        for k, g in enumerate(chunk):
            keep = g // n_per_prompt < run.grid_rows and g % n_per_prompt < run.grid_cols
            verdict = judge_image(images[k], chunk_prompts[k]) if run.builtin else None
            records.append((g, ImageRecord(feats[k].astype(np.float32), float(sims[k]), verdict,
                                           np.asarray(images[k]) if keep else None)))
        bar.update(len(chunk))
    return records


def grid_images(run: EvalRun, merged: list[ImageRecord]) -> list[list[np.ndarray | None]]:
    """The grid's rows: a row per prompt, a column per copy; one row of prompts with one image per prompt."""
    n_per_prompt = run.n_per_prompt
    grid = [[merged[p * n_per_prompt + c].image for c in range(run.grid_cols)] for p in range(run.grid_rows)]
    if run.grid_cols == 1:  # one image per prompt: the prompts side by side in one row
        grid = [[row[0] for row in grid]]
    return grid


def setting_result(run: EvalRun, s: Setting, merged: list[ImageRecord], seconds: float) -> dict[str, Any]:
    """One setting's numbers from all its images (rank 0); writes the setting's grid."""
    from . import report
    from .metrics import feature_statistics, frechet_distance_from_stats

    n_images = run.n_images
    mu, sigma = feature_statistics(np.stack([r.features for r in merged]).astype(np.float64))
    fd = frechet_distance_from_stats(mu, sigma, run.reference.mu, run.reference.sigma)
    sims_all = np.array([r.clip for r in merged])
    result: dict[str, Any] = {
        "setting": s.key, "sampler": s.sampler, "steps": s.steps, "guidance": s.guidance,
        "n_images": n_images, "fd": fd, "clip_score": float(np.maximum(sims_all, 0).mean()),
        "clip_score_std": float(np.maximum(sims_all, 0).std()),
        "seconds": seconds, "images_per_second": n_images / seconds if seconds > 0 else None,
    }
    if run.builtin:
        prompts_of = [run.prompts[g // run.n_per_prompt] for g in range(n_images)]
        result["world"], result["world_by_objects"] = world_accuracy([r.verdict for r in merged], prompts_of)
    result["grid"] = report.write_grid(run.out_dir, s, grid_images(run, merged))
    return result


def sweep(run: EvalRun, group: ProcessGroup) -> list[dict[str, Any]]:
    """Every setting in turn: each rank draws its share, rank 0 gathers and scores (other ranks get [])."""
    settings = run.config.settings
    mine = shard(run.n_images, run.info.rank, run.info.world_size)
    bar = progress_bar(run, len(mine) * len(settings))
    results = []
    try:
        for s in settings:
            bar.set_postfix_str(s.key)
            start = time.perf_counter()
            parts = group.gather_to_main(generate_records(run, s, mine, bar))
            if not run.info.is_main:
                continue
            merged = merge_shards(parts, run.n_images)
            results.append(setting_result(run, s, merged, time.perf_counter() - start))
    finally:
        bar.close()
    return results


def run_metrics(run: EvalRun, results: list[dict[str, Any]]) -> dict[str, Any]:
    """``metrics.json``'s content: what was run, with what, and each setting's results."""
    import latentdiff

    config, extractor = run.config, run.extractor
    return {
        "latentdiff_version": latentdiff.__version__,
        "model": config.model or "built-in",
        "model_name": run.pipe.name,
        "prompts": config.prompts,
        "n_prompts": len(run.prompts),
        "images_per_prompt": run.n_per_prompt,
        "seed": config.seed,
        "negative_prompt": config.negative,
        "width": run.width,
        "height": run.height,
        "dtype": config.dtype,
        "device": str(config.device),
        "world_size": run.info.world_size,
        "guidance": [float(w) for w in config.guidance],
        "samplers": [f"{a}:{b}" for a, b in config.samplers],
        "features": {"name": extractor.name, "metric": extractor.metric,
                     "source": shown_path(run.feature_spec.path or run.clip_folder)},
        "fd_name": extractor.metric,
        "clip_model": shown_path(run.clip_folder),
        "reference": run.reference.info,
        "grid_prompts": run.prompts[:run.grid_rows],
        "results": results,
    }


def run_eval(config: EvalConfig, info: DistInfo | None = None) -> dict[str, Any] | None:
    """Run the sweep; rank 0 writes the outputs and returns the metrics (other ranks return None)."""
    from . import report

    prompts, builtin, feature_spec, clip_folder = check_inputs(config)
    info = info or dist_info()
    out_dir = Path(config.out)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    dtype = torch_dtype(config.dtype)
    device = device_for_rank(config.device, info)

    with ProcessGroup(info) as group:
        pipe, width, height, clip, extractor = load_models(config, clip_folder, feature_spec, device, dtype)
        reference = main_reference(config, prompts, builtin, extractor, info)
        run = EvalRun(config, prompts, builtin, feature_spec, clip_folder, info, out_dir, pipe, width, height,
                      clip, extractor, reference)
        results = sweep(run, group)
        if not info.is_main:
            return None
        metrics = run_metrics(run, results)
        report.write_outputs(out_dir, metrics)
        return metrics
