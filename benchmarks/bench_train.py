"""Training throughput on this machine: 1 process against 2 torchrun ranks, and the speed options.

    python benchmarks/bench_train.py                 # UNet fine-tuning of the built-in model, 64 px
    python benchmarks/bench_train.py --steps 40 --what lora
    python benchmarks/bench_train.py --what vae --batch 16    # the built-in VAE's decoder, as its stages train it

Every row trains the same config (global batch ``--batch``, built-in world data) through the CLI
in a fresh process and reads the steps per second from its ``log.csv`` (training time only, the
first ``--warmup`` steps left out, so start-up and the latent cache do not count):

    1 process, 2 threads        the default single-process run
    1 process, 1 thread
    2 ranks x 1 thread          torchrun --nproc_per_node 2, batch per rank = batch / 2
    1 process + gradient checkpointing
    1 process + bf16 autocast
    2 ranks x 1 thread + bf16 autocast

A table is printed, and written as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from latentdiff.loading import BUILTIN_MODEL


def steps_per_second(log: Path, warmup: int) -> float:
    with log.open() as f:
        rows = [(int(r["step"]), float(r["seconds"])) for r in csv.DictReader(f)]
    (s0, t0), (s1, t1) = rows[warmup - 1], rows[-1]
    return (s1 - s0) / (t1 - t0)


def run(what: str, root: Path, name: str, *, ranks: int, threads: int, batch: int, steps: int,
        **options: object) -> float:
    config = {
        "pretrained": str(BUILTIN_MODEL), "data": "world", "world_length": 512, "resolution": 64, "max_steps": steps, "batch_size": batch // ranks,
        "lr": 1e-4, "warmup_steps": 0, "sample_every": 0, "checkpoint_every": 0, "export": False,
        "num_sample_images": 1,
    }
    if what == "vae":  # the decoder stages' loss: L1 + KL + the PatchGAN from step 0
        config.update(pretrained=str(BUILTIN_MODEL / "vae"), train_decoder_only=True, kl_weight=1e-6, disc_start=0,
                      disc_weight=0.1)
    else:
        config["sample_steps"] = 2
    config.update(options)
    path = root / f"{name}.toml"
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items()))
    out = root / name
    cli = ["-m", "latentdiff.cli", "train", what, "--config", str(path), "--out", str(out)]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, *launcher, *cli], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
    return steps_per_second(out / "log.csv", warmup=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", default="unet", choices=["unet", "lora", "vae"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8, help="global batch (split over the ranks)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = [
        ("1 process, 2 threads", dict(ranks=1, threads=2)),
        ("1 process, 1 thread", dict(ranks=1, threads=1)),
        ("2 ranks x 1 thread", dict(ranks=2, threads=1)),
        ("1 process + gradient checkpointing", dict(ranks=1, threads=2, gradient_checkpointing=True)),
        ("1 process + bf16 autocast", dict(ranks=1, threads=2, bf16=True)),
        ("2 ranks x 1 thread + bf16 autocast", dict(ranks=2, threads=1, bf16=True)),
    ]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, settings) in enumerate(rows):
            results[label] = run(args.what, Path(tmp), f"run{i}", batch=args.batch, steps=args.steps, **settings)
            print(f"  {label}: {results[label]:.2f} steps/s", file=sys.stderr)
    base = results[rows[0][0]]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").is_file() else platform.machine()
    print(f"\ntrain {args.what}, built-in model, 64 px, global batch {args.batch}, {os.cpu_count()} cores ({cpu}), "
          f"torch {torch.__version__}, bf16 native: {torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    print(f"| {'run':<36} | steps/s | images/s | vs default |")
    print(f"|{'-' * 38}|---------|----------|------------|")
    for label, value in results.items():
        print(f"| {label:<36} | {value:7.2f} | {value * args.batch:8.1f} | {value / base:9.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"what": args.what, "batch": args.batch, "steps_per_second": results}, indent=2))


if __name__ == "__main__":
    main()
