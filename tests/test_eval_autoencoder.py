"""Autoencoder metrics over a set: PSNR, SSIM and reconstruction FD agree with the metric functions."""

from __future__ import annotations

import numpy as np
import torch

from latentdiff.eval import frechet_distance, psnr, ssim
from latentdiff.eval.autoencoder import autoencoder_metrics, reconstruct
from latentdiff.models.vae import AutoencoderKL, VAEConfig


def pooled_features(images: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.adaptive_avg_pool2d(images, 2).flatten(1)  # (B, 12)


def test_metrics_match_the_metric_functions() -> None:
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig.tiny()).eval()
    images = torch.rand(20, 3, 16, 16) * 2 - 1
    result = autoencoder_metrics(vae, images, features=pooled_features, batch_size=8)
    recon = reconstruct(vae, images, batch_size=8)  # the same batches: conv results depend on batch size in the last bits
    a, b = (images + 1) / 2, (recon + 1) / 2
    assert result["n"] == 20
    assert np.isclose(result["psnr_db"], np.mean(psnr(a, b, data_range=1.0, reduction="none")))
    assert np.isclose(result["ssim"], np.mean(ssim(a, b, data_range=1.0, reduction="none")))
    assert np.isclose(result["fd"], frechet_distance(pooled_features(a), pooled_features(b)))


def test_a_perfect_autoencoder_scores_perfectly(monkeypatch) -> None:
    vae = AutoencoderKL(VAEConfig.tiny()).eval()
    images = torch.rand(12, 3, 16, 16) * 2 - 1
    monkeypatch.setattr("latentdiff.eval.autoencoder.reconstruct", lambda v, x, b=32: x.clone())
    result = autoencoder_metrics(vae, images, features=pooled_features)
    assert result["psnr_db"] == float("inf") and np.isclose(result["ssim"], 1.0) and abs(result["fd"]) < 1e-6


def test_world_reconstruction_judges_each_reconstruction_against_its_caption(monkeypatch) -> None:
    """A perfect autoencoder is judged right on every scene; one that inverts colours on none (the
    background, at least, reads wrong); PSNR and SSIM are the per-image means."""
    from latentdiff.eval.autoencoder import world_reconstruction

    vae = AutoencoderKL(VAEConfig.tiny()).eval()
    monkeypatch.setattr("latentdiff.eval.autoencoder.reconstruct", lambda v, x, b=32: x.clone())
    perfect = world_reconstruction(vae, n=12, batch_size=5)
    assert perfect["judged_correct"] == 1.0 and perfect["psnr_db"] == float("inf") and np.isclose(perfect["ssim"], 1.0)
    monkeypatch.setattr("latentdiff.eval.autoencoder.reconstruct", lambda v, x, b=32: -x)
    inverted = world_reconstruction(vae, n=12, batch_size=5)
    assert inverted["judged_correct"] == 0.0 and inverted["n"] == 12 and inverted["ssim"] < 0.5
