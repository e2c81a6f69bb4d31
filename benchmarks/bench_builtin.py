"""The built-in Shapes World model, measured by the world's own judge (the issue's bar).

  1. prompt adherence: txt2img on the held-out prompts (never seen in training), guidance
     7.5, the default sampler and step count; whole-caption and per-attribute accuracy for
     one-object and two-object full captions;
  2. autoencoder: encode-decode of world images, judged against their full captions, PSNR;
  3. CLIP zero-shot: the right full caption ranked first among 9 that differ in one attribute,
     and per attribute, how often it ranks above a variant that changes that attribute;
  4. the fast default, where the folder ships an LCM-LoRA (``latentdiff generate``'s
     ``--preset fast``: bfloat16, the LoRA, LCM 8 steps, guidance 1) on the same prompts,
     against the slow settings of 1.

Writes a grid of prompts and outputs (``--grid``) and prints a Markdown table.

Usage:  .venv/bin/python benchmarks/bench_builtin.py [--model DIR] [--prompts 400] [--grid docs/builtin-grid.png]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import latentdiff
from latentdiff.eval import world_reconstruction
from latentdiff.world import accuracy_report, held_out_prompts, judge, parse_caption


def prompt_adherence(pipe: latentdiff.Pipeline, prompts: list[str], batch: int, steps: int,
                     **options) -> tuple[dict, list]:
    """Judge one image per prompt (seed = prompt index); ``options``: more generation options
    (default guidance 7.5, the default sampler)."""
    judged, images = [], []
    options = {"guidance_scale": 7.5, **options}
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        # seed + i per image: prompt k gets seed k, as if generated alone
        out = pipe.txt2img(chunk, steps=steps, seed=start, **options)
        images += out
        judged += [judge(np.asarray(im), p) for im, p in zip(out, chunk)]
    by_count: dict[str, list] = {"1 object": [], "2 objects": []}
    for j, p in zip(judged, prompts):
        by_count["1 object" if len(parse_caption(p).objects) == 1 else "2 objects"].append(j)
    return {k: accuracy_report(v) for k, v in by_count.items()}, images


def clip_zero_shot(model_dir: Path, n: int) -> dict | None:
    clip_dir = model_dir / "clip"
    if not (clip_dir / "config.json").is_file():
        return None
    from latentdiff.checkpoints.clip_folder import load_clip_model
    from latentdiff.models.tokenizer import CLIPTokenizer
    from latentdiff.eval.zero_shot import zero_shot_accuracy

    model = load_clip_model(clip_dir, dtype=torch.float32)
    return zero_shot_accuracy(model, CLIPTokenizer.from_folder(model_dir / "tokenizer"), n=n)


def fast_default(model_dir: Path, prompts: list[str], batch: int) -> dict | None:
    """Prompt adherence at ``--preset fast``, where the folder ships an LCM-LoRA."""
    from latentdiff.cli import FAST_LORA, PRESETS

    if not (model_dir / FAST_LORA).is_file():
        return None
    preset = PRESETS["fast"]
    pipe = latentdiff.load(model_dir, dtype=torch.bfloat16)
    pipe.load_lora(model_dir / FAST_LORA, name="lcm")
    report, _ = prompt_adherence(pipe, prompts, batch, preset["steps"], sampler=preset["sampler"],
                                 guidance_scale=preset["guidance"])
    return report


def overall(report: dict) -> float:
    """Whole-caption accuracy over one- and two-object captions together."""
    parts = [report[k] for k in ("1 object", "2 objects")]
    return sum(r["caption"] * r["n"] for r in parts) / sum(r["n"] for r in parts)


def save_grid(prompts: list[str], images: list[Image.Image], path: Path, scale: int = 3) -> None:
    """Prompt text above each upscaled output, 4 per row."""
    cell, text_h, cols = 64 * scale, 44, 4
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * (cell + 8), rows * (cell + text_h + 8)), "white")
    draw = ImageDraw.Draw(grid)
    for k, (prompt, image) in enumerate(zip(prompts, images)):
        x, y = (k % cols) * (cell + 8), (k // cols) * (cell + text_h + 8)
        words, lines = prompt.split(), [""]
        for w in words:
            lines[-1:] = [lines[-1] + " " + w] if len(lines[-1] + w) < 34 else [lines[-1], w]
        draw.multiline_text((x + 2, y + 2), "\n".join(line.strip() for line in lines[:4]), fill="black", spacing=1)
        grid.paste(image.resize((cell, cell), Image.NEAREST), (x, y + text_h))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the built-in model)")
    parser.add_argument("--prompts", type=int, default=400, help="held-out prompts (half one-, half two-object)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--ae-images", type=int, default=500)
    parser.add_argument("--grid", type=Path, default=None, help="write a grid PNG of the first 12 prompts")
    parser.add_argument("--json", type=Path, default=None, help="also write every number as JSON")
    args = parser.parse_args()
    model_dir = args.model or latentdiff.loading.BUILTIN_MODEL
    pipe = latentdiff.load(model_dir, dtype=torch.float32)
    prompts = held_out_prompts(args.prompts)
    t0 = time.perf_counter()
    adherence, images = prompt_adherence(pipe, prompts, args.batch, args.steps)
    seconds = time.perf_counter() - t0
    ae = world_reconstruction(pipe.vae, args.ae_images)
    zero_shot = clip_zero_shot(Path(model_dir), args.prompts)
    fast = fast_default(Path(model_dir), prompts, args.batch)
    if args.grid:
        save_grid(prompts[:12], images[:12], args.grid)

    print(f"\nModel {latentdiff.loading.shown_path(model_dir)}, held-out prompts, guidance 7.5, DDIM {args.steps} steps, "
          f"CPU: {platform.machine()}, {os.cpu_count()} cores ({seconds / len(prompts):.2f} s/image in batches of {args.batch})\n")
    print("| measure | result | bar |")
    print("|---|---:|---:|")
    one, two = adherence["1 object"], adherence["2 objects"]
    print(f"| whole-caption accuracy, 1-object full captions (n={one['n']}) | {one['caption']:.1%} | >= 97% |")
    print(f"| whole-caption accuracy, 2-object full captions (n={two['n']}) | {two['caption']:.1%} | >= 93% |")
    if fast is not None:
        slow, quick = overall(adherence), overall(fast)
        print(f"| fast default (bfloat16, LCM-LoRA, LCM 8 steps, guidance 1): 1 / 2 objects, all "
              f"| {fast['1 object']['caption']:.1%} / {fast['2 objects']['caption']:.1%}, {quick:.1%} "
              f"({100 * (quick - slow):+.1f} pt) | >= -1.5 pt |")
    print(f"| autoencoder reconstructions judged correct (n={ae['n']}) | {ae['judged_correct']:.1%} | >= 99% |")
    print(f"| autoencoder PSNR | {ae['psnr_db']:.1f} dB | >= 35 dB |")
    if zero_shot is not None:
        print(f"| CLIP zero-shot top-1 among 9 (n={zero_shot['n']}) | {zero_shot['accuracy']:.1%} | >= 90% |")
        for kind, value in zero_shot["pairwise"].items():
            print(f"| CLIP: right caption above a variant of its {kind} | {value:.1%} | >= 85% |")
    print("\nPer attribute (1 object | 2 objects):\n")
    print("| attribute | 1 object | 2 objects |")
    print("|---|---:|---:|")
    from latentdiff.world.judge import ATTRIBUTES

    for attr in ATTRIBUTES:
        cells = [f"{r[attr]:.1%}" if r[attr] is not None else "-" for r in (one, two)]
        print(f"| {attr} | {cells[0]} | {cells[1]} |")
    if args.json:
        args.json.write_text(json.dumps({"adherence": adherence, "fast_default": fast, "autoencoder": ae,
                                         "clip": zero_shot}, indent=2))


if __name__ == "__main__":
    main()
