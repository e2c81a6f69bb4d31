"""The built-in model without (top row) and with (bottom row) the trained negative-style LoRA.

    python examples/lora-negative/compare.py runs/lora-negative/negative.safetensors docs/lora-negative.png

Held-out captions of the built-in world (never trained on), DDIM 20 steps, guidance 7.5, seeds 0..5.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

import latentdiff
from latentdiff.train.grid import save_grid
from latentdiff.world import held_out_prompts


def pixels(images: list) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 127.5 - 1


def main(lora: str, out: str) -> None:
    prompts = held_out_prompts(6)
    pipe = latentdiff.load(dtype=torch.float32)
    settings = dict(steps=20, guidance_scale=7.5, sampler="ddim", seed=0)
    base = pipe.txt2img(prompts, **settings)
    pipe.load_lora(lora)
    styled = pipe.txt2img(prompts, **settings)
    save_grid(torch.cat([pixels(base), pixels(styled)]), out, nrow=len(prompts),
              text={"prompts": "\n".join(prompts), "rows": "base | with LoRA"})
    print("\n".join(prompts))


if __name__ == "__main__":
    main(*sys.argv[1:3])
