"""VAE and UNet trainers on tiny models: smoke runs, exact resume, atomic checkpoints, export, CLI."""

from __future__ import annotations

import csv
import errno
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

import latentdiff
from latentdiff.checkpoints.diffusers_folder import save_component
from latentdiff.models.clip import CLIPTextConfig, CLIPTextModel
from latentdiff.models.tokenizer import train_clip_bpe
from latentdiff.models.unet import UNet2DCondition, UNetConfig
from latentdiff.models.vae import AutoencoderKL, VAEConfig
from latentdiff.pipeline import Pipeline
from latentdiff.train import InMemorySource, TrainConfigError, UNetTrainConfig, VAETrainConfig, train_unet, train_vae
from latentdiff.train.build import seeded
from latentdiff.train.checkpoint import TrainCheckpointError, load_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


COLORS = {"red": (1.0, -0.8, -0.8), "blue": (-0.8, -0.6, 1.0), "green": (-0.8, 0.6, -0.6), "yellow": (1.0, 0.8, -0.8)}
CAPTIONS = [f"a {c} square on the {side}" for c in COLORS for side in ("left", "right")]


def synthetic_source(size: int = 16) -> InMemorySource:
    """Eight images: a coloured square on the left or right half of a gray canvas."""
    images = []
    for caption in CAPTIONS:
        color = COLORS[caption.split()[1]]
        image = torch.zeros(3, size, size)
        left = 2 if caption.endswith("left") else size // 2 + 1
        image[:, 4 : 4 + size // 3, left : left + size // 3] = torch.tensor(color).view(3, 1, 1)
        images.append(image)
    return InMemorySource(torch.stack(images), CAPTIONS)


def write_image_folder(folder: Path, source: InMemorySource, count: int | None = None) -> Path:
    """The first ``count`` items of ``source`` as ``i.png`` + ``i.txt`` in ``folder`` (a training data folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(len(source) if count is None else count):
        image, caption = source[i]
        Image.fromarray(((image + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    return folder


def tiny_pipeline() -> Pipeline:
    """Tiny random SD pipeline, the same every call."""
    tokenizer = train_clip_bpe(CAPTIONS, vocab_size=600)
    text_config = CLIPTextConfig.tiny().replace(
        vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    with seeded(0):
        return Pipeline(
            unet=UNet2DCondition(UNetConfig.tiny()), vae=AutoencoderKL(VAEConfig.tiny()),
            text_encoder=CLIPTextModel(text_config), tokenizer=tokenizer,
        )


def vae_config(out: Path, **changes) -> VAETrainConfig:
    base = dict(
        out_dir=str(out), model="tiny", max_steps=6, batch_size=2, grad_accum=2, lr=1e-3, disc_start=2,
        disc_layers=2, disc_channels=8, ema_decay=0.9, sample_every=3, checkpoint_every=0, num_sample_images=4,
    )
    return VAETrainConfig(**{**base, **changes})


def unet_config(out: Path, **changes) -> UNetTrainConfig:
    base = dict(
        out_dir=str(out), max_steps=6, batch_size=2, grad_accum=2, lr=1e-3, warmup_steps=3, caption_dropout=0.3,
        ema_decay=0.9, sample_every=3, checkpoint_every=0, num_sample_images=2, sample_steps=3,
    )
    return UNetTrainConfig(**{**base, **changes})


def assert_same_state(a, b, path: str = "") -> None:
    """Recursive bitwise equality of checkpoint contents."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(set(a) ^ set(b))}"
        for k in a:
            assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def read_log(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _without_run_details(state: dict) -> dict:
    """Drop wall time, the config (out_dir differs) and the global RNGs, which training never draws
    from: their states reflect the test process' history, not the run."""
    out = {k: v for k, v in state.items() if k not in ("seconds", "config")}
    out["rng"] = {"generators": state["rng"]["generators"]}
    return out


# ---------------------------------------------------------------------------- VAE
def test_vae_smoke_run_writes_everything(tmp_path) -> None:
    result = train_vae(vae_config(tmp_path), source=synthetic_source(), progress=False)
    assert result.step == 6
    rows = read_log(tmp_path / "log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert {"loss", "l1", "kl", "g_loss", "d_loss", "d_weight", "lr", "seconds"} <= set(rows[0])
    assert all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in rows)
    assert float(rows[0]["d_loss"]) == 0.0 and float(rows[-1]["d_loss"]) > 0.0  # delayed discriminator
    grid = Image.open(tmp_path / "samples" / "step_000006.png")
    assert grid.size == (4 * 18 + 2, 2 * 18 + 2)  # 4 originals over 4 reconstructions
    assert (tmp_path / "samples" / "step_000003.png").is_file()
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 6 and set(state["modules"]) == {"vae", "discriminator"} and "vae" in state["emas"]
    vae = latentdiff.load_component(tmp_path / "vae")
    assert isinstance(vae, AutoencoderKL)
    ema = state["emas"]["vae"]["shadow"]
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in ema.items())  # the export holds the EMA weights


def test_vae_resume_is_bitwise_exact(tmp_path) -> None:
    source = synthetic_source()
    train_vae(vae_config(tmp_path / "straight"), source=source, progress=False)
    train_vae(vae_config(tmp_path / "split", max_steps=3), source=source, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # changing max_steps only: no "will not match" warning
        train_vae(vae_config(tmp_path / "split"), source=source, resume=True, progress=False)
    straight = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    split = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert_same_state(_without_run_details(straight), _without_run_details(split))
    a, b = read_log(tmp_path / "straight" / "log.csv"), read_log(tmp_path / "split" / "log.csv")
    assert [(r["step"], r["loss"], r["d_loss"]) for r in a] == [(r["step"], r["loss"], r["d_loss"]) for r in b]


def test_existing_run_needs_resume(tmp_path) -> None:
    source = synthetic_source()
    train_vae(vae_config(tmp_path, max_steps=1), source=source, progress=False)
    with pytest.raises(FileExistsError, match="resume"):
        train_vae(vae_config(tmp_path, max_steps=2), source=source, progress=False)


def test_failed_checkpoint_save_keeps_the_previous_one(tmp_path, monkeypatch) -> None:
    """A write that fails half-way (ENOSPC) stops the run with a message saying why and what is
    kept; the previous checkpoint loads unchanged and no temporary file is left (the disk-full and
    kill tests in a real process are in test_train_faults.py)."""
    source = synthetic_source()
    train_vae(vae_config(tmp_path, max_steps=2), source=source, progress=False)
    before = load_checkpoint(tmp_path / "checkpoint.pt")

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("latentdiff.train.checkpoint.torch.save", broken_save)
    with pytest.raises(TrainCheckpointError, match=r"stopped at step 4: .*\(No space left on device\); the "
                                                   r"checkpoint of step 2 .* is kept"):
        train_vae(vae_config(tmp_path, max_steps=4), source=source, resume=True, progress=False)
    after = load_checkpoint(tmp_path / "checkpoint.pt")
    assert after["step"] == 2
    assert_same_state(before, after)
    assert not list(tmp_path.glob(".checkpoint.pt.*"))  # no temporary file left behind
    monkeypatch.undo()
    with (tmp_path / "checkpoint.pt").open("r+b") as f:
        f.truncate(100)
    with pytest.raises(TrainCheckpointError):
        load_checkpoint(tmp_path / "checkpoint.pt")


# ---------------------------------------------------------------------------- UNet
def test_unet_smoke_run_and_export(tmp_path) -> None:
    result = train_unet(unet_config(tmp_path), source=synthetic_source(), pipeline=tiny_pipeline(), progress=False)
    assert result.step == 6
    rows = read_log(tmp_path / "log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in rows)
    assert [float(r["lr"]) for r in rows[:4]] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3])
    grid = Image.open(tmp_path / "samples" / "step_000006.png")
    assert grid.size == (2 * 18 + 2, 18 + 2) and "a red square" in grid.text["prompts"]
    assert len(list((tmp_path / "cache").glob("latents-*.npy"))) == 1
    pipe = latentdiff.load(tmp_path / "model")
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    shadow = state["emas"]["unet"]["shadow"]
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in shadow.items())


def test_unet_resume_is_bitwise_exact(tmp_path) -> None:
    source = synthetic_source()
    train_unet(unet_config(tmp_path / "straight"), source=source, pipeline=tiny_pipeline(), progress=False)
    train_unet(unet_config(tmp_path / "split", max_steps=3), source=source, pipeline=tiny_pipeline(), progress=False)
    train_unet(unet_config(tmp_path / "split"), source=source, pipeline=tiny_pipeline(), resume=True, progress=False)
    straight = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    split = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert_same_state(_without_run_details(straight), _without_run_details(split))
    a, b = read_log(tmp_path / "straight" / "log.csv"), read_log(tmp_path / "split" / "log.csv")
    assert [(r["step"], r["loss"]) for r in a] == [(r["step"], r["loss"]) for r in b]


def test_unet_v_prediction_bf16_checkpointing_uncached_text(tmp_path) -> None:
    cfg = unet_config(tmp_path, max_steps=2, grad_accum=1, prediction_type="v_prediction", bf16=True,
                      gradient_checkpointing=True, cache_text=False, ema_decay=0.0, sample_every=0)
    result = train_unet(cfg, source=synthetic_source(), pipeline=tiny_pipeline(), progress=False)
    assert torch.isfinite(torch.tensor(result.last["loss"]))
    pipe = latentdiff.load(tmp_path / "model")
    assert pipe.schedule.prediction_type == "v_prediction"


def test_unet_from_component_files_and_fine_tuning(tmp_path) -> None:
    parts = tiny_pipeline()
    save_component(parts.vae, tmp_path / "parts" / "vae", "vae")
    save_component(parts.text_encoder, tmp_path / "parts" / "text_encoder", "text_encoder")
    parts.tokenizer.save(tmp_path / "parts" / "tokenizer")
    source = synthetic_source()
    scratch = unet_config(
        tmp_path / "scratch", max_steps=2, grad_accum=1, sample_every=0, unet="tiny",
        vae=str(tmp_path / "parts" / "vae"), text_encoder=str(tmp_path / "parts" / "text_encoder"),
        tokenizer=str(tmp_path / "parts" / "tokenizer"),
    )
    train_unet(scratch, source=source, progress=False)
    (cache,) = (tmp_path / "scratch" / "cache").glob("latents-*.npy")
    stamp = cache.stat().st_mtime_ns, cache.stat().st_ino
    # Fine-tuning the exported pipeline uses the same loop.
    tuned = unet_config(tmp_path / "tuned", max_steps=2, grad_accum=1, sample_every=0,
                        pretrained=str(tmp_path / "scratch" / "model"))
    result = train_unet(tuned, source=source, progress=False)
    assert result.step == 2 and (tmp_path / "tuned" / "model" / "model_index.json").is_file()
    # Resuming the first run reads its latent cache instead of re-encoding.
    train_unet(scratch.replace(max_steps=3), source=source, resume=True, progress=False)
    assert (cache.stat().st_mtime_ns, cache.stat().st_ino) == stamp


def test_unet_from_scratch_needs_its_frozen_parts(tmp_path) -> None:
    with pytest.raises(ValueError, match="text_encoder"):
        train_unet(unet_config(tmp_path, vae="x"), source=synthetic_source(), progress=False)


# ---------------------------------------------------------------------------- CLI
def test_cli_train_vae_from_folder_and_config(tmp_path) -> None:
    import argparse

    from latentdiff.train.cli import add_train_parser

    data = tmp_path / "data"
    data.mkdir()
    for i, caption in enumerate(CAPTIONS[:4]):
        image = synthetic_source(size=24)[i][0]
        Image.fromarray(((image + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(caption)
    config = tmp_path / "vae.toml"
    config.write_text(
        f'data = "{data}"\nresolution = 16\nbatch_size = 2\ndisc_layers = 2\ndisc_channels = 8\n'
        "disc_start = 1\nsample_every = 0\nnum_sample_images = 2\n"
    )
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "run"
    args = parser.parse_args(["train", "vae", "--config", str(config), "--out", str(out), "--steps", "2"])
    assert args.func(args) == 0
    args = parser.parse_args(["train", "vae", "--config", str(config), "--out", str(out), "--steps", "3", "--resume"])
    assert args.func(args) == 0
    assert [int(r["step"]) for r in read_log(out / "log.csv")] == [1, 2, 3]
    assert (out / "vae" / "config.json").is_file()
    # Without --resume an existing run is refused, with a message instead of a traceback.
    args = parser.parse_args(["train", "vae", "--config", str(config), "--out", str(out)])
    assert args.func(args) == 2


def test_fresh_vae_posterior_starts_narrow() -> None:
    from latentdiff.train.vae import start_with_small_variance

    with seeded(0):
        vae = AutoencoderKL(VAEConfig.tiny())
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert vae.encode(images).logvar.mean() > -2  # random init: std around 1
        start_with_small_variance(vae, -7.0)
        posterior = vae.encode(images)
    assert torch.allclose(posterior.logvar, torch.full_like(posterior.logvar, -7.0))
    assert posterior.mean.abs().mean() > 5 * posterior.std.mean()


def test_decoder_only_fine_tuning_keeps_the_encoder(tmp_path) -> None:
    with seeded(0):
        vae = AutoencoderKL(VAEConfig.tiny())
    save_component(vae, tmp_path / "vae0", "vae")
    source = InMemorySource(torch.rand(8, 3, 16, 16) * 2 - 1, ["x"] * 8)
    config = VAETrainConfig(out_dir=str(tmp_path / "ft"), pretrained=str(tmp_path / "vae0"), train_decoder_only=True,
                            max_steps=3, batch_size=4, sample_every=0, checkpoint_every=10, disc_start=1,
                            disc_layers=1)
    result = train_vae(config, source=source, progress=False)
    tuned = latentdiff.load_component(result.exported)
    before, after = vae.state_dict(), tuned.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoder.", "quant_conv.")))
    assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_diffusers(prediction_type) -> None:
    """diffusers' train_text_to_image weighting: compute_snr, min with gamma, / snr (or snr + 1)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from latentdiff.schedule import NoiseSchedule, ScheduleConfig
    from latentdiff.train.unet import min_snr_weights

    reference = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    t = torch.arange(1000)
    snr = compute_snr(reference, t)
    expected = torch.stack([snr, 5.0 * torch.ones_like(snr)]).min(dim=0)[0]
    expected = expected / (snr + 1) if prediction_type == "v_prediction" else expected / snr
    abar = NoiseSchedule(ScheduleConfig()).alphas_cumprod[t]
    torch.testing.assert_close(min_snr_weights(abar.float(), 5.0, prediction_type), expected.float(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_unet_loss_with_min_snr_and_noise_offset(tmp_path, prediction_type) -> None:
    """One micro-step's loss against the same draws done by hand: caption dropout, t, eps, then
    the offset (B, c, 1, 1); Min-SNR-gamma weights from diffusers' compute_snr."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from latentdiff.train.draws import sample_generator
    from latentdiff.train.unet import UNetTrainer, noisy_latents_and_target

    cfg = unet_config(tmp_path, min_snr_gamma=2.0, noise_offset=0.1, prediction_type=prediction_type,
                      caption_dropout=0.5, bf16=False, seed=7)
    trainer = UNetTrainer(cfg, source=synthetic_source(), pipeline=tiny_pipeline())
    indices, ids = [0, 1, 2], [40, 41, 42]
    loss = trainer._micro_step(indices, ids, accum=1)

    x0 = trainer.latents[indices]
    captions, t, eps = [], [], []
    for i, n in zip(indices, ids):  # each sample's own generator, seeded from (seed, stream 1, n)
        g = sample_generator(7, 1, n)
        captions.append("" if torch.rand((), generator=g) < 0.5 else trainer.captions[i])
        t.append(torch.randint(0, 1000, (), generator=g))
        e = torch.randn(x0.shape[1:], generator=g)
        eps.append(e + 0.1 * torch.randn((x0.shape[1], 1, 1), generator=g))
    t, eps = torch.stack(t), torch.stack(eps)
    abar = trainer.schedule.alphas_cumprod[t]
    x_t, target = noisy_latents_and_target(x0, eps, abar, prediction_type)
    with torch.no_grad():
        pred = trainer.unet(x_t, t, trainer.embed(captions))
    snr = compute_snr(DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"), t)
    weights = torch.stack([snr, 2.0 * torch.ones_like(snr)]).min(dim=0)[0]
    weights = weights / (snr + 1) if prediction_type == "v_prediction" else weights / snr
    expected = (((pred - target) ** 2).mean(dim=(1, 2, 3)) * weights).mean()
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(TrainConfigError, match="min_snr_gamma"):
        unet_config(tmp_path, min_snr_gamma=-1.0).validate()
