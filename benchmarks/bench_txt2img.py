"""Text-to-image with the SD 1.5 architecture (random weights), 256x256, 20 steps: latentdiff vs diffusers.

Both libraries load the same diffusers folder and run the same sampler (DDIM, guidance 7.5,
one image) in a fresh subprocess each, in float32 and bfloat16. Prints seconds per image
and peak resident memory.

Usage:  .venv/bin/python benchmarks/bench_txt2img.py [--steps 20] [--size 256] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

CHILD = textwrap.dedent(
    """
    import json, sys, time
    import torch
    lib, folder, steps, size, dtype_name = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    dtype = getattr(torch, dtype_name)
    prompt = "a large red circle in the center on a white background"
    if lib == "latentdiff":
        import latentdiff
        pipe = latentdiff.load(folder, dtype=dtype)
        run = lambda: pipe.txt2img(prompt, width=size, height=size, steps=steps, guidance_scale=7.5,
                                   sampler="ddim", seed=0)
    else:
        import diffusers
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype)
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        run = lambda: pipe(prompt, width=size, height=size, num_inference_steps=steps, guidance_scale=7.5,
                           generator=[torch.Generator("cpu").manual_seed(0)]).images
    t0 = time.perf_counter()
    run()
    seconds = time.perf_counter() - t0
    # VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across fork + exec)
    hwm_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    rss_gib = hwm_kib / 2**20
    print(json.dumps({"s_per_image": seconds, "peak_rss_gib": rss_gib}))
    """
)


def make_pipeline(folder: Path) -> None:
    """A random SD 1.5-sized pipeline in the diffusers layout (tokenizer: a small BPE in CLIP's format)."""
    if (folder / "model_index.json").is_file():
        return
    from latentdiff.models.clip import CLIPTextConfig, CLIPTextModel
    from latentdiff.models.tokenizer import train_clip_bpe
    from latentdiff.models.unet import UNet2DCondition, UNetConfig
    from latentdiff.models.vae import AutoencoderKL, VAEConfig
    from latentdiff.pipeline import Pipeline

    torch.manual_seed(0)
    tokenizer = train_clip_bpe(["a large red circle in the center on a white background"] * 8, vocab_size=600)
    text_config = CLIPTextConfig.sd15().replace(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    pipe = Pipeline(
        unet=UNet2DCondition(UNetConfig.sd15()),
        vae=AutoencoderKL(VAEConfig.sd15()),
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tokenizer,
        name="sd15-random",
    )
    pipe.save(folder)


def run_child(lib: str, folder: Path, steps: int, size: int, dtype: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, lib, str(folder), str(steps), str(size), dtype],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/latentdiff-bench/sd15-random"))
    args = parser.parse_args()
    make_pipeline(args.workdir)
    print(f"\ntxt2img, SD 1.5 architecture with random weights, {args.size}x{args.size}, {args.steps} DDIM steps, "
          f"guidance 7.5, CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}\n")
    print("| dtype | latentdiff s/image | diffusers s/image | latentdiff peak RSS (GiB) | diffusers peak RSS (GiB) |")
    print("|---|---:|---:|---:|---:|")
    for dtype in ("float32", "bfloat16"):
        ours = run_child("latentdiff", args.workdir, args.steps, args.size, dtype)
        theirs = run_child("diffusers", args.workdir, args.steps, args.size, dtype)
        print(f"| {dtype} | {ours['s_per_image']:.1f} | {theirs['s_per_image']:.1f} | "
              f"{ours['peak_rss_gib']:.2f} | {theirs['peak_rss_gib']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
