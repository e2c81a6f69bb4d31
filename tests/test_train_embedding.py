"""Textual-inversion training: only the vectors learn; the A1111 .pt and the emb_params
.safetensors load in latentdiff and in diffusers' load_textual_inversion with the same images."""

from __future__ import annotations

from pathlib import Path

import diffusers
import pytest
import torch
from conftest import assert_rel_close
from safetensors.torch import load_file
from test_generate import SEED, SIZE, compare, generators
from test_train_trainers import synthetic_source

import latentdiff
from latentdiff.cli import main
from latentdiff.train import EmbeddingTrainConfig, EmbeddingTrainer, TrainConfigError, train_embedding
from latentdiff.train.draws import EMBEDDING, sample_generator
from latentdiff.train.loop import run_training

TOKEN = "zqxsquare"  # a word the tiny tokenizer cuts into several tokens


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def ti_config(out: Path, base: Path, **changes) -> EmbeddingTrainConfig:
    settings = dict(out_dir=str(out), pretrained=str(base), token=TOKEN, init_word="red square", num_vectors=3,
                    max_steps=4, batch_size=2, lr=5e-2, resolution=SIZE, sample_every=0, checkpoint_every=0,
                    num_sample_images=1, sample_steps=2, templates=["a photo of {token}", "{token}, {caption}"])
    return EmbeddingTrainConfig(**{**settings, **changes})


@pytest.fixture(scope="module")
def run(diffusers_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[EmbeddingTrainer, Path, dict]:
    out = tmp_path_factory.mktemp("ti-run")
    trainer = EmbeddingTrainer(ti_config(out, diffusers_dir), source=synthetic_source(SIZE))
    frozen = {name: {k: v.clone() for k, v in m.state_dict().items()}
              for name, m in (("unet", trainer.unet), ("text_encoder", trainer.text_encoder))}
    frozen["start"] = trainer.vectors.detach().clone()
    result = run_training(trainer, progress=False)
    assert result.exported == out / f"{TOKEN}.pt"
    return trainer, result.exported, frozen


def test_only_the_vectors_learn_from_the_init_word(run) -> None:
    trainer, _, frozen = run
    ids = trainer.tokenizer.encode("red square")
    table = trainer.text_encoder.text_model.embeddings.token_embedding.weight
    assert torch.equal(frozen["start"], table[[ids[0], ids[1], ids[0]]])  # the init word's tokens, cycled to 3
    assert (trainer.vectors - frozen["start"]).abs().max() > 1e-3
    for name, module in (("unet", trainer.unet), ("text_encoder", trainer.text_encoder)):
        assert all(torch.equal(frozen[name][k], v) for k, v in module.state_dict().items())


def test_files_are_a1111s_formats(run) -> None:
    trainer, pt, _ = run
    data = torch.load(pt, weights_only=True)
    assert set(data) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert data["name"] == TOKEN and data["step"] == 4
    assert torch.equal(data["string_to_param"]["*"], trainer.vectors.detach())
    assert torch.equal(load_file(pt.with_suffix(".safetensors"))["emb_params"], trainer.vectors.detach())


def test_training_captions_and_states_are_what_loading_the_file_gives(run, diffusers_dir: Path) -> None:
    """The template of sample n comes from its own draws; the trainer's text states for a caption
    equal encode_prompt after load_textual_inversion of the export."""
    trainer, pt, _ = run
    ids = [10, 11, 12, 13]
    captions = trainer.captions_of([0, 1, 2, 3], ids)
    for i, (caption, n) in enumerate(zip(captions, ids)):
        k = int(torch.randint(0, 2, (), generator=sample_generator(trainer.config.seed, EMBEDDING, n)))
        assert caption == ["a photo of {token}", "{token}, {caption}"][k].format(token=TOKEN, caption=trainer.captions[i])
    pipe = latentdiff.load(diffusers_dir)
    pipe.load_textual_inversion(pt)
    with torch.no_grad():
        assert_rel_close(trainer.condition(captions), pipe.encode_prompt(captions), 1e-6)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_trained_embedding_gives_diffusers_images(run, diffusers_dir: Path, suffix: str) -> None:
    _, pt, _ = run
    path = pt.with_suffix(suffix)
    pipe = latentdiff.load(diffusers_dir)
    pipe.load_textual_inversion(path)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(diffusers_dir, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ref.load_textual_inversion(str(path), token=TOKEN)
    prompts = [f"a photo of {TOKEN}", f"{TOKEN} on the left"]
    compare(
        lambda **kw: pipe.txt2img(prompts, steps=4, guidance_scale=5.0, seed=SEED, sampler="ddim",
                                  width=SIZE, height=SIZE, **kw),
        lambda **kw: ref(prompts, num_inference_steps=4, guidance_scale=5.0, generator=generators(2),
                         width=SIZE, height=SIZE, **kw),
        pipe, ref,
    )


def test_cli_and_config_errors(diffusers_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "ti.toml"
    config.write_text(f'pretrained = "{diffusers_dir}"\ntoken = "{TOKEN}"\ninit_word = "square"\n'
                      f'resolution = 16\nmax_steps = 1\nbatch_size = 2\nsample_every = 0\nsample_steps = 2\n'
                      'num_sample_images = 1\ndata = "world"\nworld_length = 4\n')
    assert main(["train", "embedding", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / f"{TOKEN}.pt").is_file() and (tmp_path / "run" / f"{TOKEN}.safetensors").is_file()
    for bad, match in [({"token": "a/b"}, "token"), ({"num_vectors": 0}, "num_vectors"),
                       ({"templates": ["no word"]}, "template")]:
        with pytest.raises(TrainConfigError, match=match):
            ti_config(tmp_path, diffusers_dir, **bad).validate()
    with pytest.raises(TrainConfigError, match="init_word"):
        train_embedding(ti_config(tmp_path / "x", diffusers_dir, init_word="   "), source=synthetic_source(SIZE),
                        progress=False)
