"""Evaluation: FID (Frechet distance of Inception features), CLIP score, PSNR and SSIM, autoencoder metrics,
zero-shot accuracy of a world CLIP."""

from .autoencoder import autoencoder_metrics, reconstruct, world_reconstruction
from .inception import FIDInceptionV3, inception_features, load_fid_inception
from .metrics import (
    RunningStatistics,
    clip_score,
    clip_scores,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_stats,
    load_statistics,
    psnr,
    save_statistics,
    ssim,
)
from .zero_shot import zero_shot_accuracy

__all__ = [
    "autoencoder_metrics",
    "reconstruct",
    "world_reconstruction",
    "FIDInceptionV3",
    "inception_features",
    "load_fid_inception",
    "RunningStatistics",
    "clip_score",
    "clip_scores",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_stats",
    "load_statistics",
    "psnr",
    "save_statistics",
    "ssim",
    "zero_shot_accuracy",
]
