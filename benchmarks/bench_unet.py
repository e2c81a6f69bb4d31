"""SD 1.5 UNet, random weights, 256x256: latentdiff vs diffusers in one run.

Measures, each in a fresh subprocess so memory and import state don't leak
between libraries:
  - import time of the package,
  - cold load time of the UNet from one safetensors file (config + weights),
  - seconds per classifier-free-guidance step (batch 2 = cond + uncond, 32x32 latent),
  - peak resident memory of the whole process.

Usage:  .venv/bin/python benchmarks/bench_unet.py [--steps 3] [--workdir /tmp/ld-bench]
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
    t0 = time.perf_counter()
    lib, folder, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if lib == "latentdiff":
        import latentdiff
        load = lambda: latentdiff.load_component(folder)
    else:
        from diffusers import UNet2DConditionModel
        load = lambda: UNet2DConditionModel.from_pretrained(folder).eval()
    t_import = time.perf_counter() - t0
    import torch
    torch.manual_seed(0)
    t1 = time.perf_counter()
    unet = load()
    t_load = time.perf_counter() - t1
    x = torch.randn(2, 4, 32, 32)
    ctx = torch.randn(2, 77, 768)
    t = torch.tensor([500, 500])
    def step():
        with torch.no_grad():
            out = unet(x, t, ctx)
            return out if torch.is_tensor(out) else out.sample
    step()  # warm-up
    t2 = time.perf_counter()
    for _ in range(steps):
        step()
    per_step = (time.perf_counter() - t2) / steps
    # VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across fork + exec)
    hwm_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    rss_gib = hwm_kib / 2**20
    print(json.dumps({"import_s": t_import, "load_s": t_load, "step_s": per_step, "peak_rss_gib": rss_gib}))
    """
)


def make_weights(folder: Path) -> None:
    """Random sd15 UNet saved once as config.json + diffusion_pytorch_model.safetensors."""
    if (folder / "diffusion_pytorch_model.safetensors").is_file():
        return
    from latentdiff.checkpoints.diffusers_folder import save_component
    from latentdiff.models.unet import UNet2DCondition, UNetConfig

    torch.manual_seed(0)
    save_component(UNet2DCondition(UNetConfig.sd15()), folder, "unet")


def run_child(lib: str, folder: Path, steps: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, lib, str(folder), str(steps)], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="runs per library, alternating; best is kept")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/latentdiff-bench/unet-sd15"))
    args = parser.parse_args()
    make_weights(args.workdir)
    # Alternate the libraries and keep each one's best run, so background load hits both alike.
    runs: dict[str, list[dict[str, float]]] = {"latentdiff": [], "diffusers": []}
    for _ in range(args.repeats):
        for lib in runs:
            runs[lib].append(run_child(lib, args.workdir, args.steps))
    results = {lib: {key: min(r[key] for r in rs) for key in rs[0]} for lib, rs in runs.items()}
    print(f"\nSD 1.5 UNet, random weights, 256x256 (latent 32x32), float32, CPU: "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}\n")
    print("| measure | latentdiff | diffusers |")
    print("|---|---:|---:|")
    rows = [("import time (s)", "import_s", "{:.2f}"), ("cold load from safetensors (s)", "load_s", "{:.2f}"),
            ("seconds per CFG step (batch 2)", "step_s", "{:.2f}"), ("peak RSS (GiB)", "peak_rss_gib", "{:.2f}")]
    for label, key, fmt in rows:
        print(f"| {label} | {fmt.format(results['latentdiff'][key])} | {fmt.format(results['diffusers'][key])} |")


if __name__ == "__main__":
    main()
