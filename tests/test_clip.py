"""CLIP text encoder against transformers' CLIPTextModel (tiny random weights, float32)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentdiff.models.clip import CLIPTextConfig, CLIPTextModel, normalize_text_encoder_keys
from latentdiff.models.config import ConfigError

transformers = pytest.importorskip("transformers")

TOL = dict(rtol=1e-5, atol=1e-5)


def _hf_model(config: CLIPTextConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    hf_config = transformers.CLIPTextConfig(**config.to_dict())
    return transformers.CLIPTextModel(hf_config).eval()


def _ids(config: CLIPTextConfig, batch: int = 3, length: int = 77) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size - 2, (batch, length), generator=g)
    ids[:, 0] = config.bos_token_id
    for row, end in enumerate((5, 40, length - 1)[:batch]):
        ids[row, end:] = config.eos_token_id  # padded with the end token, as SD 1.x does
    return ids


@pytest.fixture(scope="module")
def saved_hf(tmp_path_factory):
    config = CLIPTextConfig.tiny()
    hf = _hf_model(config)
    folder = tmp_path_factory.mktemp("hf_text_encoder")
    hf.save_pretrained(folder, safe_serialization=True)
    return config, hf, folder


def _load_ours(config: CLIPTextConfig, state_dict: dict[str, torch.Tensor]) -> CLIPTextModel:
    ours = CLIPTextModel(config).eval()
    normalized, ignored = normalize_text_encoder_keys(state_dict)
    assert all(k.endswith("position_ids") for k in ignored)
    ours.load_state_dict(normalized, strict=True)
    return ours


def test_state_dict_keys_are_sd1_layout():
    keys = set(CLIPTextModel(CLIPTextConfig.tiny()).state_dict())
    expected = {"text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
                "text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"}
    for i in range(2):
        p = f"text_model.encoder.layers.{i}."
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                     "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2"):
            expected |= {p + name + ".weight", p + name + ".bias"}
    assert keys == expected


def test_matches_transformers(saved_hf):
    config, hf, folder = saved_hf
    state_dict = load_file(folder / "model.safetensors")
    ours = _load_ours(CLIPTextConfig.load(folder / "config.json"), state_dict)
    ids = _ids(config)
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        torch.testing.assert_close(ours(ids), ref.last_hidden_state, **TOL)
        torch.testing.assert_close(ours.pooled(ids), ref.pooler_output, **TOL)
        clip_skip = hf.final_layer_norm(ref.hidden_states[-2])
        torch.testing.assert_close(ours(ids, skip_last_layers=1), clip_skip, **TOL)
        short = ids[:, :20]
        torch.testing.assert_close(ours(short), hf(short).last_hidden_state, **TOL)


def test_transformers4_and_single_file_keys(saved_hf):
    config, hf, folder = saved_hf
    state_dict = load_file(folder / "model.safetensors")
    ids = _ids(config)
    with torch.no_grad():
        ref = hf(ids).last_hidden_state
    tf4 = {"text_model." + k: v for k, v in state_dict.items()}
    tf4["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    single = {"cond_stage_model.transformer." + k: v for k, v in tf4.items()}
    for sd in (tf4, single):
        normalized, ignored = normalize_text_encoder_keys(sd)
        assert len(ignored) == 1 and ignored[0].endswith("embeddings.position_ids")
        ours = CLIPTextModel(config).eval()
        ours.load_state_dict(normalized, strict=True)
        with torch.no_grad():
            torch.testing.assert_close(ours(ids), ref, **TOL)


def test_unknown_keys_fail_strict_loading(saved_hf):
    config, _, folder = saved_hf
    state_dict = load_file(folder / "model.safetensors")
    state_dict["text_projection.weight"] = torch.zeros(4, 4)
    normalized, _ = normalize_text_encoder_keys(state_dict)
    with pytest.raises(RuntimeError, match="text_projection"):
        CLIPTextModel(config).load_state_dict(normalized, strict=True)


def test_ours_loads_into_transformers(tmp_path):
    config = CLIPTextConfig.tiny().replace(hidden_act="gelu")
    torch.manual_seed(3)
    ours = CLIPTextModel(config).eval()
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    save_file(ours.state_dict(), tmp_path / "model.safetensors")
    hf = transformers.CLIPTextModel.from_pretrained(tmp_path).eval()
    ids = _ids(config)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).last_hidden_state, **TOL)
    back = CLIPTextConfig.from_dict(hf.config.to_dict())
    assert back == config


def test_legacy_eos_pooling():
    """SD 1.5's config says eos_token_id 2: pool at the highest id, as transformers does."""
    config = CLIPTextConfig.tiny().replace(bos_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    hf = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config.to_dict())).eval()
    ours = _load_ours(config, hf.state_dict())
    ids = torch.tensor([[5, 9, 999, 3, 3], [7, 999, 1, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(ours.pooled(ids), hf(ids).pooler_output, **TOL)


def test_sd15_parameter_count():
    with torch.device("meta"):
        ours = CLIPTextModel(CLIPTextConfig.sd15())
        hf = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIPTextConfig.sd15().to_dict()))
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(p.numel() for p in hf.parameters()) == 123_060_480
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        "text_model." + k: v.shape for k, v in hf.state_dict().items()
    }


def test_config_round_trip_and_validation(tmp_path):
    config = CLIPTextConfig.sd15()
    data = config.to_dict()
    assert data["model_type"] == "clip_text_model" and data["architectures"] == ["CLIPTextModel"]
    config.save(tmp_path / "config.json")
    assert CLIPTextConfig.load(tmp_path / "config.json") == config
    with pytest.raises(ConfigError, match="hidden_act"):
        CLIPTextConfig.from_dict({**data, "hidden_act": "relu"})
    with pytest.raises(ConfigError, match="divisible"):
        CLIPTextConfig.from_dict({**data, "num_attention_heads": 7})


def test_forward_errors():
    model = CLIPTextModel(CLIPTextConfig.tiny())
    with pytest.raises(ValueError, match="skip_last_layers"):
        model(torch.zeros(1, 5, dtype=torch.long), skip_last_layers=2)
    with pytest.raises(ValueError, match="positions"):
        model(torch.zeros(1, 78, dtype=torch.long))
