"""Kernel choices measured on this machine, kept only where they win (SD 1.5 architecture, random weights).

  1. the UNet's CFG step (batch 2) at 256 px, float32 and bfloat16: plain convolutions,
     prepacked convolutions (latentdiff's default), channels_last, one thread vs all;
  2. scaled-dot-product attention on the CPU: the flash kernel (the default) vs the math one,
     at the UNet's first level (4096 tokens at 512 px);
  3. fused QKV: one (C, 3C) projection instead of three (C, C) ones, self-attention at 512 px;
  4. decoding one 512 px image: the KL VAE against TAESD;
  5. with ``--compile``: the UNet step under ``torch.compile`` (compile time and step time).

Each number is the median of a few runs after a warm-up, in this one process.

Usage:  .venv/bin/python benchmarks/bench_kernels.py [--compile]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from latentdiff.models.taesd import TAESDConfig, TinyAutoencoder
from latentdiff.models.unet import UNet2DCondition, UNetConfig
from latentdiff.models.vae import AutoencoderKL, VAEConfig
from latentdiff.speed import prepack_convolutions, unpack_convolutions


def median_seconds(fn, runs: int = 3) -> float:
    with torch.no_grad():
        fn()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def unet_rows() -> list[tuple[str, str, float]]:
    torch.manual_seed(0)
    base = UNet2DCondition(UNetConfig.sd15()).eval()
    x, ctx, t = torch.randn(2, 4, 32, 32), torch.randn(2, 77, 768), torch.tensor([500, 500])
    rows = []
    threads = torch.get_num_threads()
    for dtype in (torch.float32, torch.bfloat16):
        unet = copy.deepcopy(base).to(dtype)
        name = str(dtype).removeprefix("torch.")
        rows.append((name, "plain convolutions", median_seconds(lambda: unet(x, t, ctx))))
        prepack_convolutions(unet)
        rows.append((name, "prepacked convolutions (default)", median_seconds(lambda: unet(x, t, ctx))))
        torch.set_num_threads(1)
        rows.append((name, "prepacked, 1 thread", median_seconds(lambda: unet(x, t, ctx), runs=1)))
        torch.set_num_threads(threads)
        unpack_convolutions(unet)
        unet = unet.to(memory_format=torch.channels_last)
        xl = x.to(memory_format=torch.channels_last)
        rows.append((name, "channels_last", median_seconds(lambda: unet(xl, t, ctx), runs=1)))
    return rows


def attention_rows() -> list[tuple[str, str, float]]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(2, 8, 4096, 40, dtype=dtype)
        name = str(dtype).removeprefix("torch.")
        for label, backend in (("flash (default)", SDPBackend.FLASH_ATTENTION), ("math", SDPBackend.MATH)):
            with sdpa_kernel(backend):
                rows.append((name, f"SDPA {label}, 2x8 heads x 4096 tokens", median_seconds(
                    lambda: F.scaled_dot_product_attention(q, q, q))))
    return rows


def qkv_rows() -> list[tuple[str, str, float]]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 4096, 320, dtype=dtype)
        w = [torch.randn(320, 320, dtype=dtype) for _ in range(3)]
        fused = torch.cat(w)
        name = str(dtype).removeprefix("torch.")
        rows.append((name, "q, k, v: three projections (used)", median_seconds(lambda: [F.linear(x, wi) for wi in w])))
        rows.append((name, "q, k, v: one fused projection", median_seconds(lambda: F.linear(x, fused).chunk(3, -1))))
    return rows


def decode_rows() -> list[tuple[str, str, float]]:
    torch.manual_seed(0)
    z = torch.randn(1, 4, 64, 64)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        vae = prepack_convolutions(AutoencoderKL(VAEConfig.sd15()).eval().to(dtype))
        rows.append((name, "decode 512 px: KL VAE", median_seconds(lambda: vae.decode(z.to(dtype)), runs=1)))
        tiny = TinyAutoencoder(TAESDConfig.sd()).eval().to(dtype)
        rows.append((name, "decode 512 px: TAESD", median_seconds(lambda: tiny.decode(z.to(dtype)))))
    return rows


def compile_rows() -> list[tuple[str, str, float]]:
    torch.manual_seed(0)
    unet = UNet2DCondition(UNetConfig.sd15()).eval().to(torch.bfloat16)
    x, ctx, t = torch.randn(2, 4, 32, 32), torch.randn(2, 77, 768), torch.tensor([500, 500])
    unet.compile()
    t0 = time.perf_counter()
    with torch.no_grad():
        unet(x, t, ctx)
    first = time.perf_counter() - t0
    return [("bfloat16", "torch.compile: compile + first step", first),
            ("bfloat16", "torch.compile: step", median_seconds(lambda: unet(x, t, ctx)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (minutes)")
    args = parser.parse_args()
    print(f"\nKernel choices, CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} (median seconds)\n")
    print("| dtype | what | seconds |")
    print("|---|---|---:|")
    for rows in (unet_rows, attention_rows, qkv_rows, decode_rows) + ((compile_rows,) if args.compile else ()):
        for dtype, what, seconds in rows():
            print(f"| {dtype} | {what} | {seconds:.3f} |", flush=True)


if __name__ == "__main__":
    main()
