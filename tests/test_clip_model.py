"""The full CLIP model (text + image towers) against transformers' CLIPModel (tiny random weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_rel_close
from safetensors.torch import load_file

from latentdiff.checkpoints.clip_folder import load_clip_model, save_clip_model
from latentdiff.checkpoints.errors import CheckpointError
from latentdiff.models.clip_model import (
    CLIP_STD,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    image_list,
    image_preprocess,
)

transformers = pytest.importorskip("transformers")


def _hf_model(config: CLIPConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig.from_dict(config.to_dict())).eval()
    with torch.no_grad():
        model.logit_scale.fill_(1.7)  # not the init value, so loading it is tested
    return model


def _ids(config: CLIPConfig, lengths=(5, 12, 19), t: int = 20) -> torch.Tensor:
    text = config.text_config
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, text.vocab_size - 2, (len(lengths), t), generator=g)
    ids[:, 0] = text.bos_token_id
    for row, end in enumerate(lengths):
        ids[row, end:] = text.eos_token_id
    return ids


def _pixels(config: CLIPConfig, batch: int = 3) -> torch.Tensor:
    s = config.vision_config.image_size
    return torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def saved_hf(tmp_path_factory):
    config = CLIPConfig.tiny()
    hf = _hf_model(config)
    folder = tmp_path_factory.mktemp("hf_clip")
    hf.save_pretrained(folder, safe_serialization=True)
    return config, hf, folder


def _check_matches(ours: CLIPModel, hf: torch.nn.Module, config: CLIPConfig) -> None:
    ids, pixels = _ids(config), _pixels(config)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels)
        assert_rel_close(ours.encode_text(ids), hf.get_text_features(input_ids=ids).pooler_output)
        assert_rel_close(ours.encode_image(pixels), hf.get_image_features(pixel_values=pixels).pooler_output)
        assert_rel_close(ours(ids, pixels), ref.logits_per_image)
        assert_rel_close(ours(ids, pixels).t(), ref.logits_per_text)


def test_state_dict_is_transformers_layout():
    config = CLIPConfig.tiny()
    ours = {k: tuple(v.shape) for k, v in CLIPModel(config).state_dict().items()}
    ref = {k: tuple(v.shape) for k, v in _hf_model(config).state_dict().items() if not k.endswith("position_ids")}
    assert ours == ref
    for key in ("vision_model.embeddings.class_embedding", "vision_model.pre_layrnorm.weight",
                "vision_model.post_layernorm.bias", "visual_projection.weight", "text_projection.weight",
                "logit_scale", "text_model.final_layer_norm.weight"):
        assert key in ours


def test_vit_l14_preset_matches_transformers_shapes():
    config = CLIPConfig.vit_l14()
    with torch.device("meta"):
        ours = CLIPModel(config)
        ref = transformers.CLIPModel(transformers.CLIPConfig.from_dict(config.to_dict()))
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
    assert sum(p.numel() for p in ours.parameters()) == 427_616_513  # openai/clip-vit-large-patch14
    assert config.text_config == config.text_config.sd15()  # SD 1.x's text encoder is this text tower


def test_load_transformers_folder_matches(saved_hf):
    config, hf, folder = saved_hf
    ours = load_clip_model(folder)
    assert ours.config == config
    assert not ours.training
    _check_matches(ours, hf, config)
    assert ours.logit_scale.item() == pytest.approx(1.7)


def test_load_pytorch_model_bin_with_position_ids(saved_hf, tmp_path):
    """Older folders: pytorch_model.bin (read with weights_only=True) holding position_ids buffers."""
    config, hf, folder = saved_hf
    state_dict = dict(load_file(folder / "model.safetensors"))
    state_dict["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state_dict["vision_model.embeddings.position_ids"] = torch.arange(config.vision_config.num_patches + 1)[None]
    torch.save(state_dict, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    _check_matches(load_clip_model(tmp_path), hf, config)


def test_save_loads_in_transformers(tmp_path):
    config = CLIPConfig.tiny()
    torch.manual_seed(3)
    ours = CLIPModel(config).eval()
    save_clip_model(ours, tmp_path)
    hf, info = transformers.CLIPModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    _check_matches(ours, hf.eval(), config)
    # and back: our save -> our load is exact
    again = load_clip_model(tmp_path)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, rtol=0, atol=0)


def test_save_dtype(tmp_path):
    save_clip_model(CLIPModel(CLIPConfig.tiny()), tmp_path, dtype=torch.float16)
    assert all(v.dtype == torch.float16 for v in load_file(tmp_path / "model.safetensors").values())
    assert load_clip_model(tmp_path, dtype=torch.float32).logit_scale.dtype == torch.float32


def test_strict_loading_names_the_problem(saved_hf, tmp_path):
    config, _, folder = saved_hf
    state_dict = dict(load_file(folder / "model.safetensors"))
    del state_dict["visual_projection.weight"]
    state_dict["vision_model.pre_layrnorm.bias"] = torch.zeros(7)
    torch.save(state_dict, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match="visual_projection.weight") as err:
        load_clip_model(tmp_path)
    assert "pre_layrnorm.bias" in str(err.value)


def test_rejects_other_folders(tmp_path, saved_hf):
    with pytest.raises(CheckpointError, match="no such folder"):
        load_clip_model(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["CLIPTextModel"], "model_type": "clip_text_model"}))
    with pytest.raises(CheckpointError, match="not a CLIPModel"):
        load_clip_model(tmp_path)
    _, _, folder = saved_hf
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no weights"):
        load_clip_model(tmp_path)


def test_config_reads_sparse_and_legacy_json_like_transformers():
    raw = {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 24,
        "text_config": {"hidden_size": 48, "num_hidden_layers": 1},
        "vision_config": {"patch_size": 16, "num_hidden_layers": 3},
    }
    legacy = {**raw, "text_config_dict": {"hidden_size": 96, "num_attention_heads": 6}}  # wins, with defaults
    for data in (raw, legacy):
        _check_config_like_transformers(data)


def _check_config_like_transformers(raw):
    ours = CLIPConfig.from_dict(raw)
    ref = transformers.CLIPConfig.from_dict(raw)
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                 "eos_token_id", "hidden_act"):
        assert getattr(ours.text_config, name) == getattr(ref.text_config, name), name
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                 "patch_size"):
        assert getattr(ours.vision_config, name) == getattr(ref.vision_config, name), name
    assert ours.projection_dim == ref.projection_dim == 24
    assert CLIPConfig.from_dict(ours.to_dict()) == ours
    assert CLIPConfig(text_config={"hidden_size": 64}).text_config.hidden_size == 64


def test_text_encoder_view_shares_weights():
    config = CLIPConfig.tiny()
    model = CLIPModel(config).eval()
    view = model.text_encoder()
    assert view.text_model is model.text_model
    assert set(view.state_dict()) == {k for k in model.state_dict() if k.startswith("text_model.")}
    ids = _ids(config)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids), model.text_projection(view.pooled(ids)))


def test_wrong_image_size_is_refused():
    model = CLIPModel(CLIPConfig.tiny())
    with pytest.raises(ValueError, match="32x32"):
        model.encode_image(torch.zeros(1, 3, 30, 30))


# ------------------------------------------------------------------ preprocessing

def _smooth_image(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    wave = np.sin(xx / 5.0)[..., None] * np.cos(yy / 7.0)[..., None] * np.array([1.0, 0.5, -0.7])
    return (127 + 100 * wave).astype(np.uint8)


@pytest.mark.parametrize("shape", [(45, 61), (61, 45), (32, 32), (20, 50), (33, 33)])
def test_preprocess_matches_clip_image_processor(shape):
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    noise = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    for image in (_smooth_image(*shape), noise):
        ref = processor(images=[image], return_tensors="pt")["pixel_values"]
        ours = image_preprocess(image, 32)
        assert ours.shape == ref.shape == (1, 3, 32, 32)
        # One 8-bit level of rounding between torch's and PIL's bicubic, at most.
        levels = (ours - ref).abs() * torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255
        assert levels.max() <= 1.001
        if shape == (32, 32):  # no resampling: identical
            torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_preprocess_accepts_every_image_form():
    from PIL import Image

    array = _smooth_image(40, 48)
    tensor_u8 = torch.from_numpy(array).permute(2, 0, 1)
    reference = image_preprocess(array, 32)
    for form in (tensor_u8, tensor_u8[None], array[None], [array], Image.fromarray(array), [Image.fromarray(array)]):
        torch.testing.assert_close(image_preprocess(form, 32), reference, rtol=0, atol=0)
    floats = image_preprocess(tensor_u8.float() / 255, 32)  # resized in float: close to the 8-bit path
    assert (floats - reference).abs().max() < 2.5 / 255 / 0.26
    assert [tuple(t.shape) for t in image_list([array, array[:20]])] == [(3, 40, 48), (3, 20, 48)]
    gray = image_preprocess(array[..., 0], 32)
    assert gray.shape == (1, 3, 32, 32)
    with pytest.raises(TypeError, match="uint8"):
        image_preprocess(tensor_u8.long(), 32)


def test_vision_config_validation():
    from latentdiff.models.config import ConfigError

    with pytest.raises(ConfigError, match="divisible"):
        CLIPVisionConfig(hidden_size=30, num_attention_heads=4).validate()
    with pytest.raises(ConfigError, match="hidden_act"):
        CLIPVisionConfig(hidden_act="relu6").validate()
