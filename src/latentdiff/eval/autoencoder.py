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
