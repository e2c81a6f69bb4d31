"""Autoencoder metrics over a set of images: PSNR, SSIM and reconstruction FD / FID.

Each image is encoded to its posterior mean and decoded; the reconstruction is compared
with the original pixel by pixel (PSNR, SSIM) and as a set (the Frechet distance between
the features of originals and reconstructions, with any feature extractor: the FID
InceptionV3 gives reconstruction FID, a CLIP image tower gives FD).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ..models.taesd import Autoencoder
from .metrics import frechet_distance, psnr, ssim

Features = Callable[[Tensor], Tensor]  # images (B, 3, H, W) in [0, 1] -> (B, D)


@torch.no_grad()
def reconstruct(vae: Autoencoder, images: Tensor, batch_size: int = 32) -> Tensor:
    """Encode (posterior mean) and decode: images (N, 3, H, W) in [-1, 1] -> the same shape, clamped."""
    dtype = next(vae.parameters()).dtype
    device = next(vae.parameters()).device
    out = [
        vae.decode(vae.encode(chunk.to(device, dtype)).mode()).float().clamp(-1, 1).cpu()
        for chunk in images.split(batch_size)
    ]
    return torch.cat(out)


def autoencoder_metrics(
    vae: Autoencoder, images: Tensor, features: Features | None = None, batch_size: int = 32
) -> dict[str, float]:
    """``psnr_db`` and ``ssim`` (means over images, on [0, 1] pixels) and, with ``features``,
    ``fd``: the Frechet distance between the features of originals and reconstructions."""
    recon = reconstruct(vae, images, batch_size)
    original01, recon01 = (images.float() + 1) / 2, (recon + 1) / 2  # (N, 3, H, W) in [0, 1]
    result = {
        "psnr_db": float(np.mean(psnr(original01, recon01, data_range=1.0, reduction="none"))),
        "ssim": float(np.mean(ssim(original01, recon01, data_range=1.0, reduction="none"))),
        "n": int(images.shape[0]),
    }
    if features is not None:
        with torch.no_grad():
            a = torch.cat([features(c) for c in original01.split(batch_size)])
            b = torch.cat([features(c) for c in recon01.split(batch_size)])
        result["fd"] = frechet_distance(a, b)
    return result


@torch.no_grad()
def world_reconstruction(vae: Autoencoder, n: int = 500, seed: int = 12345, batch_size: int = 50) -> dict[str, float]:
    """The autoencoder on ``n`` Shapes World scenes (world seed ``seed``, full captions): mean PSNR
    and SSIM on [0, 1] pixels, and ``judged_correct``, the share of reconstructions the world's
    judge reads as their scene's caption."""
    from ..world import WorldDataset, judge

    data = WorldDataset(seed=seed, length=n, partial_captions=False, as_tensor=True)
    correct, psnrs, ssims = [], [], []
    for start in range(0, n, batch_size):
        idx = range(start, min(n, start + batch_size))
        x = torch.stack([data[i][0] for i in idx])  # (B, 3, H, W) in [-1, 1]
        recon = reconstruct(vae, x, batch_size)
        psnrs += list(psnr((x + 1) / 2, (recon + 1) / 2, data_range=1.0, reduction="none"))
        ssims += list(ssim((x + 1) / 2, (recon + 1) / 2, data_range=1.0, reduction="none"))
        for i, r in zip(idx, recon):
            pixels = ((r.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()  # (H, W, 3) uint8
            correct.append(judge(pixels, data[i][1]).correct)
    return {"psnr_db": float(np.mean(psnrs)), "ssim": float(np.mean(ssims)),
            "judged_correct": float(np.mean(correct)), "n": n}
