"""``latentdiff train builtin``: the built-in Shapes World model, from nothing, stage by stage.

    runs/builtin/
      clip/    contrastive CLIP (text + image towers) and the world's BPE tokenizer
      vae/     the KL autoencoder (64x64x3 <-> 16x16x4, factor 4)
      unet/    the cross-attention UNet on cached latents, conditioned on the frozen CLIP text tower
      decoder/ the VAE decoder fine-tuned further with the encoder frozen (SD's ft-MSE move: the
               latent space, and so the UNet, is untouched; it can train beside the UNet stage)
      sharpen/ the decoder fine-tuned once more from decoder/'s export with an L1 tolerance (errors
               under 0.1 cost nothing), which puts the gradient on the edge pixels the judge misreads
      anneal/  the UNet trained on from unet/'s export, on fresh scenes, with a cosine-annealed
               learning rate (a fine-tune of the same loop: new AdamW, new EMA)
      vision/  the CLIP's image side trained on from clip/'s export with the text tower frozen (the
               UNet reads only the text tower, so it can train beside the UNet stages)
      lcm/     the annealed UNet distilled into an LCM-LoRA, the fast default (LCM 8 steps, guidance 1)
      model/   the assembled diffusers-layout pipeline (what ships in latentdiff/weights/)

Each stage is an ordinary run of its trainer (``train clip|vae|unet``) with the config
below, so each resumes exactly, and each stage's export can be committed on its own:
a stage whose export exists is skipped. ``--stage`` runs one stage only. ``--jobs 2`` runs
stages side by side, each in a process of its own, as soon as what it reads is exported
(:data:`STAGE_NEEDS`): ``vae`` beside ``clip``; ``decoder``, ``sharpen`` and ``vision`` beside ``unet``,
``anneal`` and ``lcm``. Every run of a stage appends its wall time to ``stages.csv``::

      stages.csv  stage,started_utc,minutes,threads (one row per run; a resumed stage has several)

Why these sizes (64x64 images, 2 CPU cores, a 3-hour budget):
- latent factor 4 (16x16x4): objects are 10 or 20 px with hard edges; a factor of 8
  (8x8 latents) would have to encode a small circle's shape inside about one latent
  cell, while 16x16 keeps the UNet cheap (attention over 256 tokens at most).
- a small VAE (16/32/64 channels): flat palette colours need little capacity, and
  the 64x64 level dominates its cost.
- CLIP width 128 with hard negatives (captions that differ in one attribute), so the
  frozen text states separate exactly the attributes the judge checks.
- the UNet puts cross-attention at 16x16 and 8x8, where positions in the 3x3 grid are
  resolved, and trains on fully cached latents and text states.
"""

from __future__ import annotations

import calendar
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..checkpoints.errors import CheckpointError
from ..checkpoints.io import atomic_path
from .clip import CLIPTrainConfig
from .config import UNetTrainConfig, VAETrainConfig
from .lcm import EXPORT_NAME as LCM_EXPORT, LCMTrainConfig, train_lcm
from .stages import run_concurrently

STAGES = ("clip", "vae", "unet", "decoder", "sharpen", "anneal", "vision", "lcm", "assemble")

VAE_MODEL: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 1.0,  # replaced by 1 / std of the trained latents before the UNet stage
}

UNET_MODEL: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [64, 128, 192],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "attention_head_dim": 4,  # diffusers' name for the head count (SD 1.x quirk)
    "cross_attention_dim": 128,
    "norm_num_groups": 32,
}


def clip_config(out: Path) -> CLIPTrainConfig:
    return CLIPTrainConfig(
        out_dir=str(out / "clip"), max_steps=800, warmup_steps=25, decay_steps=800, zero_shot_n=200,
        sample_every=100, checkpoint_every=50,
    )


def vae_config(out: Path) -> VAETrainConfig:
    return VAETrainConfig(
        out_dir=str(out / "vae"), model=str(out / "vae_model.json"), world_seed=1, world_length=20000,
        batch_size=16, max_steps=3000, lr=4e-4, kl_weight=1e-6, disc_start=2800, disc_weight=0.1,
        sample_every=500, checkpoint_every=250, log_every=10,
    )


def decoder_config(out: Path) -> VAETrainConfig:
    return VAETrainConfig(
        out_dir=str(out / "decoder"), pretrained=str(out / "vae" / "vae"), train_decoder_only=True,
        world_seed=3, world_length=20000, batch_size=16, max_steps=4000, lr=2e-4, kl_weight=1e-6,
        disc_start=0, disc_weight=0.1, sample_every=500, checkpoint_every=250, log_every=10,
    )


def unet_config(out: Path) -> UNetTrainConfig:
    return UNetTrainConfig(
        out_dir=str(out / "unet"), unet=str(out / "unet_model.json"), vae=str(out / "vae" / "vae"),
        text_encoder=str(out / "clip" / "text_encoder"), tokenizer=str(out / "clip" / "tokenizer"),
        world_seed=2, world_length=40000, batch_size=32, max_steps=7000, lr=4e-4, warmup_steps=200,
        ema_decay=0.999, caption_dropout=0.1, sample_every=500, checkpoint_every=250, log_every=10,
        guidance_scale=7.5, sample_steps=20,
        sample_prompts=[
            "a large red circle in the center on a white background",
            "a small blue square in the top left on a black background",
            "a large green triangle at the bottom on a gray background",
            "a small yellow circle on the right and a large purple square on the left on a white background",
        ],
    )


def sharpen_config(out: Path) -> VAETrainConfig:
    """The decoder's second fine-tune. Plain L1 spends most of its gradient on flat areas already
    within a level or two; with a tolerance of 0.1 it goes to the edge pixels that still read as
    the wrong palette colour (probe, 300 steps: misread pixels per image 9.8 -> 5.7, reconstructions
    judged correct 90% -> 94%, PSNR 34.5 -> 36.9 dB). A stage of its own for the reason given
    in :func:`anneal_config`. The shipped shapes-v2 ran it from the float16 copy of the ``decoder``
    export that shipped as shapes-v1."""
    return dataclasses.replace(
        decoder_config(out), out_dir=str(out / "sharpen"), pretrained=str(out / "decoder" / "vae"), world_seed=6,
        max_steps=3000, lr=2e-4, decay_steps=3000, min_lr_ratio=0.05, l1_tolerance=0.1,
    )


def anneal_config(out: Path) -> UNetTrainConfig:
    """The UNet's second phase. Why a stage of its own rather than a longer ``unet`` stage: stages
    are what separate sessions commit, and the ``unet`` stage had already shipped (7,000 steps at a
    constant rate, still improving fast) when annealing was added; this stage starts from that
    export, so ``train builtin`` reproduces exactly the recipe the shipped model went through.
    Fresh scenes (another world seed) rather than a second pass over the same 40,000.

    Provenance of the shipped shapes-v2: this run started from the float16 copy of the ``unet``
    export that shipped as shapes-v1 (the stage's float32 export was not kept), was resumed at
    step 750 after ``max_steps``/``decay_steps`` went from 5,000 to 6,000 (learning rates differ
    by under 1% over those first steps) and at step 3,500 with 2 threads instead of 1, so a fresh
    run of this config reproduces the recipe, not the exact bits."""
    return dataclasses.replace(
        unet_config(out), out_dir=str(out / "anneal"), pretrained=str(out / "unet" / "model"), unet="tiny",
        vae=None, text_encoder=None, tokenizer=None, world_seed=4, world_length=50000,
        seed=1, max_steps=6000, lr=3e-4, warmup_steps=100, decay_steps=6000, min_lr_ratio=0.05, sample_every=1000,
    )


def vision_config(out: Path) -> CLIPTrainConfig:
    """The CLIP's image side, trained on. The ``clip`` stage's 800 steps leave its image tower
    reading shapes poorly (shape pairs 84%); the text tower it shares with the UNet is frozen
    here, so the UNet stays valid, while the image tower, both projections and the temperature
    learn for 3,000 more annealed steps with 7 hard negatives (zero-shot 68.8% -> 76.5%, shape
    pairs 84% -> 89%). The shipped copy started from the float16 ``clip/`` of shapes-v2."""
    return CLIPTrainConfig(
        out_dir=str(out / "vision"), pretrained=str(out / "clip" / "clip"), freeze_text_tower=True, batch_size=128,
        hard_negatives=7, max_steps=3000, lr=3e-4, warmup_steps=50, decay_steps=3000, bf16=True, zero_shot_n=200,
        sample_every=250, checkpoint_every=100,
    )


def lcm_config(out: Path) -> LCMTrainConfig:
    """The fast default: the annealed UNet distilled into an LCM-LoRA (``--preset fast``: LCM 8
    steps at guidance 1), the teacher guided at 7 .. 8 around the model's 7.5. (A first run with
    rank 16, lr 3e-4 and w in [5.5, 7.5] reached 80.0% at 4 steps and 85.2% at 8.)"""
    return LCMTrainConfig(
        out_dir=str(out / "lcm"), pretrained=str(out / "anneal" / "model"), world_seed=7, world_length=20000,
        batch_size=32, max_steps=1500, lora_rank=32, lora_alpha=32.0, lr=5e-4, warmup_steps=50, decay_steps=1500,
        w_min=6.0, w_max=7.0, ema_decay=0.95, sample_every=500, checkpoint_every=100, log_every=10,
    )


def latent_scaling_factor(vae_folder: Path, images: int = 512, seed: int = 0) -> float:
    """1 / std of the posterior means of world images, as SD chose 0.18215 for its VAE."""
    from ..loading import load_component
    from ..world import WorldDataset

    vae = load_component(vae_folder)
    data = WorldDataset(seed=seed, length=images, as_tensor=True)
    with torch.no_grad():
        batch = torch.stack([data[i][0] for i in range(images)])  # (N, 3, 64, 64) in [-1, 1]
        latents = torch.cat([vae.encode(chunk).mean for chunk in batch.split(64)])
    return float(1.0 / latents.std())


def _set_scaling_factor(vae_folder: Path) -> float:
    path = vae_folder / "config.json"
    config = json.loads(path.read_text())
    factor = latent_scaling_factor(vae_folder)
    config["scaling_factor"] = round(factor, 5)
    with atomic_path(path) as tmp:  # stages in other processes may read it meanwhile
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return config["scaling_factor"]


def assemble(out: Path, target: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Gather the stages' exports into one diffusers folder with half-precision weights.

    Besides the pipeline, ``clip/`` holds the whole CLIP (both towers, transformers layout)
    for zero-shot checks, CLIP score and FD with the model's own image tower: the ``vision``
    stage's when it has exported, else the ``clip`` stage's (their text towers are equal); and
    ``lcm_lora.safetensors`` the ``lcm`` stage's LoRA (the fast default), when it has exported.
    """
    import latentdiff
    from ..checkpoints.clip_folder import load_clip_model, save_clip_model
    from ..models.tokenizer import CLIPTokenizer

    unet_model = out / "anneal" / "model"
    if not (unet_model / "model_index.json").is_file():
        raise CheckpointError(f"the anneal stage has not exported {unet_model} yet")
    decoders = [out / stage / "vae" for stage in ("sharpen", "decoder") if (out / stage / "vae" / "config.json").is_file()]
    pipe = latentdiff.load(unet_model, dtype=torch.float32, vae=decoders[0] if decoders else None)
    pipe.save(target, dtype=dtype)
    lcm_lora = out / "lcm" / LCM_EXPORT
    if lcm_lora.is_file():
        shutil.copyfile(lcm_lora, target / LCM_EXPORT)
    clip_folder = out / "vision" / "clip"
    if not (clip_folder / "config.json").is_file():
        clip_folder = out / "clip" / "clip"
    if not (clip_folder / "config.json").is_file():
        raise CheckpointError(f"the clip stage has not exported {clip_folder} yet")
    save_clip_model(load_clip_model(clip_folder), target / "clip", dtype=dtype)
    CLIPTokenizer.from_folder(clip_folder).save(target / "clip")
    return target


STAGE_NEEDS: dict[str, tuple[str, ...]] = {  # what each stage reads; in priority order, the critical path first
    "clip": (), "vae": (), "unet": ("clip", "vae"), "decoder": ("vae",), "anneal": ("unet",), "lcm": ("anneal",),
    "sharpen": ("decoder",), "vision": ("clip",),
}


STAGE_EXPORTS: dict[str, str] = {  # the file in out/STAGE/ whose presence means the stage is finished
    "clip": "text_encoder/config.json", "vae": "vae/config.json", "unet": "model/model_index.json",
    "decoder": "vae/config.json", "sharpen": "vae/config.json", "anneal": "model/model_index.json",
    "vision": "clip/config.json", "lcm": LCM_EXPORT,
}


def _stage_trainers() -> dict[str, tuple[Callable[..., Any], Callable[[Path], Any]]]:
    """Stage -> (trainer, config of the run folder)."""
    from .clip import train_clip
    from .unet import train_unet
    from .vae import train_vae

    return {"clip": (train_clip, clip_config), "vae": (train_vae, vae_config), "unet": (train_unet, unet_config),
            "decoder": (train_vae, decoder_config), "sharpen": (train_vae, sharpen_config),
            "anneal": (train_unet, anneal_config), "vision": (train_clip, vision_config),
            "lcm": (train_lcm, lcm_config)}


def stage_finished(out: Path, stage: str) -> bool:
    return (out / stage / STAGE_EXPORTS[stage]).is_file()


def _ensure_scaling_factor(out: Path) -> None:
    """Once the ``vae`` stage has exported, set its latent scaling factor (before any stage reads the VAE)."""
    vae_folder = out / "vae" / "vae"
    if (vae_folder / "config.json").is_file() and json.loads((vae_folder / "config.json").read_text())["scaling_factor"] == 1.0:
        print(f"latent scaling factor: {_set_scaling_factor(vae_folder)}")


STAGES_CSV_HEADER = "stage,started_utc,minutes,threads"  # out/stages.csv, one row per run of a stage
STARTED_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # its started_utc


def _record_stage_time(out: Path, stage: str, started: float, seconds: float) -> None:
    """Append one run of a stage to ``out/stages.csv`` (a resumed stage has one row per run)."""
    file = out / "stages.csv"
    new = not file.is_file()
    with file.open("a", encoding="utf-8") as f:
        if new:
            f.write(STAGES_CSV_HEADER + "\n")
        when = time.strftime(STARTED_FORMAT, time.gmtime(started))
        f.write(f"{stage},{when},{seconds / 60:.1f},{torch.get_num_threads()}\n")


def recipe_times(out: Path) -> tuple[dict[str, float], float]:
    """From ``out/stages.csv``: the minutes of each stage (summed over its runs) and the recipe's
    wall time, the union of the runs' intervals (stages side by side count once; runs in
    separate sessions add up)."""
    file = out / "stages.csv"
    if not file.is_file():
        raise CheckpointError(f"{file} does not exist: no stage has run in {out}")
    per_stage: dict[str, float] = {}
    intervals = []
    for line_no, line in enumerate(file.read_text(encoding="utf-8").splitlines()[1:], start=2):
        try:
            stage, started, minutes, _threads = line.split(",")
            start = calendar.timegm(time.strptime(started, STARTED_FORMAT))
            length = float(minutes)
        except ValueError:
            raise CheckpointError(f"{file}:{line_no}: not a {STAGES_CSV_HEADER} row: {line!r}") from None
        per_stage[stage] = per_stage.get(stage, 0.0) + length
        intervals.append((start, start + 60 * length))
    wall, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        wall += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return per_stage, wall / 60


def times_table(out: Path) -> str:
    """:func:`recipe_times` as a Markdown table."""
    per_stage, wall = recipe_times(out)
    rows = [f"| `{stage}` | {minutes:.1f} |" for stage, minutes in per_stage.items()]
    return "\n".join(["| stage | minutes |", "|---|---:|", *rows, f"| **wall time** | **{wall:.1f}** ({wall / 60:.2f} h) |"])


def stage_process(out: Path, stage: str, threads: int) -> subprocess.Popen:
    """``latentdiff train builtin --stage STAGE`` in a process of its own, its output in ``out/STAGE/console.log``."""
    (out / stage).mkdir(parents=True, exist_ok=True)
    log = out / stage / "console.log"
    command = [sys.executable, "-m", "latentdiff.cli", "train", "builtin", "--out", str(out), "--stage", stage]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    print(f"stage {stage}: started ({threads} thread{'s' * (threads > 1)}), output in {log}", flush=True)
    with log.open("ab") as output:  # the child holds its own copy of the descriptor
        return subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)


def train_builtin(out_dir: str | Path = "runs/builtin", stages: tuple[str, ...] = STAGES,
                  target: str | Path | None = None, *, jobs: int = 1) -> Path:
    """Run the stages (each resumes its own checkpoint, finished ones are skipped), then assemble.

    ``jobs=1`` runs them in order in this process. ``jobs > 1`` runs up to that many at once, each
    in a process of its own with ``cores // jobs`` threads, as soon as the stages it reads
    (:data:`STAGE_NEEDS`) are finished: with 2, ``vae`` trains beside ``clip``, and ``decoder``,
    ``sharpen`` and ``vision`` beside the UNet stages (``unet``, ``anneal``, ``lcm``). Every run of a stage is logged in ``out/stages.csv``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, model in (("vae_model.json", VAE_MODEL), ("unet_model.json", UNET_MODEL)):
        if not (out / name).is_file():
            (out / name).write_text(json.dumps(model, indent=2) + "\n")
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages are {', '.join(STAGES)}")
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    _ensure_scaling_factor(out)
    todo = [stage for stage in STAGE_NEEDS if stage in stages and not stage_finished(out, stage)]
    if jobs == 1:
        trainers = _stage_trainers()
        for stage in todo:
            train, config = trainers[stage]
            started = time.time()
            train(config(out), resume=(out / stage / "checkpoint.pt").is_file())
            _record_stage_time(out, stage, started, time.time() - started)
            _ensure_scaling_factor(out)
    elif todo:
        threads = max(1, (os.cpu_count() or 1) // jobs)

        def finished(stage: str) -> None:
            print(f"stage {stage}: finished", flush=True)
            _ensure_scaling_factor(out)

        run_concurrently({stage: STAGE_NEEDS[stage] for stage in todo},
                         lambda stage: stage_process(out, stage, threads), jobs=jobs, on_done=finished)
    final = Path(target) if target else out / "model"
    if "assemble" in stages:
        assemble(out, final)
    return final


def describe() -> str:
    """The stage configs as JSON (for the README and for reproducing by hand)."""
    out = Path("runs/builtin")
    return json.dumps({"vae_model": VAE_MODEL, "unet_model": UNET_MODEL, "clip": dataclasses.asdict(clip_config(out)),
                       "vae": dataclasses.asdict(vae_config(out)), "unet": dataclasses.asdict(unet_config(out)),
                       "decoder": dataclasses.asdict(decoder_config(out)),
                       "sharpen": dataclasses.asdict(sharpen_config(out)), "anneal": dataclasses.asdict(anneal_config(out)),
                       "vision": dataclasses.asdict(vision_config(out)), "lcm": dataclasses.asdict(lcm_config(out))},
                      indent=2)
