"""Data-parallel training: the same config learns the same model on 1 process with batch 4 as on
2 torchrun ranks with batch 2 (and as with 2 accumulation micro-batches of 2), up to float
rounding; only rank 0 writes; a run resumes at another world size."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_trainers import synthetic_source, tiny_pipeline, write_image_folder

from latentdiff.train import UNetTrainConfig, train_unet
from latentdiff.train.checkpoint import load_checkpoint

#: |update(2 ranks) - update(1 process)| / |update|: float rounding, amplified a little by Adam's
#: normalisation of near-zero gradients. Independent runs of other batches differ by ~0.8.
UPDATE_RTOL = 2e-3


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pipeline folder and a folder of 8 captioned 16 px images."""
    root = tmp_path_factory.mktemp("ddp")
    tiny_pipeline().save(root / "pipe")
    write_image_folder(root / "data", synthetic_source())
    return root


def write_config(root: Path, name: str, **settings) -> Path:
    base = dict(pretrained=str(root / "pipe"), data=str(root / "data"), resolution=16, max_steps=3, batch_size=2,
                lr=1e-3, warmup_steps=1, caption_dropout=0.3, sample_every=0, checkpoint_every=0, ema_decay=0.0,
                sample_steps=2, num_sample_images=1, noise_offset=0.05)
    lines = [f"{k} = {json.dumps(v)}" for k, v in {**base, **settings}.items() if v is not None]
    path = root / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def launch(root: Path, what: str, config: Path, out: Path, ranks: int, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "latentdiff.cli", "train", what, "--config", str(config), "--out", str(out), *extra]
    if ranks > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                   *command[1:]]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def losses(run: Path) -> list[float]:
    with (run / "log.csv").open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def relative_update_difference(a: dict, b: dict, init: dict) -> float:
    da = torch.cat([(a[k] - init[k]).flatten() for k in init])
    db = torch.cat([(b[k] - init[k]).flatten() for k in init])
    return float((da - db).norm() / da.norm())


UNET_FILE = "model/unet/diffusion_pytorch_model.safetensors"


def test_unet_two_ranks_batch_2_learn_what_one_process_batch_4_learns(setup: Path) -> None:
    one = launch(setup, "unet", write_config(setup, "b4", batch_size=4), setup / "one", 1)
    two = launch(setup, "unet", write_config(setup, "b2", batch_size=2), setup / "two", 2)
    init = load_file(setup / "pipe" / "unet" / "diffusion_pytorch_model.safetensors")
    a, b = load_file(setup / "one" / UNET_FILE), load_file(setup / "two" / UNET_FILE)
    assert relative_update_difference(a, b, init) < UPDATE_RTOL
    assert losses(setup / "two") == pytest.approx(losses(setup / "one"), rel=1e-5)
    assert len(losses(setup / "two")) == 3  # one log, written by rank 0 alone
    assert two.stdout.count("trained unet for 3 steps") == 1 and one.stdout.count("trained unet") == 1


def test_lora_two_ranks_resume_at_one(setup: Path) -> None:
    """2 ranks for 2 steps, then --resume on 1 process to 4, equals 4 steps on 1 process (batch 4)."""
    lora = dict(max_steps=4, lr=1e-2, rank=2, alpha=2.0, train_text_encoder=True)
    launch(setup, "lora", write_config(setup, "lora4", batch_size=4, **lora), setup / "lora-one", 1)
    split = write_config(setup, "lora2", batch_size=2, **lora)
    launch(setup, "lora", split, setup / "lora-split", 2, "--steps", "2")
    resumed = write_config(setup, "lora2r", batch_size=4, **lora)  # the same global batch on one process
    launch(setup, "lora", resumed, setup / "lora-split", 1, "--resume")
    a, b = load_file(setup / "lora-one" / "lora.safetensors"), load_file(setup / "lora-split" / "lora.safetensors")
    zero = {k: torch.zeros_like(v) if k.endswith("lora_up.weight") else v for k, v in a.items()}
    assert relative_update_difference(a, b, zero) < UPDATE_RTOL
    assert losses(setup / "lora-split") == pytest.approx(losses(setup / "lora-one"), rel=1e-4)


def test_accumulation_micro_batches_equal_one_batch(tmp_path: Path) -> None:
    """batch 4 x accum 1 and batch 2 x accum 2 draw the same samples with the same noise."""
    source = synthetic_source()
    runs = {}
    for name, batch, accum in [("b4", 4, 1), ("b2x2", 2, 2)]:
        cfg = UNetTrainConfig(out_dir=str(tmp_path / name), max_steps=3, batch_size=batch, grad_accum=accum, lr=1e-3,
                              warmup_steps=1, ema_decay=0.0, sample_every=0, checkpoint_every=0, export=False,
                              num_sample_images=1, sample_steps=2, min_snr_gamma=5.0)
        pipe = tiny_pipeline()
        init = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
        result = train_unet(cfg, source=source, pipeline=pipe, progress=False)
        runs[name] = (pipe.unet.state_dict(), result.last["loss"])
    assert relative_update_difference(runs["b4"][0], runs["b2x2"][0], init) < UPDATE_RTOL
    assert runs["b4"][1] == pytest.approx(runs["b2x2"][1], rel=1e-5)


def vae_files(run: Path) -> tuple[dict, dict]:
    return load_file(run / "vae" / "diffusion_pytorch_model.safetensors"), load_checkpoint(run / "checkpoint.pt")


@pytest.mark.parametrize("regularization", ["kl", "vq"])
def test_vae_with_gan_and_posterior_samples_is_world_size_invariant(setup: Path, regularization: str) -> None:
    """The discriminator's BatchNorm takes global-batch statistics and the adaptive GAN weight the
    all-reduced gradients, so the VAE trainer splits over ranks too (GAN on from step 0); a VQ-GAN's
    EMA codebook and dead-code restarts see the whole global batch in one process's order."""
    vae = dict(pretrained=None, model="tiny", max_steps=3, disc_start=0, disc_layers=2, disc_channels=8,
               sample_posterior=True, export=True, caption_dropout=None, noise_offset=None, sample_steps=None,
               regularization=regularization)
    if regularization == "vq":
        vae.update(num_codes=16, code_dim=3, codebook_update="ema", dead_code_steps=1)
    one, two = setup / f"{regularization}-one", setup / f"{regularization}-two"
    launch(setup, "vae", write_config(setup, f"{regularization}4", batch_size=4, **vae), one, 1)
    launch(setup, "vae", write_config(setup, f"{regularization}2", batch_size=2, **vae), two, 2)
    (a, ca), (b, cb) = vae_files(one), vae_files(two)
    init = {k: ca["modules"]["vae"][k] * 0 for k in a}  # updates relative to the weights' own size
    assert relative_update_difference(a, b, init) < 1e-5
    da, db = ca["modules"]["discriminator"], cb["modules"]["discriminator"]
    for key in da:  # BatchNorm running statistics and weights, as one process computes them
        torch.testing.assert_close(da[key].float(), db[key].float(), rtol=1e-3, atol=1e-5)
    with (one / "log.csv").open() as f, (two / "log.csv").open() as g:
        rows_one, rows_two = list(csv.DictReader(f)), list(csv.DictReader(g))
    keys = ("loss", "d_loss", "d_weight") + (("vq_loss", "perplexity", "restarts") if regularization == "vq" else ("kl",))
    for key in keys:
        assert [float(r[key]) for r in rows_two] == pytest.approx([float(r[key]) for r in rows_one], rel=1e-4)
    if regularization == "vq":
        assert sum(float(r["restarts"]) for r in rows_one) > 0


def test_clip_contrastive_loss_spans_the_ranks(tmp_path: Path) -> None:
    """2 ranks x 3 captions and 1 process x 6 give the same contrastive loss, accuracy and model."""
    clip = ("text_hidden_size = 32\ntext_layers = 2\ntext_heads = 2\ntext_intermediate_size = 48\n"
            "vision_image_size = 32\nvision_patch_size = 8\nvision_hidden_size = 32\nvision_layers = 2\n"
            "vision_heads = 2\nvision_intermediate_size = 48\nprojection_dim = 16\ntokenizer_captions = 400\n"
            "hard_negatives = 2\nlr = 1e-3\nwarmup_steps = 1\nmax_steps = 3\nsample_every = 0\n"
            "checkpoint_every = 0\nexport = false\nzero_shot_n = 4\nworld_seed = 3\n")
    for batch in (6, 3):
        (tmp_path / f"clip{batch}.toml").write_text(clip + f"batch_size = {batch}\n")
    launch(tmp_path, "clip", tmp_path / "clip6.toml", tmp_path / "one", 1)
    launch(tmp_path, "clip", tmp_path / "clip3.toml", tmp_path / "two", 2)
    a = load_checkpoint(tmp_path / "one" / "checkpoint.pt")["modules"]["clip"]
    b = load_checkpoint(tmp_path / "two" / "checkpoint.pt")["modules"]["clip"]
    zero = {k: v * 0 for k, v in a.items()}
    assert relative_update_difference(a, b, zero) < 1e-5
    with (tmp_path / "one" / "log.csv").open() as f, (tmp_path / "two" / "log.csv").open() as g:
        one, two = list(csv.DictReader(f)), list(csv.DictReader(g))
    for key in ("loss", "acc", "hard_acc", "logit_scale"):
        assert [float(r[key]) for r in two] == pytest.approx([float(r[key]) for r in one], rel=1e-4)
