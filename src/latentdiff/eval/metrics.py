"""Image-generation metrics: Frechet distance (FID), CLIP score, PSNR and SSIM.

Conventions shared by the image metrics: a torch tensor is channels-first, (C, H, W) or
(B, C, H, W); a numpy array is channels-last, (H, W, C) or (B, H, W, C) (grey (H, W) is
allowed); PIL images and lists of any of these are accepted too. uint8 images are on the
0..255 scale, floating-point images on 0..1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.clip_model import CLIPModel, Images, image_list, image_preprocess

ArrayLike = Union[np.ndarray, Tensor]


# ---------------------------------------------------------------- Frechet distance

def _as_float64(x: ArrayLike, what: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} holds NaN or infinite values")
    return arr


def feature_statistics(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (N, D), float64, unbiased (``np.cov``, N - 1) as pytorch-fid."""
    feats = _as_float64(features, "features")
    if feats.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {feats.shape}")
    if feats.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {feats.shape[0]}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


class RunningStatistics:
    """Mean and covariance accumulated batch by batch (float64 sums), for sets too large to hold in memory.

    ``update(feats)`` with (n, D) batches, then ``statistics()`` gives what
    :func:`feature_statistics` would give on all rows at once (to rounding).
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.count = 0
        self._shift: np.ndarray | None = None  # the first row: sums are taken about it, for accuracy
        self._sum = np.zeros(dim)
        self._outer = np.zeros((dim, dim))

    def update(self, features: ArrayLike) -> None:
        feats = _as_float64(features, "features")
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"features must be (n, {self.dim}), got shape {feats.shape}")
        if feats.shape[0] == 0:
            return
        if self._shift is None:
            self._shift = feats[0].copy()
        centred = feats - self._shift
        self._sum += centred.sum(axis=0)
        self._outer += centred.T @ centred
        self.count += feats.shape[0]

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2 or self._shift is None:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.count}")
        mean_c = self._sum / self.count
        sigma = (self._outer - self.count * np.outer(mean_c, mean_c)) / (self.count - 1)
        return self._shift + mean_c, (sigma + sigma.T) / 2


def _psd_eigenvalues(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with rounding noise removed: those below the rank tolerance
    ``D * eps * max(w)`` (numpy's ``matrix_rank`` rule), negative ones included, become exactly 0,
    so the square roots of a rank-deficient matrix's null space add nothing."""
    tol = w.shape[0] * np.finfo(np.float64).eps * float(np.max(np.abs(w), initial=0.0))
    return np.where(w > tol, w, 0.0)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(_psd_eigenvalues(w))) @ v.T


def frechet_distance_from_stats(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Frechet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2), in float64.

        d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))

    The trace term is computed as sum(sqrt(eig(A))) with A = sigma1^(1/2) sigma2 sigma1^(1/2):
    A is similar to sigma1 sigma2 (same eigenvalues) but symmetric positive semi-definite, so a
    symmetric eigensolver applies; eigenvalues below the rank tolerance (rounding noise, negative
    ones included) count as 0, so a rank-deficient product's null space adds nothing.
    This avoids the general ``scipy.linalg.sqrtm`` of a non-symmetric, possibly singular
    product, which goes complex or inaccurate when covariances are rank deficient (fewer
    samples than feature dimensions) and needs pytorch-fid's ``eps * I`` retry. The result is
    clipped at 0 (a squared distance; only rounding can make it negative).
    """
    m1, m2 = _as_float64(mu1, "mu1").reshape(-1), _as_float64(mu2, "mu2").reshape(-1)
    s1, s2 = _as_float64(sigma1, "sigma1"), _as_float64(sigma2, "sigma2")
    d = m1.shape[0]
    if m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"statistics do not match: mu1 {m1.shape}, sigma1 {s1.shape}, mu2 {m2.shape}, sigma2 {s2.shape}"
        )
    root1 = _psd_sqrt(s1)
    a = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((a + a.T) / 2)
    trace_sqrt = float(np.sqrt(_psd_eigenvalues(eig)).sum())
    diff = m1 - m2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)
    return max(value, 0.0)


def frechet_distance(features_a: ArrayLike, features_b: ArrayLike) -> float:
    """Frechet distance between two feature sets (N, D) and (M, D) (FID, given Inception pool3 features)."""
    return frechet_distance_from_stats(*feature_statistics(features_a), *feature_statistics(features_b))


def save_statistics(path: str | Path, mu: ArrayLike, sigma: ArrayLike) -> None:
    """Write ``mu`` and ``sigma`` to a ``.npz`` file (pytorch-fid's key names), atomically."""
    from ..checkpoints.io import atomic_path

    mu_arr, sigma_arr = _as_float64(mu, "mu"), _as_float64(sigma, "sigma")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=mu_arr, sigma=sigma_arr)


def load_statistics(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``mu`` and ``sigma`` from a ``.npz`` file (as written by :func:`save_statistics` or pytorch-fid)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            if "mu" not in data or "sigma" not in data:
                raise ValueError(f"{path} lacks 'mu' and/or 'sigma' (holds {', '.join(data.files) or 'nothing'})")
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    except FileNotFoundError:
        raise ValueError(f"no such statistics file: {path}") from None
    except (OSError, EOFError) as err:
        raise ValueError(f"corrupt statistics file {path}: {err}") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
    return mu, sigma


# ---------------------------------------------------------------- CLIP score

def _token_ids(tokenizer: Callable[..., Any], texts: list[str]) -> Tensor:
    ids = tokenizer(texts)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long)


@torch.no_grad()
def clip_scores(
    images: Images,
    texts: str | Sequence[str],
    model: CLIPModel,
    tokenizer: Callable[..., Any],
    batch_size: int = 64,
) -> Tensor:
    """Per pair ``100 * cos(image embedding, text embedding)`` (N,), float32, not floored.

    Images are preprocessed with :func:`~latentdiff.models.clip_model.image_preprocess` at the
    model's image size; ``tokenizer(list_of_texts)`` must give ids (N, T) (latentdiff's
    ``CLIPTokenizer`` does; a transformers tokenizer's ``{"input_ids": ...}`` works too).
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    pictures = image_list(images)
    if len(pictures) != len(texts):
        raise ValueError(f"got {len(pictures)} images but {len(texts)} texts")
    if not texts:
        raise ValueError("no image-text pairs given")
    param = next(model.parameters())
    size = model.config.vision_config.image_size
    scores = []
    for start in range(0, len(texts), batch_size):
        pixels = image_preprocess(pictures[start: start + batch_size], size)
        ids = _token_ids(tokenizer, texts[start: start + batch_size])
        image_emb = model.encode_image(pixels.to(param.device, param.dtype)).float()
        text_emb = model.encode_text(ids.to(param.device)).float()
        scores.append(100 * F.cosine_similarity(image_emb, text_emb, dim=-1, eps=0).cpu())
    return torch.cat(scores)


def clip_score(
    images: Images,
    texts: str | Sequence[str],
    model: CLIPModel,
    tokenizer: Callable[..., Any],
    batch_size: int = 64,
) -> float:
    """CLIP score: the mean over image-text pairs of ``max(100 * cos(E_image, E_text), 0)``.

    This is the definition of Hessel et al. (2021), which torchmetrics' ``CLIPScore`` documents;
    torchmetrics' code floors the *mean* instead (``max(mean(100 cos), 0)``), which is the same
    number whenever no pair has a negative cosine (always the case for trained CLIP models in
    practice). :func:`clip_scores` gives the unfloored per-pair values for either aggregation.
    """
    return float(clip_scores(images, texts, model, tokenizer, batch_size).clamp_min(0).mean())


# ---------------------------------------------------------------- PSNR / SSIM

Reduction = Literal["mean", "none"]


def _image_pair(a: Images, b: Images, data_range: float | None) -> tuple[Tensor, Tensor, float]:
    """Both inputs as float64 (B, C, H, W) on their own scale, plus the data range."""
    xs, ys = image_list(a), image_list(b)
    if len(xs) != len(ys):
        raise ValueError(f"got {len(xs)} and {len(ys)} images")
    if not xs:
        raise ValueError("no images given")
    kinds = {t.dtype == torch.uint8 for t in xs + ys}
    if len(kinds) > 1:
        raise TypeError("one input is uint8 (0..255) and the other floating point (0..1): convert one of them")
    for x, y in zip(xs, ys):
        if x.shape != y.shape:
            raise ValueError(f"image shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if data_range is None:
        data_range = 255.0 if kinds == {True} else 1.0
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    return (torch.stack([x.double() for x in xs]), torch.stack([y.double() for y in ys]), float(data_range))


def _reduce(values: Tensor, reduction: Reduction) -> float | np.ndarray:
    if reduction == "mean":
        return float(values.mean())
    if reduction == "none":
        return values.numpy()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def psnr(a: Images, b: Images, data_range: float | None = None, reduction: Reduction = "mean") -> float | np.ndarray:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range^2 / MSE)``, per image, then averaged.

    ``data_range`` defaults to 255 for uint8 images and 1.0 for float images (skimage's choice
    for non-negative images). Identical images give ``inf``. A single image gives skimage's
    ``peak_signal_noise_ratio``; for a batch each image's PSNR is computed and the mean
    returned (``reduction="none"``: the per-image values).
    """
    x, y, data_range = _image_pair(a, b, data_range)
    mse = (x - y).pow(2).flatten(1).mean(dim=1)  # (B,)
    values = 10 * torch.log10(data_range**2 / mse)  # inf where the images are identical
    return _reduce(values, reduction)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    a: Images,
    b: Images,
    data_range: float | None = None,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    reduction: Reduction = "mean",
) -> float | np.ndarray:
    """Structural similarity (Wang et al. 2004) with a Gaussian window, per channel then averaged.

    As ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=...)``: local statistics from an 11-tap Gaussian
    (sigma 1.5, normalised), C1 = (k1 L)^2, C2 = (k2 L)^2, and the mean of the SSIM map over
    the pixels whose window lies inside the image (skimage pads, then crops the
    (win_size - 1) / 2 border; a valid convolution gives the same values). torchmetrics'
    ``structural_similarity_index_measure`` (1.9) computes the same map but averages it over
    the reflect-padded border too, so its number differs slightly (more on small images).
    ``data_range`` (L) defaults to 255 for uint8 and 1.0 for float images. Images must be at
    least ``win_size`` pixels each way. A batch gives the mean of per-image SSIMs
    (``reduction="none"``: the per-image values).
    """
    x, y, data_range = _image_pair(a, b, data_range)
    b_, c, h, w = x.shape
    if h < win_size or w < win_size:
        raise ValueError(f"images of {h}x{w} pixels are smaller than the {win_size}x{win_size} SSIM window")
    g = _gaussian_window(win_size, sigma)
    kernel_v = g.view(1, 1, win_size, 1).expand(c, 1, win_size, 1)
    kernel_h = g.view(1, 1, 1, win_size).expand(c, 1, 1, win_size)

    def blur(t: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H - win + 1, W - win + 1)
        return F.conv2d(F.conv2d(t, kernel_v, groups=c), kernel_h, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov_xy = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    values = ssim_map.flatten(2).mean(dim=2).mean(dim=1)  # per channel, then over channels: (B,)
    return _reduce(values, reduction)
