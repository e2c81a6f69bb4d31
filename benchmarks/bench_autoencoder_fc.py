"""Latent Diffusion's f / c trade-off, measured on Shapes World.

The claims (Rombach et al. 2022, as the seed document cites them): a smaller downsampling
factor f and more latent channels c reconstruct better; f of 1-2 makes the diffusion model
converge slowly, a large f loses quality, f = 4-16 works best.

  1. autoencoders: KL at f in {2, 4, 8} x c in {3, 4, 8}, plus VQ (8192 codes) at f = 4, c = 4,
     each trained from scratch for the same steps on the same scenes (L1 + regulariser, no
     GAN, cosine-annealed lr); PSNR, SSIM and the world judge's reconstruction accuracy on
     fresh scenes (another world seed), parameter counts and training minutes;
  2. diffusion: one small UNet (2.3 M parameters, the same for every f) trained for the same
     steps on the latents of the KL c = 4 autoencoders at f = 2, 4 and 8, conditioned on the
     built-in model's frozen text encoder; whole-caption accuracy on held-out prompts (DDIM
     20, guidance 7.5) and the Frechet distance of its images to renders of the same prompts
     in the built-in CLIP's image features (FD), plus training minutes.

Layouts: f = 2 ** (levels - 1) with level widths 16, 32, 64, 64 (f = 4 is the built-in
autoencoder's layout, f = 2 drops its last level, f = 8 adds one), one ResNet per level.

Every unit (an autoencoder or a UNet) is a training run in ``--out``/NAME that resumes
exactly and writes NAME/result.json when measured; finished units are skipped, so a run
can be stopped and continued, and ``--units`` runs some of them (two processes can share
the work). Each run ends by gathering every result into a table (``--json``, ``--plot``).

Usage:
  .venv/bin/python benchmarks/bench_autoencoder_fc.py --size reduced            # 12 minutes on one thread
  OMP_NUM_THREADS=1 nohup .venv/bin/python benchmarks/bench_autoencoder_fc.py --size full \\
      --out runs/fc-full --json docs/autoencoder-fc.json --plot docs/autoencoder-fc.png > fc.log &
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

import latentdiff
from latentdiff.eval import frechet_distance, world_reconstruction
from latentdiff.eval.plot import Series, line_plot
from latentdiff.eval.zero_shot import world_pixels
from latentdiff.loading import BUILTIN_MODEL, load_component
from latentdiff.train import UNetTrainConfig, VAETrainConfig, train_unet, train_vae
from latentdiff.train.builtin import UNET_MODEL, latent_scaling_factor
from latentdiff.world import (
    ATTRIBUTES, accuracy_report, held_out_prompts, judge, parse_caption, render, scene_from_caption,
)

LEVEL_WIDTHS = (16, 32, 64, 64)
FACTORS = (2, 4, 8)
CHANNELS = (3, 4, 8)
UNET_CHANNELS = 4  # the UNets train on the KL autoencoders with this c
EVAL_SEED = 12345  # world seed of the fresh scenes the autoencoders are measured on


@dataclasses.dataclass(frozen=True)
class Size:
    ae_steps: int
    ae_batch: int
    unet_steps: int
    unet_batch: int
    scenes: int  # fresh scenes per autoencoder measurement
    prompts: int  # held-out prompts per UNet measurement
    world_length: int


SIZES = {
    "reduced": Size(ae_steps=150, ae_batch=8, unet_steps=120, unet_batch=8, scenes=100, prompts=40, world_length=2000),
    "full": Size(ae_steps=800, ae_batch=16, unet_steps=900, unet_batch=16, scenes=500, prompts=200,
                 world_length=20000),
}


@dataclasses.dataclass(frozen=True)
class Autoencoder:
    regularization: str  # "kl" or "vq"
    factor: int
    channels: int

    @property
    def name(self) -> str:
        return f"{self.regularization}-f{self.factor}-c{self.channels}"

    def model_config(self) -> dict:
        levels = int(math.log2(self.factor)) + 1
        config = {
            "_class_name": "AutoencoderKL" if self.regularization == "kl" else "VQModel",
            "in_channels": 3, "out_channels": 3, "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 64,
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": list(LEVEL_WIDTHS[:levels]), "latent_channels": self.channels,
            "scaling_factor": 1.0,
        }
        if self.regularization == "vq":
            config.update(num_vq_embeddings=8192, vq_embed_dim=self.channels, force_upcast=False)
        return config


AUTOENCODERS = [Autoencoder("kl", f, c) for f in FACTORS for c in CHANNELS] + [Autoencoder("vq", 4, 4)]
UNET_UNITS = [f"unet-f{f}" for f in FACTORS]


def _timed(result_dir: Path, train) -> float:
    """Run ``train()`` and add its wall time to the unit's running total (resumed runs add up)."""
    clock = result_dir / "train_seconds.json"
    spent = json.loads(clock.read_text())["seconds"] if clock.is_file() else 0.0
    start = time.perf_counter()
    try:
        train()
    finally:
        spent += time.perf_counter() - start
        clock.write_text(json.dumps({"seconds": spent}))
    return spent


def train_autoencoder(ae: Autoencoder, size: Size, out: Path) -> dict:
    folder = out / ae.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.json").write_text(json.dumps(ae.model_config(), indent=2) + "\n")
    config = VAETrainConfig(
        out_dir=str(folder), model=str(folder / "model.json"), regularization=ae.regularization,
        world_seed=1, world_length=size.world_length, batch_size=size.ae_batch, max_steps=size.ae_steps,
        lr=4e-4, decay_steps=size.ae_steps, min_lr_ratio=0.1, kl_weight=1e-6, disc_start=size.ae_steps + 1,
        num_codes=8192, codebook_update="ema", dead_code_steps=50,
        sample_every=0, checkpoint_every=100, log_every=10,
    )
    seconds = _timed(folder, lambda: train_vae(config, resume=(folder / "checkpoint.pt").is_file()))
    vae = load_component(folder / "vae").eval()
    result = {"name": ae.name, "regularization": ae.regularization, "f": ae.factor, "c": ae.channels,
              "params": sum(p.numel() for p in vae.parameters()), "train_minutes": seconds / 60,
              "latent": f"{64 // ae.factor}x{64 // ae.factor}x{ae.channels}", **world_reconstruction(vae, size.scenes, EVAL_SEED)}
    return result


def train_diffusion(factor: int, size: Size, out: Path) -> dict:
    ae_folder = out / Autoencoder("kl", factor, UNET_CHANNELS).name / "vae"
    if not (ae_folder / "config.json").is_file():
        raise SystemExit(f"unet-f{factor} needs {ae_folder}: run its autoencoder unit first")
    folder = out / f"unet-f{factor}"
    folder.mkdir(parents=True, exist_ok=True)
    vae_config = json.loads((ae_folder / "config.json").read_text())
    if vae_config["scaling_factor"] == 1.0:  # 1 / std of the latents, as for the built-in model
        vae_config["scaling_factor"] = round(latent_scaling_factor(ae_folder), 5)
        (ae_folder / "config.json").write_text(json.dumps(vae_config, indent=2) + "\n")
    unet = {**UNET_MODEL, "sample_size": 64 // factor, "in_channels": UNET_CHANNELS, "out_channels": UNET_CHANNELS,
            "block_out_channels": [32, 64, 96]}
    (folder / "unet.json").write_text(json.dumps(unet, indent=2) + "\n")
    builtin = Path(BUILTIN_MODEL)
    config = UNetTrainConfig(
        out_dir=str(folder), unet=str(folder / "unet.json"), vae=str(ae_folder),
        text_encoder=str(builtin / "text_encoder"), tokenizer=str(builtin / "tokenizer"),
        world_seed=2, world_length=size.world_length, batch_size=size.unet_batch, max_steps=size.unet_steps,
        lr=4e-4, warmup_steps=min(100, size.unet_steps // 10), caption_dropout=0.1,
        sample_every=0, checkpoint_every=100, log_every=10, sample_prompts=held_out_prompts(4),
    )
    curve_file = folder / "curve.json"
    curve = json.loads(curve_file.read_text()) if curve_file.is_file() else []
    for milestone in milestones(size.unet_steps):  # train on to each milestone (constant lr), then measure
        if any(point["steps"] == milestone for point in curve):
            continue
        config = dataclasses.replace(config, max_steps=milestone)
        seconds = _timed(folder, lambda: train_unet(config, resume=(folder / "checkpoint.pt").is_file()))
        pipe = latentdiff.load(folder / "model", dtype=torch.float32)
        curve.append({"steps": milestone, "train_minutes": seconds / 60, **generation(pipe, size.prompts)})
        curve_file.write_text(json.dumps(curve, indent=2) + "\n")
        print(json.dumps(curve[-1]), flush=True)
    unet_params = sum(p.numel() for p in latentdiff.load(folder / "model").unet.parameters())
    return {"name": f"unet-f{factor}", "f": factor, "c": UNET_CHANNELS, "batch": size.unet_batch,
            "latent": f"{64 // factor}x{64 // factor}x{UNET_CHANNELS}", "unet_params": unet_params,
            **curve[-1], "curve": curve}


def milestones(steps: int, points: int = 3) -> list[int]:
    """Where the UNets are measured: ``points`` evenly spaced step counts ending at ``steps``."""
    return [steps * (k + 1) // points for k in range(points)]


@torch.no_grad()
def generation(pipe: latentdiff.Pipeline, n: int) -> dict:
    """Whole-caption and per-attribute accuracy on ``n`` held-out prompts, and the FD to renders of
    the same prompts."""
    from latentdiff.checkpoints.clip_folder import load_clip_model

    prompts = held_out_prompts(n)
    images = []
    for start in range(0, n, 25):
        chunk = prompts[start : start + 25]
        images += [np.asarray(im) for im in pipe.txt2img(chunk, steps=20, guidance_scale=7.5, sampler="ddim",
                                                          seed=start)]
    judgements = [judge(im, p) for im, p in zip(images, prompts)]
    by_objects = [[j for j, p in zip(judgements, prompts) if len(parse_caption(p).objects) == k] for k in (1, 2)]
    report = accuracy_report(judgements)
    rng = np.random.default_rng(EVAL_SEED)
    renders = [render(scene_from_caption(p, rng)) for p in prompts]
    clip = load_clip_model(Path(BUILTIN_MODEL) / "clip", dtype=torch.float32).eval()
    size = clip.config.vision_config.image_size

    def features(batch: list[np.ndarray]) -> torch.Tensor:
        return torch.cat([clip.encode_image(world_pixels(np.stack(batch[i : i + 50]), size))
                          for i in range(0, len(batch), 50)])

    return {"accuracy": report["caption"], "accuracy_1obj": accuracy_report(by_objects[0])["caption"],
            "accuracy_2obj": accuracy_report(by_objects[1])["caption"],
            "attributes": {a: report[a] for a in ATTRIBUTES},  # each attribute's share read right
            "fd": frechet_distance(features(images), features(renders)), "prompts": n}


def table(results: dict[str, dict]) -> str:
    rows = ["| autoencoder | latent | parameters | train minutes | PSNR (dB) | SSIM | judged correct |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for ae in AUTOENCODERS:
        r = results.get(ae.name)
        if r:
            rows.append(f"| {ae.regularization.upper()} f={ae.factor} c={ae.channels} | {r['latent']} | "
                        f"{r['params'] / 1e6:.2f} M | {r['train_minutes']:.1f} | {r['psnr_db']:.2f} | {r['ssim']:.4f} | "
                        f"{r['judged_correct']:.1%} |")
    rows += ["", "| UNet on | latent | steps | train minutes | whole caption | 1 object | 2 objects | "
             + " | ".join(ATTRIBUTES) + " | FD |", "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(ATTRIBUTES) + "---:|"]
    for unit in UNET_UNITS:
        r = results.get(unit)
        for point in r["curve"] if r else []:
            rows.append(f"| KL f={r['f']} c={r['c']} | {r['latent']} | {point['steps']} | {point['train_minutes']:.1f} | "
                        f"{point['accuracy']:.1%} | {point['accuracy_1obj']:.1%} | {point['accuracy_2obj']:.1%} | "
                        + "".join(f"{point['attributes'][a]:.1%} | " for a in ATTRIBUTES) + f"{point['fd']:.2f} |")
    return "\n".join(rows)


def plot(results: dict[str, dict], path: Path) -> None:
    """PSNR against f, one line per c (VQ as its own point), beside the UNets' FD and accuracy against steps."""
    from PIL import Image

    lines = []
    for c in CHANNELS:
        points = [(f, results[f"kl-f{f}-c{c}"]["psnr_db"]) for f in FACTORS if f"kl-f{f}-c{c}" in results]
        if points:
            lines.append(Series(f"KL c={c}", [p[0] for p in points], [p[1] for p in points]))
    if "vq-f4-c4" in results:
        lines.append(Series("VQ c=4", [4], [results["vq-f4-c4"]["psnr_db"]]))
    left = line_plot(lines, "autoencoders: reconstruction PSNR", "downsampling factor f", "PSNR (dB)")
    unets = [results[u] for u in UNET_UNITS if u in results]

    def curves(value) -> list[Series]:
        return [Series(f"KL f={r['f']} c={r['c']}", [p["steps"] for p in r["curve"]], [value(p) for p in r["curve"]])
                for r in unets]

    def attributes(point: dict) -> float:
        return 100 * float(np.mean([point["attributes"][a] for a in ATTRIBUTES]))

    panels = [left, line_plot(curves(lambda p: p["fd"]), "UNet: FD to renders (lower is better)", "training steps", "FD"),
              line_plot(curves(attributes), "UNet: attributes read right (mean of six)", "training steps", "%")]
    canvas = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)), "white")
    for k, panel in enumerate(panels):
        canvas.paste(panel, (sum(p.width for p in panels[:k]), 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def gather(out: Path) -> dict[str, dict]:
    names = [ae.name for ae in AUTOENCODERS] + UNET_UNITS
    return {n: json.loads((out / n / "result.json").read_text()) for n in names if (out / n / "result.json").is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="reduced")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default runs/fc-SIZE)")
    parser.add_argument("--units", default="all",
                        help="comma-separated unit names (kl-f2-c3, ..., vq-f4-c4, unet-f2, ...) or 'all'")
    parser.add_argument("--json", type=Path, default=None, help="write every result here")
    parser.add_argument("--plot", type=Path, default=None, help="write the plot here")
    args = parser.parse_args()
    size, out = SIZES[args.size], args.out or Path(f"runs/fc-{args.size}")
    all_units = [ae.name for ae in AUTOENCODERS] + UNET_UNITS
    units = all_units if args.units == "all" else [u.strip() for u in args.units.split(",")]
    unknown = sorted(set(units) - set(all_units))
    if unknown:
        raise SystemExit(f"unknown unit(s) {unknown}; units are {', '.join(all_units)}")
    by_name = {ae.name: ae for ae in AUTOENCODERS}
    for unit in units:
        result_file = out / unit / "result.json"
        if result_file.is_file():
            continue
        print(f"== {unit}", flush=True)
        result = (train_autoencoder(by_name[unit], size, out) if unit in by_name
                  else train_diffusion(int(unit.removeprefix("unet-f")), size, out))
        result_file.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result), flush=True)
    results = gather(out)
    print(f"\nShapes World, size {args.size} ({dataclasses.asdict(size)}); {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"size": args.size, **dataclasses.asdict(size), "results": results}, indent=2)
                             + "\n")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
