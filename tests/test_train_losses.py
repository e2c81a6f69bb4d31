"""Autoencoder losses, LPIPS loading, EMA math, warm-up LR, diffusion targets, caption dropout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from latentdiff.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig
from latentdiff.train.ema import EMA, ema_decay_at
from latentdiff.train.losses import (
    NLayerDiscriminator, adaptive_weight, disc_factor, generator_adv_loss, hinge_d_loss, kl_loss, l1_error,
)
from latentdiff.train.optim import scheduled_lr, warmup_lr
from latentdiff.train.unet import diffusion_draws, drop_captions, noisy_latents_and_target


def test_hinge_loss_values() -> None:
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = [0, 0.5, 2]
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + fake) = [0, 1, 2]
    expected = 0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3)
    assert hinge_d_loss(real, fake).item() == pytest.approx(expected)
    # A perfect discriminator (|logits| >= 1 on the right side) has zero loss.
    assert hinge_d_loss(torch.full((4,), 1.5), torch.full((4,), -3.0)).item() == 0.0
    assert generator_adv_loss(torch.tensor([1.0, 3.0])).item() == -2.0


def test_kl_matches_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 5, 5, generator=g)
    logvar = torch.randn(3, 4, 5, 5, generator=g)
    post = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    reference = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(kl_loss(post), reference, rtol=1e-5, atol=1e-5)
    # N(0, I) itself has zero KL.
    assert kl_loss(DiagonalGaussian(torch.zeros(2, 8, 3, 3))).item() == 0.0


def test_disc_factor_delayed_start() -> None:
    assert [disc_factor(s, 3) for s in range(5)] == [0.0, 0.0, 0.0, 1.0, 1.0]


def test_adaptive_weight_finite_and_discriminator_shape() -> None:
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig.tiny())
    disc = NLayerDiscriminator(3, ndf=8, n_layers=2, generator=torch.Generator().manual_seed(0))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon = vae(x).sample
    logits = disc(recon)
    assert logits.shape == (2, 1, 2, 2)
    rec = (x - recon).abs().sum() / 2
    weight = adaptive_weight(rec, generator_adv_loss(logits), vae.decoder.conv_out.weight)
    assert torch.isfinite(weight) and 0 < weight.item() <= 1e4
    assert not weight.requires_grad
    with pytest.raises(ValueError, match="too small"):
        NLayerDiscriminator(3, ndf=8, n_layers=3)(x)


def test_discriminator_init_is_reproducible() -> None:
    a = NLayerDiscriminator(ndf=8, n_layers=2, generator=torch.Generator().manual_seed(3))
    b = NLayerDiscriminator(ndf=8, n_layers=2, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_lpips_loads_user_weights(tmp_path) -> None:
    from safetensors.torch import save_file

    from latentdiff.train.lpips import LPIPS, vgg16_features

    torch.manual_seed(0)
    features = vgg16_features()
    vgg = {f"features.{k}": v for k, v in features.state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision files carry the classifier too: ignored
    save_file(vgg, tmp_path / "vgg16.safetensors")
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(lin, tmp_path / "vgg.pth")
    lpips = LPIPS.from_files(tmp_path / "vgg16.safetensors", tmp_path / "vgg.pth")
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert lpips(x, x).abs().max().item() < 1e-6
    d = lpips(x, y.requires_grad_(True))
    assert d.shape == (2, 1, 1, 1) and torch.isfinite(d).all() and (d > 0).all()
    d.sum().backward()
    assert y.grad is not None and all(p.grad is None for p in lpips.parameters())
    del lin["lin4.model.1.weight"]
    torch.save(lin, tmp_path / "bad.pth")
    with pytest.raises(Exception, match="lin4"):
        LPIPS.from_files(tmp_path / "vgg16.safetensors", tmp_path / "bad.pth")


def test_ema_update_math() -> None:
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.9, warmup=False)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)  # 0.9 * 1 + 0.1 * 3
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 1.2))
    ema.update(model)  # 0.9 * 1.2 + 0.1 * 3
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 1.38))
    target = nn.Linear(2, 1, bias=False)
    ema.copy_to(target)
    assert torch.allclose(target.weight, torch.full((1, 2), 1.38))
    # Round trip of the state.
    other = EMA(target, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.step == 2 and torch.equal(other.shadow["weight"], ema.shadow["weight"])


def test_ema_warmup_decay() -> None:
    assert ema_decay_at(0, 0.9999, warmup=True) == 0.0  # first update copies the model
    assert ema_decay_at(7, 0.9999, warmup=True) == pytest.approx(1 - 8 ** (-2 / 3))
    assert ema_decay_at(10**9, 0.9999, warmup=True) == 0.9999
    assert ema_decay_at(0, 0.9999, warmup=False) == 0.9999
    decays = [ema_decay_at(s, 0.999, warmup=True) for s in range(100)]
    assert decays == sorted(decays)


def test_warmup_lr_schedule() -> None:
    assert [warmup_lr(s, 1e-4, 4) for s in range(6)] == pytest.approx([2.5e-5, 5e-5, 7.5e-5, 1e-4, 1e-4, 1e-4])
    assert warmup_lr(0, 1e-4, 0) == 1e-4
    assert warmup_lr(9_999, 1e-4, 10_000) == 1e-4 and warmup_lr(4_999, 1e-4, 10_000) == pytest.approx(5e-5)


def test_cosine_schedule_after_warmup() -> None:
    lrs = [scheduled_lr(s, 1.0, 10, 110, 0.1) for s in range(200)]
    assert lrs[:10] == pytest.approx([warmup_lr(s, 1.0, 10) for s in range(10)])
    assert lrs[60] == pytest.approx(0.55) and lrs[110] == pytest.approx(0.1) and lrs[199] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # never rises once decaying
    assert [scheduled_lr(s, 1.0, 10, 0) for s in range(30)] == [warmup_lr(s, 1.0, 10) for s in range(30)]


def test_l1_error_tolerance() -> None:
    x = torch.zeros(1, 3, 2, 2)
    recon = torch.tensor([0.05, -0.3, 0.08, 0.5]).reshape(1, 1, 2, 2).expand(1, 3, 2, 2).clone().requires_grad_(True)
    assert torch.equal(l1_error(x, recon), recon.abs())
    err = l1_error(x, recon, tolerance=0.1)
    assert torch.allclose(err[0, 0].flatten(), torch.tensor([0.0, 0.2, 0.0, 0.4]))
    err.sum().backward()
    # no gradient for errors within the tolerance, the full L1 gradient for the others
    assert torch.equal(recon.grad[0, 0].flatten(), torch.tensor([0.0, -1.0, 0.0, 1.0]))


def test_caption_dropout_rate() -> None:
    """Per-sample draws: the dropout uniforms drop 10% of 20,000 captions; 0 and 1 are exact."""
    draws = diffusion_draws(list(range(20_000)), seed=0, latent_shape=(1, 1, 1), num_train_timesteps=1000,
                            noise_offset=0.0)
    captions = [f"caption {i}" for i in range(20_000)]
    dropped = drop_captions(captions, draws.dropout, 0.1)
    rate = sum(c == "" for c in dropped) / len(captions)
    assert abs(rate - 0.1) < 0.01  # 5 standard deviations
    assert all(d in ("", c) for c, d in zip(captions, dropped))
    assert drop_captions(captions, draws.dropout, 0.0) == captions
    assert drop_captions(captions, draws.dropout, 1.0) == [""] * len(captions)
    assert abs(draws.timesteps.float().mean().item() - 499.5) < 5 * 288.7 / 20_000 ** 0.5  # U{0..999}
    assert abs(draws.noise.std().item() - 1.0) < 0.02


def test_targets_epsilon_and_v() -> None:
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    abar = torch.tensor([0.9, 0.5, 0.01])
    x_t, target = noisy_latents_and_target(x0, eps, abar, "epsilon")
    a = abar.view(3, 1, 1, 1)
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps)
    assert torch.equal(target, eps)
    x_t, v = noisy_latents_and_target(x0, eps, abar, "v_prediction")
    # v recovers both x0 and eps from x_t.
    torch.testing.assert_close(a.sqrt() * x_t - (1 - a).sqrt() * v, x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((1 - a).sqrt() * x_t + a.sqrt() * v, eps, rtol=1e-5, atol=1e-5)
