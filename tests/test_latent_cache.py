"""The diffusion trainers' latent cache: memory-mapped, keyed by the VAE and the transform, corrupt
images skipped and counted; tar shards and metadata.jsonl folders as training data end to end."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train_trainers import synthetic_source, tiny_pipeline

from latentdiff.train import TrainDataError, UNetTrainConfig
from latentdiff.train.data import ImageFolderSource, InMemorySource
from latentdiff.train.latent_cache import cache_key, open_latent_cache
from latentdiff.train.unet import UNetTrainer


def config(out: Path, **changes) -> UNetTrainConfig:
    base = dict(out_dir=str(out), max_steps=1, batch_size=2, sample_every=0, checkpoint_every=0, ema_decay=0.0,
                num_sample_images=1, sample_steps=2, resolution=16)
    return UNetTrainConfig(**{**base, **changes})


def png_bytes(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(((image + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def image_folder(folder: Path, corrupt: dict[int, bytes] | None = None) -> Path:
    folder.mkdir(parents=True)
    source = synthetic_source()
    for i in range(len(source)):
        image, caption = source[i]
        data = png_bytes(image)
        (folder / f"{i}.png").write_bytes((corrupt or {}).get(i, data))
        (folder / f"{i}.txt").write_text(caption)
    return folder


def test_latents_are_memory_mapped_and_equal_a_direct_encode(tmp_path: Path) -> None:
    source = synthetic_source()
    trainer = UNetTrainer(config(tmp_path), source=source, pipeline=tiny_pipeline())
    (array,) = trainer.latents.arrays
    assert isinstance(array, np.memmap) and not array.flags.writeable
    with torch.no_grad():
        images = torch.stack([source[i][0] for i in range(len(source))])
        expected = trainer.vae.scale_latents(trainer.vae.encode(images).mode())
    torch.testing.assert_close(trainer.latents[list(range(len(source)))], expected, rtol=1e-6, atol=1e-6)
    assert trainer.captions == source.captions


def test_cache_is_keyed_by_the_vae_and_the_transform(tmp_path: Path) -> None:
    source = synthetic_source()
    pipe = tiny_pipeline()
    UNetTrainer(config(tmp_path), source=source, pipeline=pipe)
    UNetTrainer(config(tmp_path, latent_mode="sample"), source=source, pipeline=pipe)
    files = sorted((tmp_path / "cache").glob("latents-*.npy"))
    assert len(files) == 2  # two transforms, side by side
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias.add_(1.0)  # the decoder is not part of the latents ...
    key = cache_key(pipe.vae, source, {"a": 1})
    with torch.no_grad():
        pipe.vae.encoder.conv_in.bias.add_(1.0)  # ... but every VAE weight is in the key
    assert cache_key(pipe.vae, source, {"a": 1}) != key != cache_key(tiny_pipeline().vae, source, {"a": 2})
    stamps = [f.stat().st_mtime_ns for f in files]
    UNetTrainer(config(tmp_path), source=source, pipeline=tiny_pipeline())  # the first key again: reused
    assert [f.stat().st_mtime_ns for f in files] == stamps


def test_corrupt_images_are_skipped_and_counted(tmp_path: Path) -> None:
    good = png_bytes(synthetic_source()[0][0])
    folder = image_folder(tmp_path / "data", corrupt={2: b"not an image at all", 5: good[: len(good) // 2]})
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable training item\(s\) of 8"):
        trainer = UNetTrainer(config(tmp_path / "run", data=str(folder)), pipeline=tiny_pipeline())
    assert len(trainer.latents) == 6 and len(trainer.latents.skipped) == 2
    assert "2.png" in trainer.latents.skipped[0] and "5.png" in trainer.latents.skipped[1]
    expected = [c for i, c in enumerate(ImageFolderSource(folder).captions) if i not in (2, 5)]
    assert trainer.captions == expected
    result = trainer.train_step(0)
    assert np.isfinite(result["loss"])


def test_nothing_readable_is_a_clear_error(tmp_path: Path) -> None:
    source = InMemorySource([torch.zeros(3, 16, 16)], ["x"])

    class Broken:
        def __len__(self) -> int:
            return 3

        def __getitem__(self, index: int):
            raise TrainDataError(f"cannot read image {index}.png")

    with pytest.raises(TrainDataError, match="none of the 3 training items could be read"):
        open_latent_cache(tmp_path, "k" * 64, Broken(), lambda x: x, batch_size=2)
    assert open_latent_cache(tmp_path, "j" * 64, source, lambda x: x[:, :1], batch_size=2).shape == (1, 1, 16, 16)


def test_tar_shards_and_metadata_jsonl_train_the_same_images(tmp_path: Path) -> None:
    """The same eight images as tar shards (a brace pattern), as a metadata.jsonl folder and as .txt
    captions give the same latents and captions."""
    source = synthetic_source()
    for shard in range(2):
        with tarfile.open(tmp_path / f"shard-{shard:02d}.tar", "w") as tar:
            for i in range(shard * 4, shard * 4 + 4):
                for name, data in ((f"{i:03d}.png", png_bytes(source[i][0])),
                                   (f"{i:03d}.json", json.dumps({"caption": source.captions[i]}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    with (jsonl / "metadata.jsonl").open("w") as f:
        for i in range(len(source)):
            (jsonl / f"{i:03d}.png").write_bytes(png_bytes(source[i][0]))
            f.write(json.dumps({"file_name": f"{i:03d}.png", "text": source.captions[i]}) + "\n")
    txt = image_folder(tmp_path / "txt")
    pipe = tiny_pipeline()
    runs = {name: UNetTrainer(config(tmp_path / name, data=data), pipeline=pipe)
            for name, data in [("tar", str(tmp_path / "shard-{00..01}.tar")), ("jsonl", str(jsonl)),
                               ("txt", str(txt))]}
    everything = list(range(8))
    for name in ("tar", "jsonl"):
        assert runs[name].captions == source.captions
        assert torch.equal(runs[name].latents[everything], runs["txt"].latents[everything])
