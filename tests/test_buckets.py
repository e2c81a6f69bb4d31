"""Aspect-ratio buckets: the bucket table, nearest-aspect assignment, cover-and-crop, whole-bucket
batches, and a UNet run on images of three shapes (latents per bucket, exact resume)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train_trainers import assert_same_state, tiny_pipeline

from latentdiff.train import TrainConfigError, UNetTrainConfig, train_unet
from latentdiff.train.buckets import BucketOrder, bucket_sizes, fit_to_bucket, nearest_bucket
from latentdiff.train.checkpoint import load_checkpoint
from latentdiff.train.data import TrainDataError, to_image_tensor
from latentdiff.train.unet import UNetTrainer


@pytest.mark.parametrize("resolution, step, ratio", [(512, 64, 2.0), (768, 64, 1.5), (64, 8, 2.0)])
def test_bucket_table(resolution: int, step: int, ratio: float) -> None:
    sizes = bucket_sizes(resolution, step, ratio)
    area = resolution * resolution
    assert (resolution, resolution) in sizes
    for w, h in sizes:
        assert w % step == 0 and h % step == 0 and w * h <= area
        assert max(w / h, h / w) <= ratio + 1e-9
        assert w * (h + step) > area  # as tall as the area allows for its width
        assert (h, w) in sizes  # portrait and landscape alike
    aspects = [w / h for w, h in sizes]
    assert aspects == sorted(aspects) and len(set(sizes)) == len(sizes)
    if (resolution, step, ratio) == (512, 64, 2.0):
        assert sizes == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    with pytest.raises(TrainDataError, match="step"):
        bucket_sizes(64, 128)


def test_nearest_bucket_and_fit() -> None:
    sizes = bucket_sizes(512, 64, 2.0)
    assert sizes[nearest_bucket(1920, 1080, sizes)] == (640, 384)  # 1.78 -> 1.67, the nearest in log ratio
    assert sizes[nearest_bucket(1000, 1000, sizes)] == (512, 512)
    assert sizes[nearest_bucket(600, 1000, sizes)] == (384, 640)
    pixels = np.random.default_rng(0).integers(0, 256, (90, 160, 3), dtype=np.uint8)  # (H, W, 3)
    fitted = fit_to_bucket(to_image_tensor(pixels), (64, 48))
    # PIL: cover 64 x 48 (scale max(64/160, 48/90) = 0.533 -> 85 x 48), crop the middle 64 columns
    expected = Image.fromarray(pixels).resize((85, 48), Image.Resampling.BICUBIC).crop((10, 0, 74, 48))
    assert fitted.shape == (3, 48, 64) and torch.equal(fitted, to_image_tensor(expected))
    same = to_image_tensor(pixels[:48, :64])
    assert fit_to_bucket(same, (64, 48)) is same


def test_bucket_order_batches_are_whole_and_from_one_bucket() -> None:
    groups = [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12, 13]]
    order = BucketOrder(groups, batch=3, seed=1)
    epoch = [order.next(3) for _ in range(len(order.batches(0)))]
    assert len(epoch) == 2 + 1 + 3  # ceil(5/3) + ceil(2/3) + ceil(7/3)
    member = {i: b for b, g in enumerate(groups) for i in g}
    assert all(len(batch) == 3 and len({member[i] for i in batch}) == 1 for batch in epoch)
    assert set().union(*map(set, epoch)) == set(range(14))  # every item at least once per epoch
    assert order.epoch == 1 and order.batches(1) != order.batches(0)
    state = order.state_dict()
    following = [order.next(3) for _ in range(4)]
    again = BucketOrder(groups, batch=3, seed=1)
    again.load_state_dict(state)
    assert [again.next(3) for _ in range(4)] == following
    with pytest.raises(TrainDataError, match="batches of 3"):
        BucketOrder(groups, batch=2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="hold 3 items"):
        order.next(2)


def shapes_folder(folder: Path) -> Path:
    """Nine images, three each of 32 x 32, 60 x 36 (landscape) and 30 x 50 (portrait)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i, (w, h) in enumerate([(32, 32), (60, 36), (30, 50)] * 3):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"picture {i}")
    return folder


def bucket_config(out: Path, data: Path, **changes) -> UNetTrainConfig:
    base = dict(out_dir=str(out), data=str(data), resolution=32, aspect_buckets=True, bucket_step=8,
                max_steps=4, batch_size=2, lr=1e-3, warmup_steps=1, ema_decay=0.0, sample_every=2,
                checkpoint_every=0, num_sample_images=1, sample_steps=2)
    return UNetTrainConfig(**{**base, **changes})


def test_unet_trains_on_three_shapes_and_resumes_exactly(tmp_path: Path) -> None:
    data = shapes_folder(tmp_path / "data")
    trainer = UNetTrainer(bucket_config(tmp_path / "probe", data), pipeline=tiny_pipeline())
    factor = trainer.pipe.vae_factor
    # buckets of 32 px at step 8: (24, 40), (32, 32), (40, 24); each image in its nearest one
    shapes = sorted(tuple(a.shape[-2:]) for a in trainer.latents.arrays)
    assert shapes == sorted([(40 // factor, 24 // factor), (32 // factor, 32 // factor), (24 // factor, 40 // factor)])
    assert all(len(a) == 3 for a in trainer.latents.arrays)
    with pytest.raises(TrainDataError, match="mixes"):
        trainer.latents[[0, 1]]
    straight = train_unet(bucket_config(tmp_path / "straight", data), pipeline=tiny_pipeline(), progress=False)
    assert math.isfinite(straight.last["loss"]) and len(straight.samples) == 2
    train_unet(bucket_config(tmp_path / "split", data, max_steps=2), pipeline=tiny_pipeline(), progress=False)
    train_unet(bucket_config(tmp_path / "split", data), pipeline=tiny_pipeline(), resume=True, progress=False)
    a, b = (load_checkpoint(tmp_path / run / "checkpoint.pt") for run in ("straight", "split"))
    assert_same_state({k: a[k] for k in ("modules", "optimizers", "data")},
                      {k: b[k] for k in ("modules", "optimizers", "data")})
    with pytest.raises(TrainConfigError, match="bucket_step"):
        bucket_config(tmp_path, data, bucket_step=64).validate()
