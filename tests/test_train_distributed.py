"""Data-parallel training: the same config learns the same model on 1 process with batch 4 as on
2 torchrun ranks with batch 2 (and as with 2 accumulation micro-batches of 2), up to float
rounding; only rank 0 writes; a run resumes at another world size."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_train_trainers import synthetic_source, tiny_pipeline

from latentdiff.train import TrainConfigError, UNetTrainConfig, VAETrainConfig, train_unet, train_vae

#: |update(2 ranks) - update(1 process)| / |update|: float rounding, amplified a little by Adam's
#: normalisation of near-zero gradients. Independent runs of other batches differ by ~0.8.
UPDATE_RTOL = 2e-3


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pipeline folder and a folder of 8 captioned 16 px images."""
    root = tmp_path_factory.mktemp("ddp")
    tiny_pipeline().save(root / "pipe")
    (root / "data").mkdir()
    source = synthetic_source()
    for i in range(len(source)):
        image, caption = source[i]
        Image.fromarray(((image + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(root / "data" / f"{i}.png")
        (root / "data" / f"{i}.txt").write_text(caption)
    return root


def write_config(root: Path, name: str, **settings) -> Path:
    base = dict(pretrained=str(root / "pipe"), data=str(root / "data"), resolution=16, max_steps=3, batch_size=2,
                lr=1e-3, warmup_steps=1, caption_dropout=0.3, sample_every=0, checkpoint_every=0, ema_decay=0.0,
                sample_steps=2, num_sample_images=1, noise_offset=0.05)
    lines = [f"{k} = {v!r}".replace("'", '"').replace("True", "true").replace("False", "false")
             for k, v in {**base, **settings}.items()]
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


def test_trainers_without_a_data_parallel_mode_refuse_torchrun(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(TrainConfigError, match="one process only"):
        train_vae(VAETrainConfig(out_dir=str(tmp_path), model="tiny", max_steps=1), source=synthetic_source(),
                  progress=False)
