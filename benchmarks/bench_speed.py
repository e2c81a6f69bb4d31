"""Whole txt2img speed, latentdiff vs diffusers, SD 1.5 architecture with random weights.

Both libraries load the same diffusers folder (and the same tiny-autoencoder folder), each
row in a fresh subprocess: cold start (import + load) and seconds per image of one 1-image
generation after a warm-up generation (DDIM, guidance 7.5 unless the row says otherwise),
and the process's peak resident memory.

Rows: diffusers float32 / bfloat16; latentdiff float32 / its default (dtype chosen for the
machine) / default + TAESD decode / default + DeepCache / LCM 4 steps (guidance 1) + TAESD;
diffusers LCM 4 steps + TAESD for comparison.

Usage:  .venv/bin/python benchmarks/bench_speed.py [--sizes 256,512] [--steps 10] [--rows all|NAME,...]
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
    spec = json.loads(sys.argv[1])
    prompt = "a large red circle in the center on a white background"
    lib, size, steps = spec["lib"], spec["size"], spec["steps"]
    if lib == "latentdiff":
        import latentdiff
    else:
        import diffusers
    import torch
    t_import = time.perf_counter() - t0
    t1 = time.perf_counter()
    if lib == "latentdiff":
        pipe = latentdiff.load(spec["model"], dtype=spec.get("dtype"), vae=spec.get("vae"))
        options = dict(width=size, height=size, steps=steps, guidance_scale=spec["guidance"],
                       sampler=spec["sampler"], seed=0, **spec.get("options", {}))
        run = lambda: pipe.txt2img(prompt, **options)
        chosen = str(pipe.dtype).removeprefix("torch.")
    else:
        dtype = getattr(torch, spec["dtype"])
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(spec["model"], torch_dtype=dtype)
        if spec.get("vae"):
            pipe.vae = diffusers.AutoencoderTiny.from_pretrained(spec["vae"], torch_dtype=dtype)
        cls = {"ddim": diffusers.DDIMScheduler, "lcm": diffusers.LCMScheduler}[spec["sampler"]]
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        run = lambda: pipe(prompt, width=size, height=size, num_inference_steps=steps,
                           guidance_scale=spec["guidance"], generator=[torch.Generator("cpu").manual_seed(0)]).images
        chosen = spec["dtype"]
    t_load = time.perf_counter() - t1
    run()  # warm-up (first-call allocations, oneDNN kernel choice)
    t2 = time.perf_counter()
    run()
    seconds = time.perf_counter() - t2
    # VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across fork + exec)
    hwm_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"s_per_image": seconds, "cold_s": t_import + t_load, "peak_rss_gib": hwm_kib / 2**20,
                      "dtype": chosen}))
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


def make_taesd(folder: Path) -> None:
    """A random SD tiny autoencoder in diffusers' AutoencoderTiny layout."""
    if (folder / "config.json").is_file():
        return
    from latentdiff.checkpoints.io import write_safetensors
    from latentdiff.models.taesd import TAESDConfig, TinyAutoencoder

    torch.manual_seed(0)
    model = TinyAutoencoder(TAESDConfig.sd())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    write_safetensors(model.state_dict(), folder / "diffusion_pytorch_model.safetensors")


def rows(model: Path, taesd: Path, steps: int) -> dict[str, dict]:
    base = {"model": str(model), "steps": steps, "guidance": 7.5, "sampler": "ddim"}
    lcm = {"steps": 4, "guidance": 1.0, "sampler": "lcm", "vae": str(taesd)}
    return {
        "diffusers float32": {**base, "lib": "diffusers", "dtype": "float32"},
        "diffusers bfloat16": {**base, "lib": "diffusers", "dtype": "bfloat16"},
        "latentdiff float32": {**base, "lib": "latentdiff", "dtype": "float32"},
        "latentdiff default": {**base, "lib": "latentdiff"},
        "latentdiff default + TAESD": {**base, "lib": "latentdiff", "vae": str(taesd)},
        "latentdiff default + DeepCache 3": {**base, "lib": "latentdiff", "options": {"cache_interval": 3}},
        "latentdiff LCM 4 steps + TAESD": {**base, "lib": "latentdiff", **lcm},
        "diffusers bfloat16 LCM 4 steps + TAESD": {**base, "lib": "diffusers", "dtype": "bfloat16", **lcm},
    }


def run_child(spec: dict) -> dict:
    env = {**os.environ}
    env.pop("LATENTDIFF_DTYPE", None)  # "default" means the machine's own choice
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], check=True, capture_output=True, text=True,
                         env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", default="all", help="comma-separated row names (default all)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/latentdiff-bench"))
    parser.add_argument("--json", type=Path, help="also write the numbers as JSON")
    args = parser.parse_args()
    model, taesd = args.workdir / "sd15-random", args.workdir / "taesd-random"
    make_pipeline(model)
    make_taesd(taesd)
    table = rows(model, taesd, args.steps)
    wanted = list(table) if args.rows == "all" else [r.strip() for r in args.rows.split(",")]
    cpu = platform.processor() or platform.machine()
    print(f"\nWhole txt2img, SD 1.5 architecture with random weights, one image, DDIM {args.steps} steps at "
          f"guidance 7.5 unless the row says otherwise; CPU: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}\n")
    results: dict[str, dict] = {}
    for size in [int(s) for s in args.sizes.split(",")]:
        print(f"\n{size}x{size}\n")
        print("| run | dtype | s / image | vs diffusers fp32 | vs diffusers bf16 | cold start s | peak RSS GiB |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for name in wanted:
            r = run_child({**table[name], "size": size})
            results[f"{size} {name}"] = r
            fp32, bf16 = results.get(f"{size} diffusers float32"), results.get(f"{size} diffusers bfloat16")
            ratio = lambda ref: f"{r['s_per_image'] / ref['s_per_image']:.2f}x" if ref else "-"
            print(f"| {name} | {r['dtype']} | {r['s_per_image']:.2f} | {ratio(fp32)} | {ratio(bf16)} | "
                  f"{r['cold_s']:.1f} | {r['peak_rss_gib']:.2f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
                                         "steps": args.steps, "results": results}, indent=2))


if __name__ == "__main__":
    main()
