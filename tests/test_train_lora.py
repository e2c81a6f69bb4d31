"""LoRA training: a trained kohya file loads in diffusers (load_lora_weights) and in latentdiff
and gives the same images; the trainer's own previews are that file; ss_* metadata; the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import pytest
import torch
from safetensors import safe_open
from test_generate import PROMPTS, SEED, SIZE, compare, generators
from test_train_trainers import synthetic_source, write_image_folder

import latentdiff
from latentdiff.cli import main
from latentdiff.train import TrainConfigError
from latentdiff.train.lora import LoRATrainConfig, LoRATrainer, train_lora


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def lora_config(out: Path, base: Path, **changes) -> LoRATrainConfig:
    settings = dict(
        out_dir=str(out), pretrained=str(base), max_steps=4, batch_size=2, lr=3e-2, warmup_steps=0, rank=4, alpha=2.0,
        caption_dropout=0.0, sample_every=0, checkpoint_every=0, num_sample_images=1, sample_steps=2,
    )
    return LoRATrainConfig(**{**settings, **changes})


@pytest.fixture(scope="module")
def trained(diffusers_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA with LoCon and text-encoder adapters, trained on 32 px squares."""
    out = tmp_path_factory.mktemp("lora-run")
    cfg = lora_config(out, diffusers_dir, resolution=SIZE, locon=True, conv_rank=2, conv_alpha=1.0,
                      train_text_encoder=True, text_encoder_lr=1e-2, output_name="squares")
    result = train_lora(cfg, source=synthetic_source(SIZE), progress=False)
    assert result.exported == out / "squares.safetensors"
    return result.exported


def test_trained_lora_gives_diffusers_images(diffusers_dir: Path, trained: Path) -> None:
    """diffusers' load_lora_weights + fuse_lora of the trained file (UNet attention, LoCon convs,
    text encoder) equals latentdiff's load_lora: latents 1e-5, pixels 1/255."""
    pytest.importorskip("peft")
    pipe = latentdiff.load(diffusers_dir)
    pipe.load_lora(trained)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(diffusers_dir, safety_checker=None)
    ref.load_lora_weights(str(trained.parent), weight_name=trained.name)
    ref.fuse_lora(lora_scale=1.0)
    compare(
        lambda **kw: pipe.txt2img(PROMPTS, steps=4, guidance_scale=5.0, seed=SEED, sampler="ddim",
                                  width=SIZE, height=SIZE, **kw),
        lambda **kw: ref(PROMPTS, num_inference_steps=4, guidance_scale=5.0, generator=generators(2),
                         width=SIZE, height=SIZE, **kw),
        pipe, ref,
    )


def test_file_holds_every_adapter_with_kohya_metadata(trained: Path) -> None:
    with safe_open(str(trained), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        ups = [f.get_tensor(k) for k in keys if k.endswith(".lora_up.weight")]
    layers = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    assert any(k.endswith("_attn1_to_q") for k in layers) and any(k.endswith("_attn2_to_out_0") for k in layers)
    assert any(k.endswith("_resnets_0_conv1") for k in layers)  # LoCon
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_mlp_fc1") for k in layers)
    assert all(f"{layer}.alpha" in keys and f"{layer}.lora_down.weight" in keys for layer in layers)
    assert all(u.abs().max() > 0 for u in ups)  # every adapter trained away from its zero init
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    assert (meta["ss_steps"], meta["ss_num_train_images"], meta["ss_text_encoder_lr"]) == ("4", "8", "0.01")
    assert meta["ss_network_train_unet_only"] == "False" and meta["ss_output_name"] == "squares"


def test_previews_are_the_exported_lora(diffusers_dir: Path, tmp_path: Path) -> None:
    """The trainer's sampling pipeline (LoRA merged into copies) equals load_lora of its export,
    and the base networks it adapts are left untouched."""
    cfg = lora_config(tmp_path, diffusers_dir, resolution=SIZE, max_steps=2, train_text_encoder=True)
    trainer = LoRATrainer(cfg, source=synthetic_source(SIZE))
    before = {k: v.clone() for k, v in trainer.unet.state_dict().items()}
    from latentdiff.train.loop import run_training

    result = run_training(trainer, progress=False)
    assert all(torch.equal(before[k], v) for k, v in trainer.unet.state_dict().items())
    loaded = latentdiff.load(diffusers_dir)
    loaded.load_lora(result.exported)
    ours = trainer.sampling_pipeline().txt2img(PROMPTS, steps=3, seed=SEED, width=SIZE, height=SIZE,
                                               output_type="latent")
    theirs = loaded.txt2img(PROMPTS, steps=3, seed=SEED, width=SIZE, height=SIZE, output_type="latent")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_cli_trains_a_lora_and_config_errors(diffusers_dir: Path, tmp_path: Path, capsys) -> None:
    source = synthetic_source(16)
    data = write_image_folder(tmp_path / "data", source, count=4)
    config = tmp_path / "lora.toml"
    config.write_text(f'pretrained = "{diffusers_dir}"\ndata = "{data}"\nresolution = 16\nmax_steps = 2\n'
                      'batch_size = 2\nsample_every = 0\nsample_steps = 2\nnum_sample_images = 1\n')
    assert main(["train", "lora", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "lora.safetensors").is_file()
    assert "model: " in capsys.readouterr().out
    for bad, match in [({"rank": 0}, "rank"), ({"alpha": 0.0}, "alpha"), ({"targets": []}, "targets"),
                       ({"output_name": "a/b"}, "output_name"), ({"targets": ["no_such_layer"]}, "LoRA targets")]:
        with pytest.raises(TrainConfigError, match=match):
            LoRATrainer(lora_config(tmp_path / "bad", diffusers_dir, resolution=16, **bad), source=source)
