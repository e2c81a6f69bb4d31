"""Tiny-autoencoder distillation: the loss against an independent formula, frozen teacher and
halves, learning, exact resume, the export read by latentdiff and diffusers alike, errors, CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import latentdiff
from latentdiff import load_component
from latentdiff.models.taesd import TAESDConfig, TinyAutoencoder
from latentdiff.train import InMemorySource, TrainConfigError
from latentdiff.train.checkpoint import load_checkpoint
from latentdiff.train.taesd import TAESDTrainConfig, TAESDTrainer, train_taesd

from test_train_lcm import _same

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def source(size: int = 16, n: int = 6) -> InMemorySource:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    return InMemorySource(images, [f"image {i}" for i in range(n)])


def config(out: Path, teacher: Path, **changes) -> TAESDTrainConfig:
    base = dict(
        out_dir=str(out), teacher=str(teacher), model="tiny", max_steps=4, batch_size=2, grad_accum=2, lr=1e-3,
        warmup_steps=1, sample_every=0, checkpoint_every=0, num_sample_images=2, resolution=16,
    )
    return TAESDTrainConfig(**{**base, **changes})


def trainer(diffusers_dir: Path, out: Path, **changes) -> TAESDTrainer:
    return TAESDTrainer(config(out, diffusers_dir, **changes), source=source())


def test_loss_matches_an_independent_formula(diffusers_dir, tmp_path) -> None:
    tr = trainer(diffusers_dir, tmp_path, encoder_weight=0.7, l1_tolerance=0.05)
    images = source().images[:2]
    teacher = load_component(diffusers_dir / "vae", dtype=torch.float32)
    with torch.no_grad():
        moments = teacher.quant_conv(teacher.encoder(images))
        z = moments[:, :4] * teacher.config.scaling_factor  # scaled posterior mean
        enc = tr.taesd.encoder(images)
        dec = tr.taesd.decoder(z)
    expected_enc = ((enc - z) ** 2).mean()
    expected_dec = torch.relu((images - dec).abs() - 0.05).mean()
    terms = tr._micro_step(images, accum=1)
    assert terms["encoder_mse"] == pytest.approx(expected_enc.item(), rel=1e-6)
    assert terms["decoder_l1"] == pytest.approx(expected_dec.item(), rel=1e-6)
    assert terms["loss"] == pytest.approx(0.7 * expected_enc.item() + expected_dec.item(), rel=1e-6)


@pytest.mark.parametrize("half", ["encoder", "decoder"])
def test_teacher_and_the_untrained_half_stay_frozen(diffusers_dir, tmp_path, half) -> None:
    other = "decoder" if half == "encoder" else "encoder"
    tr = trainer(diffusers_dir, tmp_path, **{f"train_{other}": False})
    teacher_before = {k: v.clone() for k, v in tr.teacher.state_dict().items()}
    frozen_before = {k: v.clone() for k, v in getattr(tr.taesd, other).state_dict().items()}
    trained_before = {k: v.clone() for k, v in getattr(tr.taesd, half).state_dict().items()}
    for step in range(3):
        terms = tr.train_step(step)
    assert terms[f"{other}_mse" if other == "encoder" else f"{other}_l1"] == 0.0
    _same(tr.teacher.state_dict(), teacher_before, "teacher")
    _same(getattr(tr.taesd, other).state_dict(), frozen_before, other)
    changed = [k for k, v in getattr(tr.taesd, half).state_dict().items() if not torch.equal(v, trained_before[k])]
    assert changed, f"the {half} did not train"


def test_training_lowers_both_losses(diffusers_dir, tmp_path) -> None:
    tr = trainer(diffusers_dir, tmp_path, lr=3e-3, grad_accum=1, batch_size=6)
    first = tr.train_step(0)
    for step in range(1, 60):
        last = tr.train_step(step)
    assert last["encoder_mse"] < 0.5 * first["encoder_mse"]
    assert last["decoder_l1"] < 0.8 * first["decoder_l1"]


def test_resume_is_bitwise_exact(diffusers_dir, tmp_path) -> None:
    def run(out, resume=False, **changes):
        return train_taesd(config(out, diffusers_dir, ema_decay=0.9, **changes), source=source(),
                           resume=resume, progress=False)

    run(tmp_path / "straight")
    run(tmp_path / "split", max_steps=2)
    run(tmp_path / "split", resume=True)
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    for key in ("modules", "optimizers", "emas", "data", "step"):
        _same(a[key], b[key], key)
    weights = "taesd/diffusion_pytorch_model.safetensors"
    _same(load_file(str(tmp_path / "straight" / weights)), load_file(str(tmp_path / "split" / weights)), "export")


def test_export_decodes_alike_in_latentdiff_and_diffusers(diffusers_dir, tmp_path) -> None:
    from diffusers import AutoencoderTiny

    result = train_taesd(config(tmp_path / "run", diffusers_dir, max_steps=3), source=source(), progress=False)
    assert result.exported == tmp_path / "run" / "taesd"
    ours = load_component(result.exported, dtype=torch.float32)
    assert isinstance(ours, TinyAutoencoder)
    theirs = AutoencoderTiny.from_pretrained(result.exported).eval()
    images = source().images[:2]
    with torch.no_grad():
        z_ours = ours.encode(images).latents
        z_theirs = theirs.encode(images).latents
        torch.testing.assert_close(z_ours, z_theirs, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.decode(z_ours), theirs.decode(z_ours).sample, rtol=0, atol=1e-5)
    # usable as a pipeline's vae= at once
    pipe = latentdiff.load(diffusers_dir, vae=result.exported, dtype=torch.float32)
    out = pipe.txt2img("a red circle", width=16, height=16, steps=2, seed=0, output_type="latent")
    assert out.shape == (1, 4, 8, 8)


def test_config_errors_name_the_problem(diffusers_dir, tmp_path) -> None:
    with pytest.raises(TrainConfigError, match="teacher"):
        TAESDTrainConfig(out_dir=str(tmp_path)).validate()
    with pytest.raises(TrainConfigError, match="nothing to train"):
        config(tmp_path, diffusers_dir, train_encoder=False, train_decoder=False).validate()
    wrong = TinyAutoencoder(TAESDConfig(encoder_block_out_channels=(16, 16, 16), decoder_block_out_channels=(16, 16, 16),
                                        num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1)))
    with pytest.raises(TrainConfigError, match="downsampling factor"):
        TAESDTrainer(config(tmp_path, diffusers_dir), source=source(), student=wrong)
    wrong = TinyAutoencoder(dataclass_replace(TAESDConfig.tiny(), latent_channels=8))
    with pytest.raises(TrainConfigError, match="latent channels"):
        TAESDTrainer(config(tmp_path, diffusers_dir), source=source(), student=wrong)


def dataclass_replace(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def test_cli_trains_resumes_and_reports_bad_configs(diffusers_dir, tmp_path, capsys) -> None:
    from PIL import Image

    from latentdiff.cli import main

    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (80 * i, 100, 200 - 60 * i)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"image {i}")
    cfg = tmp_path / "taesd.toml"
    cfg.write_text(f'teacher = "{diffusers_dir}"\nmodel = "tiny"\ndata = "{data}"\nresolution = 16\n'
                   "batch_size = 2\nsample_every = 0\nnum_sample_images = 2\n")
    out = tmp_path / "run"
    assert main(["train", "taesd", "--config", str(cfg), "--out", str(out), "--steps", "2"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2
    assert (out / "taesd" / "config.json").is_file() and (out / "samples").is_dir()
    assert main(["train", "taesd", "--config", str(cfg), "--out", str(out), "--steps", "3", "--resume"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 3
    bad = tmp_path / "bad.toml"
    bad.write_text(f'teacher = "{diffusers_dir}"\ntrain_encoder = false\ntrain_decoder = false\n')
    assert main(["train", "taesd", "--config", str(bad)]) == 2
    assert "nothing to train" in capsys.readouterr().err
