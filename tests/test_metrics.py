"""Evaluation metrics against reference implementations: scipy (FID formula), torchmetrics (CLIP score),
scikit-image (PSNR, SSIM)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _oracles import torch_fidelity_importable

from latentdiff.eval import (
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


# ------------------------------------------------------------------ Frechet distance

def _reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """pytorch-fid's formula: scipy.linalg.sqrtm of the (non-symmetric) product, float64."""
    linalg = pytest.importorskip("scipy.linalg")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def _feature_sets(n: int, m: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d)
    b = 1.3 * rng.normal(size=(m, d)) + 0.2
    return a, b


@pytest.mark.parametrize("n,m,d", [(300, 250, 16), (500, 400, 64), (40, 60, 64), (10, 12, 64), (30, 30, 128)])
def test_frechet_distance_matches_scipy_sqrtm(n, m, d):
    a, b = _feature_sets(n, m, d, seed=n + d)
    ours = frechet_distance(a, b)
    assert ours == pytest.approx(_reference_fid(a, b), rel=1e-6)
    assert frechet_distance(b, a) == pytest.approx(ours, rel=1e-9)  # symmetric
    assert frechet_distance(torch.from_numpy(a).float(), b) == pytest.approx(ours, rel=1e-4)  # tensors accepted


def test_frechet_distance_exact_on_commuting_rank_deficient_covariances():
    """Same eigenvectors: tr sqrt(S1 S2) = sum sqrt(d1 d2), exactly known, with zero eigenvalues."""
    rng = np.random.default_rng(0)
    d = 50
    v, _ = np.linalg.qr(rng.normal(size=(d, d)))
    d1, d2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    d1[:20] = 0  # rank 30
    d2[10:35] = 0  # rank 25
    s1, s2 = (v * d1) @ v.T, (v * d2) @ v.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    exact = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    assert frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize("n,d", [(500, 32), (20, 64)])
def test_identical_sets_give_zero(n, d):
    a, _ = _feature_sets(n, n, d, seed=3)
    mu, sigma = feature_statistics(a)
    assert abs(frechet_distance(a, a)) < 1e-6 * np.trace(sigma)
    assert frechet_distance(a, a) >= 0


def test_statistics_running_and_saved(tmp_path):
    a, _ = _feature_sets(301, 10, 24, seed=5)
    a += 100  # far from the origin: the running sums must not lose precision
    mu, sigma = feature_statistics(a)
    running = RunningStatistics(24)
    for start in range(0, 301, 64):
        running.update(torch.from_numpy(a[start: start + 64]))
    mu_r, sigma_r = running.statistics()
    np.testing.assert_allclose(mu_r, mu, rtol=1e-12)
    np.testing.assert_allclose(sigma_r, sigma, rtol=1e-9, atol=1e-12)
    save_statistics(tmp_path / "ref.npz", mu, sigma)
    mu_l, sigma_l = load_statistics(tmp_path / "ref.npz")
    np.testing.assert_array_equal(mu_l, mu)
    np.testing.assert_array_equal(sigma_l, sigma)
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ValueError, match="lacks"):
        load_statistics(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="no such"):
        load_statistics(tmp_path / "missing.npz")


def test_frechet_distance_input_errors():
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.random.rand(5, 4), np.random.rand(5, 3))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full((5, 4), np.nan), np.random.rand(5, 4))


# ------------------------------------------------------------------ CLIP score

@pytest.fixture(scope="module")
def clip_setup(tokenizer_dir, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from latentdiff.checkpoints.clip_folder import load_clip_model
    from latentdiff.models.clip_model import CLIPConfig
    from latentdiff.models.tokenizer import CLIPTokenizer

    hf_tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
    ours_tokenizer = CLIPTokenizer.from_folder(tokenizer_dir)
    base = CLIPConfig.tiny()
    config = base.replace(text_config=base.text_config.replace(
        vocab_size=len(hf_tokenizer), bos_token_id=hf_tokenizer.bos_token_id,
        eos_token_id=hf_tokenizer.eos_token_id, pad_token_id=hf_tokenizer.pad_token_id,
    ))
    torch.manual_seed(0)
    hf = transformers.CLIPModel(transformers.CLIPConfig.from_dict(config.to_dict())).eval()
    folder = tmp_path_factory.mktemp("clip_for_score")
    hf.save_pretrained(folder)
    size = config.vision_config.image_size
    image_processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    processor = transformers.CLIPProcessor(image_processor=image_processor, tokenizer=hf_tokenizer)
    return load_clip_model(folder), ours_tokenizer, hf, processor


CAPTIONS = [
    "a large red circle in the top left on a white background",
    "a small blue square in the center",
    "a photo of a cat sitting on a sofa",
    "green purple orange gray circles squares triangles",
]


def _images(seed: int, n: int = 4, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


class _Transformers4Features(torch.nn.Module):
    """torchmetrics 1.9 expects transformers 4's ``get_*_features`` returning tensors; transformers 5
    returns an output object whose ``pooler_output`` is that tensor. Nothing else changes."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs):
        out = self.model.get_image_features(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_text_features(self, *args, **kwargs):
        out = self.model.get_text_features(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_clip_score_matches_torchmetrics(clip_setup):
    torch_fidelity_importable()  # torchmetrics imports torch-fidelity, when installed, at import time
    pytest.importorskip("torchmetrics")
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    from torchmetrics.functional.multimodal.clip_score import clip_score as tm_clip_score

    model, tokenizer, hf, processor = clip_setup
    hf = _Transformers4Features(hf)
    checked_aggregate = False
    for seed in range(3):
        images = _images(seed)
        with torch.no_grad():
            ref_pairs, _ = _clip_score_update(images, CAPTIONS, hf, processor)
        ours_pairs = clip_scores(images, CAPTIONS, model, tokenizer)
        torch.testing.assert_close(ours_pairs, ref_pairs.float(), rtol=1e-5, atol=1e-4)
        # Hessel et al.'s definition: floor each pair, then average ...
        ours = clip_score(images, CAPTIONS, model, tokenizer)
        assert ours == pytest.approx(float(ref_pairs.clamp_min(0).mean()), rel=1e-5, abs=1e-4)
        # ... which is torchmetrics' number when no pair is negative (it floors the mean):
        # check it on the pairs this random model scores positive.
        keep = [i for i in range(len(CAPTIONS)) if ref_pairs[i] > 0]
        if keep:
            texts = [CAPTIONS[i] for i in keep]
            with torch.no_grad():
                ref = tm_clip_score(images[keep], texts, lambda: (hf, processor))
            assert clip_score(images[keep], texts, model, tokenizer) == pytest.approx(float(ref), rel=1e-5, abs=1e-4)
            checked_aggregate = True
    assert checked_aggregate


def test_clip_score_inputs(clip_setup):
    model, tokenizer, _, _ = clip_setup
    images = _images(7)
    reference = clip_scores(images, CAPTIONS, model, tokenizer)
    as_arrays = [img.permute(1, 2, 0).numpy() for img in images]  # numpy: channels last
    torch.testing.assert_close(clip_scores(as_arrays, CAPTIONS, model, tokenizer), reference)
    torch.testing.assert_close(clip_scores(images.float() / 255, CAPTIONS, model, tokenizer), reference,
                               rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(clip_scores(images, CAPTIONS, model, tokenizer, batch_size=3), reference,
                               rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="4 images but 3 texts"):
        clip_score(images, CAPTIONS[:3], model, tokenizer)


# ------------------------------------------------------------------ PSNR / SSIM

def _image_pair(seed: int, shape=(40, 37, 3)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0: shape[0], 0: shape[1]]
    base = 127 + 90 * np.sin(xx / 4.0)[..., None] * np.cos(yy / 6.0)[..., None] * np.linspace(1, -0.6, shape[2])
    noisy = base + rng.normal(scale=12, size=shape)
    return base.clip(0, 255).astype(np.uint8), noisy.clip(0, 255).astype(np.uint8)


def test_psnr_matches_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    a, b = _image_pair(0)
    assert psnr(a, b) == pytest.approx(metrics.peak_signal_noise_ratio(a, b, data_range=255), rel=1e-12)
    fa, fb = a / 255.0, b / 255.0
    assert psnr(fa, fb) == pytest.approx(metrics.peak_signal_noise_ratio(fa, fb, data_range=1.0), rel=1e-12)
    assert psnr(a, b, data_range=100) == pytest.approx(metrics.peak_signal_noise_ratio(a, b, data_range=100))
    # tensors are channels first; a batch averages per-image values
    c, d = _image_pair(1)
    batch_a = torch.from_numpy(np.stack([a, c])).permute(0, 3, 1, 2)
    batch_b = torch.from_numpy(np.stack([b, d])).permute(0, 3, 1, 2)
    per_image = psnr(batch_a, batch_b, reduction="none")
    np.testing.assert_allclose(per_image, [psnr(a, b), psnr(c, d)], rtol=1e-12)
    assert psnr(batch_a, batch_b) == pytest.approx(per_image.mean())
    assert psnr(a, a) == float("inf")
    with pytest.raises(TypeError, match="uint8"):
        psnr(a, fb)


@pytest.mark.parametrize("shape", [(40, 37, 3), (11, 16, 3), (64, 64, 1)])
def test_ssim_matches_skimage(shape):
    metrics = pytest.importorskip("skimage.metrics")
    a, b = _image_pair(2, shape)
    kwargs = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=-1)
    assert ssim(a, b) == pytest.approx(metrics.structural_similarity(a, b, data_range=255, **kwargs), rel=1e-10)
    fa, fb = a / 255.0, b / 255.0
    assert ssim(fa, fb) == pytest.approx(metrics.structural_similarity(fa, fb, data_range=1.0, **kwargs), rel=1e-10)
    assert ssim(a, a) == pytest.approx(1.0)


def test_ssim_batch_and_torchmetrics():
    torch_fidelity_importable()
    tm = pytest.importorskip("torchmetrics.functional.image")
    a, b = _image_pair(3, (48, 40, 3))
    c, d = _image_pair(4, (48, 40, 3))
    batch_a = torch.from_numpy(np.stack([a, c])).permute(0, 3, 1, 2).float() / 255
    batch_b = torch.from_numpy(np.stack([b, d])).permute(0, 3, 1, 2).float() / 255
    per_image = ssim(batch_a, batch_b, reduction="none")
    np.testing.assert_allclose(per_image, [ssim(a, b), ssim(c, d)], rtol=1e-5)
    # torchmetrics averages its SSIM map over the padded border too; its map's interior is ours.
    _, full_map = tm.structural_similarity_index_measure(
        batch_a.double(), batch_b.double(), data_range=1.0, reduction="none", return_full_image=True
    )
    interior = full_map[..., 5:-5, 5:-5].flatten(1).mean(1)
    np.testing.assert_allclose(ssim(batch_a.double(), batch_b.double(), reduction="none"), interior.numpy(),
                               rtol=1e-10)
    with pytest.raises(ValueError, match="smaller than the 11x11"):
        ssim(a[:10], b[:10])
