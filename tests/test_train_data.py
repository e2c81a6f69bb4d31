"""Training data: folder sources (.txt captions, metadata.jsonl), the world adapter, batch order, configs."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.train import (
    EpochOrder, ImageFolderSource, InMemorySource, TrainConfigError, TrainDataError, UNetTrainConfig,
    VAETrainConfig, WorldSource,
)
from latentdiff.train.data import load_batch, to_image_tensor


def _png(path, color, size=(20, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_folder_with_txt_captions(tmp_path) -> None:
    _png(tmp_path / "b.png", (255, 0, 0))
    (tmp_path / "b.txt").write_text("a red image\n")
    _png(tmp_path / "sub" / "a.jpg", (0, 0, 255))
    (tmp_path / "sub" / "a.txt").write_text("a blue image")
    source = ImageFolderSource(tmp_path, resolution=8)
    assert len(source) == 2
    image, caption = source[0]  # sorted by path: "b.png" < "sub/a.jpg"
    assert caption == "a red image"
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32
    assert image[0].min().item() == 1.0 and image[1].max().item() == -1.0  # pure red in [-1, 1]
    images, captions = load_batch(source, [1, 0])
    assert images.shape == (2, 3, 8, 8) and captions == ["a blue image", "a red image"]


def test_folder_missing_caption_is_named(tmp_path) -> None:
    _png(tmp_path / "lonely.png", (0, 0, 0))
    with pytest.raises(TrainDataError, match="lonely.png"):
        ImageFolderSource(tmp_path)


def test_folder_with_metadata_jsonl(tmp_path) -> None:
    _png(tmp_path / "train" / "x.png", (0, 255, 0), size=(8, 8))
    _png(tmp_path / "train" / "y.png", (0, 0, 0), size=(8, 8))
    _png(tmp_path / "train" / "ignored.png", (9, 9, 9), size=(8, 8))  # not listed: not used
    rows = [{"file_name": "train/y.png", "text": "black"}, {"file_name": "train/x.png", "text": "green"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    source = ImageFolderSource(tmp_path)
    assert [source[i][1] for i in range(len(source))] == ["green", "black"]
    assert source[0][0].shape == (3, 8, 8)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "nope.png", "text": "x"}))
    with pytest.raises(TrainDataError, match="nope.png"):
        ImageFolderSource(tmp_path)


def test_resize_center_crop_keeps_the_middle(tmp_path) -> None:
    image = Image.new("RGB", (30, 10), (0, 0, 0))
    image.paste((255, 255, 255), (10, 0, 20, 10))  # white middle third
    image.save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("wide")
    out, _ = ImageFolderSource(tmp_path, resolution=10)[0]
    assert out.shape == (3, 10, 10) and out.min().item() > 0.9


def test_to_image_tensor_layouts() -> None:
    hwc = np.full((4, 5, 3), 255, dtype=np.uint8)
    assert to_image_tensor(hwc).shape == (3, 4, 5) and to_image_tensor(hwc).max().item() == 1.0
    chw = torch.zeros(3, 4, 5, dtype=torch.uint8)
    assert to_image_tensor(chw).min().item() == -1.0
    with pytest.raises(TrainDataError):
        to_image_tensor(torch.zeros(4, 5))


def test_world_adapter_with_a_stand_in_world(monkeypatch) -> None:
    """The adapter codes to WorldDataset(seed, length) items; the real world is written elsewhere."""

    class FakeWorld:
        def __init__(self, seed: int, length: int) -> None:
            self.seed, self.length = seed, length

        def __len__(self) -> int:
            return self.length

        def __getitem__(self, i: int):
            image = Image.new("RGB", (64, 64), (245, 245, 245))
            return {"image": image, "caption": f"a small red circle {self.seed} {i}"}

    module = types.ModuleType("latentdiff.world")
    module.WorldDataset = FakeWorld
    monkeypatch.setitem(sys.modules, "latentdiff.world", module)
    source = WorldSource(seed=3, length=5, resolution=32)
    image, caption = source[4]
    assert len(source) == 5 and caption == "a small red circle 3 4" and image.shape == (3, 32, 32)


def test_world_adapter_with_the_real_world() -> None:
    try:
        import latentdiff.world  # noqa: F401
    except ImportError:
        pytest.skip("latentdiff.world is not available")
    source = WorldSource(seed=0, length=3, resolution=64)
    image, caption = source[2]
    assert image.shape == (3, 64, 64) and -1.0 <= image.min() and image.max() <= 1.0
    assert isinstance(caption, str) and caption


def test_epoch_order_is_deterministic_and_resumable() -> None:
    order = EpochOrder(10, seed=7)
    first = order.next(25)  # 2.5 epochs
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
    assert first[:10] != first[10:20]  # a new permutation per epoch
    assert EpochOrder(10, seed=7).next(25) == first
    assert EpochOrder(10, seed=8).next(10) != first[:10]
    a = EpochOrder(10, seed=7)
    a.next(13)
    b = EpochOrder(10, seed=7)
    b.load_state_dict(a.state_dict())
    assert b.next(12) == first[13:25]
    with pytest.raises(TrainDataError):
        EpochOrder(11, seed=7).load_state_dict(a.state_dict())


def test_in_memory_source_checks_lengths() -> None:
    with pytest.raises(TrainDataError):
        InMemorySource(torch.zeros(2, 3, 4, 4), ["one"])


def test_configs_from_toml_and_json(tmp_path) -> None:
    (tmp_path / "vae.toml").write_text('data = "imgs"\nmax_steps = 10\nlr = 1\nkl_weight = 1e-6\n')
    cfg = VAETrainConfig.from_file(tmp_path / "vae.toml")
    assert cfg.data == "imgs" and cfg.max_steps == 10 and cfg.lr == 1.0 and isinstance(cfg.lr, float)
    (tmp_path / "unet.json").write_text(json.dumps({"sample_prompts": ["a", "b"], "prediction_type": "v_prediction"}))
    ucfg = UNetTrainConfig.from_file(tmp_path / "unet.json")
    assert ucfg.sample_prompts == ["a", "b"] and ucfg.prediction_type == "v_prediction"
    (tmp_path / "t.toml").write_text("[train]\nbatch_size = 3\n")
    assert UNetTrainConfig.from_file(tmp_path / "t.toml").batch_size == 3
    assert UNetTrainConfig.from_dict(ucfg.to_dict()) == ucfg


@pytest.mark.parametrize(
    "text, match",
    [
        ("max_step = 3\n", "unknown"),
        ('max_steps = "3"\n', "integer"),
        ("caption_dropout = 2.0\n", "caption_dropout"),
        ('prediction_type = "sample"\n', "prediction_type"),
        ("max_steps = [\n", "cannot parse"),
    ],
)
def test_config_errors_name_the_problem(tmp_path, text, match) -> None:
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(TrainConfigError, match=match):
        UNetTrainConfig.from_file(tmp_path / "c.toml")


def test_perceptual_weight_without_weights_is_a_clear_error() -> None:
    assert VAETrainConfig().perceptual_weight == 0.0
    with pytest.raises(TrainConfigError, match="LPIPS"):
        VAETrainConfig(perceptual_weight=1.0).validate()
