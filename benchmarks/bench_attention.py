"""Do the built-in model's cross-attention maps point at the objects? Measured on held-out captions.

    python benchmarks/bench_attention.py                 # 100 held-out captions (50 + 50), DDIM 20, guidance 7.5
    python benchmarks/bench_attention.py --n 400 --json docs/attention-localisation.json

For every held-out caption (never trained on) the built-in model generates an image while
:func:`latentdiff.explain.attention_maps` records each word's cross-attention map (mean over
layers, heads and steps). For each object the caption names, the map of its shape word must
peak in the object's grid cell (the world's 3 x 3 cells). Two cells are checked: the one the
caption asks for, and the one where the world's judge finds an object of that colour and
shape in the generated image (when it finds one: the map should follow what was drawn).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import latentdiff
from latentdiff.world import held_out_prompts, parse_caption
from latentdiff.world.judge import read_objects
from latentdiff.world.spec import GRID


def cell_of(x: int, y: int, width: int, height: int) -> tuple[int, int]:
    """The (row, col) grid cell of pixel (x, y)."""
    return min(GRID - 1, y * GRID // height), min(GRID - 1, x * GRID // width)


def shape_word_indices(words: list[str], shapes: list[str]) -> list[int | None]:
    """Index in ``words`` of each object's shape word, in caption order (the k-th object: the next occurrence)."""
    out: list[int | None] = []
    start = 0
    for shape in shapes:
        found = next((i for i in range(start, len(words)) if words[i] == shape), None)
        out.append(found)
        start = found + 1 if found is not None else start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="held-out captions (the first n: half one, half two objects)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--picture", type=Path, help="also save the first caption's explanation here")
    args = parser.parse_args()
    pipe = latentdiff.load(dtype=torch.float32)
    hits = {"captioned": {1: [], 2: []}, "drawn": {1: [], 2: []}}
    started = time.perf_counter()
    for i, prompt in enumerate(held_out_prompts(args.n)):
        spec = parse_caption(prompt)
        result = pipe.attention_maps(prompt, steps=args.steps, guidance_scale=args.guidance, sampler="ddim", seed=i,
                                     keep_x0=args.picture is not None and i == 0)
        if args.picture is not None and i == 0:
            result.save(args.picture)
        width, height = result.image.size
        detected = read_objects(np.asarray(result.image))
        count = len(spec.objects)
        for obj, index in zip(spec.objects, shape_word_indices(result.words, [o.shape for o in spec.objects])):
            if index is None:
                raise SystemExit(f"no word {obj.shape!r} in {result.words}")
            peak = cell_of(*result.peak(index), width, height)
            hits["captioned"][count].append(peak == obj.cell)
            drawn = [d.cell for d in detected if d.shape == obj.shape and d.colour == obj.colour]
            if drawn:
                hits["drawn"][count].append(peak in drawn)
        if (i + 1) % 20 == 0:
            print(f"  {i + 1}/{args.n}", file=sys.stderr)
    minutes = (time.perf_counter() - started) / 60

    def rate(values: list[bool]) -> float:
        return float(np.mean(values)) if values else float("nan")

    report = {
        "n": args.n, "steps": args.steps, "guidance": args.guidance, "minutes": round(minutes, 1),
        **{f"{which}_{k}": rate(hits[which][k]) for which in hits for k in (1, 2)},
        **{f"{which}_all": rate(hits[which][1] + hits[which][2]) for which in hits},
        **{f"{which}_objects": len(hits[which][1]) + len(hits[which][2]) for which in hits},
    }
    print(f"\nshape word's attention peak in the object's cell, {args.n} held-out captions, DDIM {args.steps}, "
          f"guidance {args.guidance} ({minutes:.1f} min)")
    print("| cell checked | one object | two objects | all | objects |")
    print("|---|---:|---:|---:|---:|")
    for which, label in (("captioned", "the caption's"), ("drawn", "where the judge found it")):
        print(f"| {label} | {report[f'{which}_1']:.1%} | {report[f'{which}_2']:.1%} | {report[f'{which}_all']:.1%} "
              f"| {report[f'{which}_objects']} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
