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
    sharpen, anneal, vision, lcm = builtin.sharpen_config, builtin.anneal_config, builtin.vision_config, builtin.lcm_config
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
    monkeypatch.setattr(builtin, "vision_config", lambda out: dataclasses.replace(
        vision(out), max_steps=2, batch_size=8, zero_shot_n=4, warmup_steps=1, decay_steps=2, **few))
    monkeypatch.setattr(builtin, "lcm_config", lambda out: dataclasses.replace(
        lcm(out), max_steps=2, batch_size=4, world_length=16, lora_rank=2, lora_alpha=2.0, warmup_steps=1,
        decay_steps=2, **few))


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
    # The whole CLIP from vision (its image side trained on), whose text tower is the clip stage's.
    clip, first = load_clip_model(out / "vision" / "clip").state_dict(), load_clip_model(out / "clip" / "clip").state_dict()
    assert all(torch.equal(v.half(), load_clip_model(target / "clip").state_dict()[k]) for k, v in clip.items())
    assert all(torch.equal(v, clip[k]) for k, v in first.items() if k.startswith("text_model."))
    assert not torch.equal(first["visual_projection.weight"], clip["visual_projection.weight"])
    # The fast default's LCM-LoRA from the lcm stage, which merges into the assembled model.
    assert (target / "lcm_lora.safetensors").read_bytes() == (out / "lcm" / "lcm_lora.safetensors").read_bytes()
    pipe.load_lora(target / "lcm_lora.safetensors")
    weights = [f for f in target.rglob("*.safetensors")]
    assert weights and all(f.stat().st_size < 40e6 for f in weights)

    # A second run skips every finished stage and only re-assembles.
    logs = {stage: (out / stage / "log.csv").read_text() for stage in builtin.STAGES[:-1]}
    builtin.train_builtin(out, target=target)
    assert {stage: (out / stage / "log.csv").read_text() for stage in builtin.STAGES[:-1]} == logs


def test_unknown_stage_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown stage"):
        builtin.train_builtin(tmp_path, stages=("unet", "painting"))


def test_builtin_jobs_run_stages_in_processes_once_their_inputs_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --jobs 2 each unfinished stage runs as its own process after the stages it reads; the
    fake stage process checks its inputs are exported and writes its own export."""
    import subprocess
    import sys

    out, launched = tmp_path / "runs", []
    needs_export = {"clip": "clip/text_encoder/config.json", "vae": "vae/vae/config.json", "unet": "unet/model/model_index.json",
                    "decoder": "decoder/vae/config.json", "anneal": "anneal/model/model_index.json"}

    def fake_process(out_: Path, stage: str, threads: int) -> subprocess.Popen:
        launched.append((stage, threads))
        inputs = [str(out_ / needs_export[need]) for need in builtin.STAGE_NEEDS[stage]]
        runs = {"clip": "text_encoder/config.json", "vae": "vae/config.json", "unet": "model/model_index.json",
                "decoder": "vae/config.json", "sharpen": "vae/config.json", "anneal": "model/model_index.json",
                "vision": "clip/config.json", "lcm": "lcm_lora.safetensors"}
        export = out_ / stage / runs[stage]
        body = '{"scaling_factor": 0.5}' if stage == "vae" else "{}"
        pause = 1.0 if stage == "clip" else 0.1  # the vae finishes first: unet must still wait for clip
        code = (f"import os, pathlib, time; time.sleep({pause}); assert all(os.path.isfile(p) for p in {inputs!r}); "
                f"p = pathlib.Path({str(export)!r}); p.parent.mkdir(parents=True, exist_ok=True); p.write_text({body!r})")
        return subprocess.Popen([sys.executable, "-c", code])

    monkeypatch.setattr(builtin, "stage_process", fake_process)
    monkeypatch.setattr(builtin.os, "cpu_count", lambda: 2)
    builtin.train_builtin(out, stages=builtin.STAGES[:-1], jobs=2)
    assert sorted(launched) == sorted((stage, 1) for stage in builtin.STAGE_NEEDS)
    assert all(builtin.stage_finished(out, stage) for stage in builtin.STAGE_NEEDS)
    launched.clear()
    builtin.train_builtin(out, stages=builtin.STAGES[:-1], jobs=2)  # everything exported: nothing runs
    assert launched == []


def test_builtin_failed_stage_process_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    from latentdiff.train.stages import StageFailed

    monkeypatch.setattr(builtin, "stage_process", lambda out, stage, threads: subprocess.Popen([sys.executable, "-c", "raise SystemExit(5)"]))
    with pytest.raises(StageFailed, match=r"clip \(exit status 5\)"):
        builtin.train_builtin(tmp_path, stages=("clip", "vae", "unet"), jobs=2)


def test_recipe_times_count_side_by_side_stages_once(tmp_path: Path, capsys) -> None:
    from latentdiff.cli import main

    (tmp_path / "stages.csv").write_text(
        "stage,started_utc,minutes,threads\n"
        "clip,2026-01-01T10:00:00Z,30.0,1\n"
        "vae,2026-01-01T10:10:00Z,40.0,1\n"  # beside clip: 10:00 - 10:50 is 50 minutes of wall time
        "unet,2026-01-02T09:00:00Z,20.0,2\n"  # the next day: adds its own 20
        "unet,2026-01-02T12:00:00Z,5.5,2\n")  # resumed: the stage's runs sum
    per_stage, wall = builtin.recipe_times(tmp_path)
    assert per_stage == {"clip": 30.0, "vae": 40.0, "unet": 25.5} and wall == pytest.approx(75.5)
    assert main(["train", "builtin", "--out", str(tmp_path), "--times"]) == 0
    assert "| `unet` | 25.5 |" in capsys.readouterr().out
    (tmp_path / "stages.csv").write_text("stage,started_utc,minutes,threads\nclip,yesterday,3,1\n")
    with pytest.raises(latentdiff.CheckpointError, match=r"stages.csv:2: not a stage"):
        builtin.recipe_times(tmp_path)
    assert main(["train", "builtin", "--out", str(tmp_path / "nothing"), "--times"]) == 2
