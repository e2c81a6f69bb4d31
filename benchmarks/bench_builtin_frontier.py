"""The built-in model's speed / accuracy frontier: judged whole-caption accuracy against seconds
per image over sampler x steps x guidance x dtype x DeepCache, all in one run.

Every setting generates one image for each of the same held-out prompts (half one-object,
half two-object; seed = prompt index, in batches) and the world's judge scores them; the
first row is the model's old default (float32, DDIM 20, guidance 7.5), the reference of the
"within 1.5 points" bar.  Prints a Markdown table and writes a plot (accuracy vs s / image).

Usage:  .venv/bin/python benchmarks/bench_builtin_frontier.py [--prompts 400] [--plot docs/builtin-frontier.png]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_builtin import overall, prompt_adherence  # noqa: E402

import latentdiff  # noqa: E402
from latentdiff.eval.plot import Series, line_plot  # noqa: E402
from latentdiff.world import held_out_prompts  # noqa: E402

#: (dtype, sampler, steps, guidance, cache_interval)
SETTINGS = [
    ("float32", "ddim", 20, 7.5, 1),
    ("bfloat16", "ddim", 20, 7.5, 1),
    ("bfloat16", "ddim", 20, 7.5, 2),
    ("bfloat16", "ddim", 20, 7.5, 3),
    ("bfloat16", "ddim", 15, 7.5, 1),
    ("bfloat16", "ddim", 10, 7.5, 1),
    ("bfloat16", "ddim", 10, 7.5, 2),
    ("bfloat16", "ddim", 10, 5.0, 1),
    ("bfloat16", "euler", 10, 7.5, 1),
    ("bfloat16", "unipc", 10, 5.0, 1),
    ("bfloat16", "dpmpp_2m", 10, 5.0, 1),
]


#: with an LCM-LoRA (--lcm-lora): (dtype, steps) of the lcm sampler at guidance 1
LCM_SETTINGS = [("float32", 4), ("bfloat16", 2), ("bfloat16", 4), ("bfloat16", 8)]


def name_of(dtype: str, sampler: str, steps: int, guidance: float, cache: int) -> str:
    return f"{dtype} {sampler} {steps} w{guidance:g}" + (f" cache {cache}" if cache > 1 else "")


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy against seconds per image; settings that differ only in steps share a line."""
    families: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["steps"]):
        family = name_of(r["dtype"], r["sampler"], 0, r["guidance"], r["cache_interval"]).replace(" 0 ", " ")
        families.setdefault(family, []).append(r)
    series = [Series(name, [r["s_per_image"] for r in members], [100 * r["all"] for r in members],
                     [f"{r['steps']} steps" for r in members]) for name, members in families.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    line_plot(series, "Built-in model: judged accuracy vs time per image (held-out prompts)",
              "seconds per image (2 CPU cores)", "whole-caption accuracy, %", size=(900, 620)).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--replot", type=Path, default=None, help="only redraw --plot from a --json file")
    parser.add_argument("--lcm-lora", type=Path, default=None, help="also rows of the lcm sampler with this LCM-LoRA")
    parser.add_argument("--only-lcm", action="store_true", help="with --lcm-lora: the reference row and the LCM rows only")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.plot)
        return
    prompts = held_out_prompts(args.prompts)
    pipes = {d: latentdiff.load(args.model, dtype=d) for d in ("float32", "bfloat16")}
    print(f"\nBuilt-in model, {len(prompts)} held-out prompts (half one-, half two-object), CPU: "
          f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}\n")
    print("| setting | s / image | vs old default | 1 object | 2 objects | all | vs old default |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    settings = [(*s, None) for s in (SETTINGS[:1] if args.only_lcm else SETTINGS)]
    if args.lcm_lora:
        settings += [(d, "lcm", n, 1.0, 1, args.lcm_lora) for d, n in LCM_SETTINGS]
    for dtype, sampler, steps, guidance, cache, lora in settings:
        pipe = pipes[dtype]
        if lora is not None and not pipe.loras:
            pipe.load_lora(lora, name="lcm")
        prompt_adherence(pipe, prompts[:2], 2, steps, sampler=sampler, guidance_scale=guidance)  # warm-up
        t0 = time.perf_counter()
        report, _ = prompt_adherence(pipe, prompts, args.batch, steps, sampler=sampler, guidance_scale=guidance,
                                     cache_interval=cache)
        seconds = (time.perf_counter() - t0) / len(prompts)
        one, two, both = report["1 object"]["caption"], report["2 objects"]["caption"], overall(report)
        row = {"setting": name_of(dtype, sampler, steps, guidance, cache) + (" + LCM-LoRA" if lora else ""),
               "dtype": dtype, "sampler": sampler,
               "steps": steps, "guidance": guidance, "cache_interval": cache, "s_per_image": seconds,
               "one_object": one, "two_objects": two, "all": both}
        rows.append(row)
        ref = rows[0]
        print(f"| {row['setting']} | {seconds:.3f} | {seconds / ref['s_per_image']:.2f}x | {one:.1%} | {two:.1%} | "
              f"{both:.1%} | {100 * (both - ref['all']):+.1f} pt |", flush=True)
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
