"""`train builtin`: every stage runs, resumes or is skipped, and the assembled model loads and generates."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import latentdiff
from latentdiff.checkpoints.clip_folder import load_clip_model
from latentdiff.train import builtin


@pytest.fixture()
def tiny_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real stage configs, cut down to a couple of steps on a handful of images."""
    clip, vae, unet, decoder = builtin.clip_config, builtin.vae_config, builtin.unet_config, builtin.decoder_config
    sharpen, anneal = builtin.sharpen_config, builtin.anneal_config
    few = dict(sample_every=0, checkpoint_every=100, log_every=1)
    monkeypatch.setattr(builtin, "clip_config", lambda out: dataclasses.replace(
        clip(out), max_steps=2, batch_size=8, text_layers=1, vision_layers=1, tokenizer_captions=300,
        zero_shot_n=4, warmup_steps=1, decay_steps=2, **few))
    monkeypatch.setattr(builtin, "vae_config", lambda out: dataclasses.replace(
        vae(out), max_steps=2, batch_size=4, world_length=16, disc_start=1, **few))
    monkeypatch.setattr(builtin, "unet_config", lambda out: dataclasses.replace(
        unet(out), max_steps=2, batch_size=4, world_length=16, sample_steps=2, **few))
    monkeypatch.setattr(builtin, "decoder_config", lambda out: dataclasses.replace(
        decoder(out), max_steps=2, batch_size=4, world_length=16, **few))
    monkeypatch.setattr(builtin, "sharpen_config", lambda out: dataclasses.replace(
        sharpen(out), max_steps=2, batch_size=4, world_length=16, decay_steps=2, **few))
    monkeypatch.setattr(builtin, "anneal_config", lambda out: dataclasses.replace(
        anneal(out), max_steps=2, batch_size=4, world_length=16, sample_steps=2, warmup_steps=1, decay_steps=2, **few))


def test_builtin_stages_build_a_loadable_model(tmp_path: Path, tiny_stages) -> None:
    out, target = tmp_path / "runs", tmp_path / "shapes"
    builtin.train_builtin(out, target=target)
    vae_config = json.loads((out / "vae" / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] != 1.0  # set from the trained latents before the UNet stage
    pipe = latentdiff.load(target)
    assert pipe.vae.config.scaling_factor == vae_config["scaling_factor"]
    image = pipe.txt2img("a large red circle in the center on a white background", steps=2)[0]
    assert np.asarray(image).shape == (64, 64, 3)
    assert (target / "clip" / "config.json").is_file() and (target / "clip" / "vocab.json").is_file()
    # Each part comes from the last stage that trained it: the UNet from anneal, the VAE from sharpen.
    for part, stage in (("unet", "anneal/model/unet"), ("vae", "sharpen/vae"), ("text_encoder", "clip/text_encoder")):
        shipped, trained = latentdiff.load_component(target / part), latentdiff.load_component(out / stage)
        assert all(torch.equal(v.half(), shipped.state_dict()[k]) for k, v in trained.state_dict().items()), part
    clip = load_clip_model(out / "clip" / "clip").state_dict()
    assert all(torch.equal(v.half(), load_clip_model(target / "clip").state_dict()[k]) for k, v in clip.items())
    weights = [f for f in target.rglob("*.safetensors")]
    assert weights and all(f.stat().st_size < 40e6 for f in weights)

    # A second run skips every finished stage and only re-assembles.
    logs = {stage: (out / stage / "log.csv").read_text() for stage in builtin.STAGES[:-1]}
    builtin.train_builtin(out, target=target)
    assert {stage: (out / stage / "log.csv").read_text() for stage in builtin.STAGES[:-1]} == logs


def test_unknown_stage_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown stage"):
        builtin.train_builtin(tmp_path, stages=("unet", "painting"))
