"""A style to teach the built-in model with a LoRA: Shapes World scenes as photographic negatives.

    python examples/lora-negative/make_data.py runs/negative-data      # 512 images + .txt captions

Each image is a training scene of the built-in world with its colours inverted (255 - value);
its caption is the scene's own, unchanged, so the LoRA learns a look, not new words.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

from latentdiff.world import WorldDataset


def main(folder: str, count: int = 512, seed: int = 7) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    world = WorldDataset(seed, count)
    for i in range(count):
        item = world.sample(i)
        Image.fromarray(255 - item.image).save(out / f"{i:04d}.png")
        (out / f"{i:04d}.txt").write_text(item.caption + "\n", encoding="utf-8")
    print(f"{count} images in {out}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
