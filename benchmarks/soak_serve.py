"""Soak test of ``latentdiff serve``: N built-in generations through the HTTP API, resident memory
sampled as it goes; prints a table and the drift from the warmed-up RSS to the end (bar: under 5%).

Usage:  .venv/bin/python benchmarks/soak_serve.py [--requests 500] [--every 50]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import requests

from latentdiff.budget import process_memory

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serve_helpers import live_server  # noqa: E402


def rss_bytes() -> int:
    rss = process_memory()
    if rss is None:
        raise RuntimeError("this system does not report the process' resident memory (/proc/self/statm)")
    return rss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=50, help="requests before the reference RSS is taken")
    args = parser.parse_args()
    prompts = ["a large red circle in the center on a white background",
               "a small blue square in the top left on a black background",
               "a large green triangle at the bottom on a gray background"]
    rows, reference = [], None
    with live_server() as (url, _app):
        start = time.perf_counter()
        for i in range(1, args.requests + 1):
            body = {"prompt": prompts[i % 3], "seed": i, "steps": 8, "width": 64, "height": 64,
                    "sampler_name": ["Euler", "DDIM", "DPM++ 2M"][i % 3]}
            r = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=120)
            r.raise_for_status()
            if i % 10 == 0:  # the page's polling, with previews
                requests.get(f"{url}/sdapi/v1/progress", timeout=10).raise_for_status()
            if i == args.warmup:
                reference = rss_bytes()
            if i % args.every == 0:
                rows.append((i, rss_bytes(), time.perf_counter() - start))
    print(f"\nlatentdiff serve soak: {args.requests} built-in txt2img requests (64 px, 8 steps), "
          f"{platform.machine()}, {os.cpu_count()} cores\n")
    print("| requests | RSS (MiB) | seconds |")
    print("|---:|---:|---:|")
    for i, rss, seconds in rows:
        print(f"| {i} | {rss / 2**20:.1f} | {seconds:.1f} |")
    end = rows[-1][1]
    drift = (end - reference) / reference
    print(f"\nRSS after {args.warmup} requests {reference / 2**20:.1f} MiB, after {args.requests} "
          f"{end / 2**20:.1f} MiB: drift {drift:+.2%} (bar: under 5%)")


if __name__ == "__main__":
    main()
