"""VQ-GAN training with the VAE trainer: the loss, EMA codebook updates and dead-code restarts
against hand formulas, usage logged and plotted, exact resume, an export diffusers' VQModel loads."""

from __future__ import annotations

import csv
from pathlib import Path

import diffusers
import pytest
import torch
from conftest import assert_rel_close
from test_train_trainers import assert_same_state, synthetic_source

from latentdiff.loading import load_vae
from latentdiff.models.vq import VQModel, VectorQuantizer
from latentdiff.train import TrainConfigError, VAETrainConfig, train_vae
from latentdiff.train.checkpoint import load_checkpoint
from latentdiff.train.codebook import CodebookState, quantisation_losses, usage
from latentdiff.train.vae import VAETrainer


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def vq_config(out: Path, **changes) -> VAETrainConfig:
    base = dict(out_dir=str(out), model="tiny", regularization="vq", num_codes=32, code_dim=3, max_steps=4,
                batch_size=2, grad_accum=2, lr=1e-3, disc_start=2, disc_layers=2, disc_channels=8, sample_every=2,
                checkpoint_every=0, num_sample_images=2, codebook_update="ema", dead_code_steps=2)
    return VAETrainConfig(**{**base, **changes})


def test_losses_usage_and_ema_update_by_hand() -> None:
    torch.manual_seed(0)
    q = VectorQuantizer(8, 3)
    h = torch.randn(2, 3, 2, 2)
    out = q(h)
    commitment, codebook = quantisation_losses(h, q, out.indices)
    codes = q.embedding.weight[out.indices].view(2, 2, 2, 3).permute(0, 3, 1, 2)
    assert commitment.item() == pytest.approx(((h - codes) ** 2).mean().item(), rel=1e-6)
    assert codebook.item() == pytest.approx(commitment.item(), rel=1e-6)  # the same value, gradients differ
    perplexity, share = usage(torch.tensor([0, 0, 1, 3]), 8)
    p = torch.tensor([0.5, 0.25, 0.25])
    assert perplexity == pytest.approx(float(torch.exp(-(p * p.log()).sum())))
    assert share == 3 / 8

    state = CodebookState(q)
    latents = h.permute(0, 2, 3, 1).reshape(-1, 3)
    before = q.embedding.weight.detach().clone()
    counts = torch.bincount(out.indices, minlength=8).float()
    sums = torch.zeros(8, 3).index_add_(0, out.indices, latents)
    restarts = state.update(q, latents, out.indices, ema=True, decay=0.9, dead_code_steps=0,
                            generator=torch.Generator().manual_seed(0))
    size = 0.9 * torch.ones(8) + 0.1 * counts
    smoothed = (size + 1e-5) / (size.sum() + 8e-5) * size.sum()
    expected = (0.9 * before + 0.1 * sums) / smoothed[:, None]
    assert restarts == 0 and torch.allclose(q.embedding.weight, expected, rtol=1e-6, atol=1e-7)

    unused = sorted(set(range(8)) - set(out.indices.tolist()))
    restarts = state.update(q, latents, out.indices, ema=False, decay=0.9, dead_code_steps=2,
                            generator=torch.Generator().manual_seed(1))
    assert restarts == len(unused) > 0  # idle for 2 steps now
    rows = {tuple(r) for r in latents.tolist()}
    assert all(tuple(q.embedding.weight[k].tolist()) in rows for k in unused)  # restarted at batch latents


def test_vq_run_logs_usage_plots_it_and_exports_a_diffusers_vqmodel(tmp_path: Path) -> None:
    result = train_vae(vq_config(tmp_path), source=synthetic_source(), progress=False)
    with (tmp_path / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {"vq_loss", "perplexity", "codes_used", "restarts"} <= set(rows[0]) and "kl" not in rows[0]
    assert all(1 <= float(r["perplexity"]) <= 32 and 0 < float(r["codes_used"]) <= 1 for r in rows)
    assert sum(float(r["restarts"]) for r in rows) > 0  # 32 codes, 2 x 2 x 64 latents: some go idle
    assert (tmp_path / "samples" / "codebook.png").is_file()
    vq = load_vae(result.exported)
    assert isinstance(vq, VQModel) and vq.config.num_vq_embeddings == 32 and vq.latent_channels == 3
    ref = diffusers.VQModel.from_pretrained(result.exported).eval()
    images = synthetic_source()[0][0][None]
    with torch.no_grad():
        assert_rel_close(vq(images).sample, ref(images).sample, 1e-5)


def test_vq_resume_is_bitwise_exact(tmp_path: Path) -> None:
    source = synthetic_source()
    train_vae(vq_config(tmp_path / "straight"), source=source, progress=False)
    train_vae(vq_config(tmp_path / "split", max_steps=2), source=source, progress=False)
    train_vae(vq_config(tmp_path / "split"), source=source, resume=True, progress=False)
    a, b = (load_checkpoint(tmp_path / run / "checkpoint.pt") for run in ("straight", "split"))
    assert_same_state({k: a[k] for k in ("modules", "optimizers", "emas")},
                      {k: b[k] for k in ("modules", "optimizers", "emas")})
    assert "codebook" in a["modules"] and "idle" in a["modules"]["codebook"]


def test_codebook_by_loss_trains_the_embedding(tmp_path: Path) -> None:
    trainer = VAETrainer(vq_config(tmp_path, codebook_update="loss", dead_code_steps=0, max_steps=1))
    assert trainer.vae.quantize.embedding.weight.requires_grad
    before = trainer.vae.quantize.embedding.weight.detach().clone()
    trainer.train_step(0)
    assert not torch.equal(before, trainer.vae.quantize.embedding.weight)
    ema = VAETrainer(vq_config(tmp_path / "ema", max_steps=1))
    assert not ema.vae.quantize.embedding.weight.requires_grad


def test_config_errors(tmp_path: Path) -> None:
    for bad, match in [({"regularization": "l2"}, "regularization"), ({"num_codes": 0}, "num_codes"),
                       ({"codebook_update": "sgd"}, "codebook_update"), ({"codebook_ema_decay": 1.0}, "decay")]:
        with pytest.raises(TrainConfigError, match=match):
            vq_config(tmp_path, **bad).validate()
