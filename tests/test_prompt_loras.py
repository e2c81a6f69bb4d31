"""LoRAs tagged in the prompt (``<lora:NAME:WEIGHT>``, A1111's syntax) looked up in ``lora_dirs``.

A tag must give exactly the images of ``load_lora`` at the same weights (which test_lora checks
against diffusers) with the tag removed from the text, leave the weights bit for bit as they
were, and record A1111's "Lora hashes" with the tag kept in the infotext's prompt.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_lora import kohya_file, peft_file, random_lora

import latentdiff
from latentdiff.adapters.prompt_loras import LoraTag, parse_tags, strip_tags
from latentdiff.cli import main
from latentdiff.png import read_parameters

SIZE, STEPS = 32, 3


@pytest.fixture(scope="module")
def pipe(diffusers_dir: Path) -> latentdiff.Pipeline:
    return latentdiff.load(diffusers_dir)


@pytest.fixture(scope="module")
def lora_dir(pipe: latentdiff.Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    kohya_file(random_lora(pipe, seed=5), folder / "ink.safetensors")
    (folder / "styles").mkdir()
    peft_file(random_lora(pipe, seed=6), folder / "styles" / "watercolor.safetensors")
    (folder / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    return folder


@pytest.fixture()
def ours(pipe: latentdiff.Pipeline, lora_dir: Path):
    pipe.lora_dirs = [lora_dir]
    yield pipe
    pipe.unload_lora()
    pipe.lora_dirs = []


def weights(pipe: latentdiff.Pipeline) -> dict[str, torch.Tensor]:
    return {f"{net}.{k}": v.clone() for net in ("unet", "text_encoder")
            for k, v in getattr(pipe, net).state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def latents(pipe: latentdiff.Pipeline, prompt: str, **fields) -> torch.Tensor:
    return pipe.txt2img(prompt, steps=STEPS, seed=2, width=SIZE, height=SIZE, output_type="latent", **fields)


@pytest.mark.parametrize(
    ("prompt", "tags"),
    [
        ("a cat <lora:ink:0.7>", [LoraTag("ink", 0.7, 0.7)]),
        ("<lora:ink>", [LoraTag("ink", 1.0, 1.0)]),
        ("<lora:ink:0.5:0.8> and <lyco:wc:-1>", [LoraTag("ink", 0.5, 0.8), LoraTag("wc", -1.0, -1.0)]),
        ("<lora:ink:te=0.25:unet=2>", [LoraTag("ink", 0.25, 2.0)]),
        ("<lora:ink:0.5:unet=0>", [LoraTag("ink", 0.5, 0.0)]),
        ("a <cat> (red:1.2)", []),
    ],
)
def test_tags_parse_as_a1111(prompt: str, tags: list[LoraTag]) -> None:
    assert parse_tags(prompt) == tags


def test_strip_tags_keeps_the_rest_of_the_text() -> None:
    assert strip_tags("a cat <lora:ink:0.7>, (red:1.2) <b>") == "a cat , (red:1.2) <b>"


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("<lora:ink:strong>", "'strong' is not a number"),
        ("<lora:ink:inf>", "finite number"),
        ("<lora::1>", "names no LoRA"),
        ("<lora:ink:1:1:1>", "too many arguments"),
        ("<lora:ink:dyn=4>", "unknown argument 'dyn'"),
        ("<hypernet:ink:1>", "<lora:...> tags only"),
    ],
)
def test_malformed_tags_are_named(prompt: str, message: str) -> None:
    with pytest.raises(latentdiff.BadArgument, match=re.escape(message)):
        parse_tags(prompt)


@pytest.mark.parametrize(("tag", "scales"), [("<lora:ink:0.7>", {"scale": 0.7}),
                                            ("<lora:ink:0.5:0.8>", {"text_encoder_scale": 0.5, "unet_scale": 0.8})])
def test_a_tag_equals_load_lora_and_leaves_the_weights(ours, lora_dir: Path, tag: str, scales: dict) -> None:
    before = weights(ours)
    tagged = latents(ours, f"a photo of a cat {tag}", negative_prompt="blurry")
    assert_same_weights(weights(ours), before)
    assert ours.loras == {}
    ours.load_lora(lora_dir / "ink.safetensors", **scales)
    by_hand = latents(ours, "a photo of a cat ", negative_prompt="blurry")
    assert torch.equal(tagged, by_hand)
    ours.unload_lora()
    assert not torch.equal(tagged, latents(ours, "a photo of a cat", negative_prompt="blurry"))


def test_tags_stack_on_loaded_loras_and_in_negative_prompts(ours, lora_dir: Path) -> None:
    """A LoRA in a subfolder, tagged in the negative prompt, over one loaded by hand: the
    same as loading both; afterwards only the one loaded by hand is merged."""
    ours.load_lora(lora_dir / "ink.safetensors", scale=0.6)
    before = weights(ours)
    tagged = latents(ours, "a cat", negative_prompt="blurry <lora:watercolor:0.4>")
    assert_same_weights(weights(ours), before)
    assert ours.loras == {"ink": 0.6}
    ours.load_lora(lora_dir / "styles" / "watercolor.safetensors", scale=0.4)
    assert torch.equal(tagged, latents(ours, "a cat", negative_prompt="blurry "))


def test_infotext_keeps_the_tag_and_gives_lora_hashes(ours, lora_dir: Path) -> None:
    from latentdiff.adapters import lora_hash

    image = ours.txt2img("a cat <lora:ink:0.7>", steps=2, width=SIZE, height=SIZE)[0]
    text = image.info["parameters"]
    assert text.startswith("a cat <lora:ink:0.7>\n")
    assert f'Lora hashes: "ink: {lora_hash(lora_dir / "ink.safetensors")}"' in text


def test_hires_fix_keeps_the_tagged_lora_for_both_passes(ours, lora_dir: Path) -> None:
    options = dict(steps=2, seed=1, width=SIZE, height=SIZE, hires_scale=1.5, output_type="latent")
    tagged = ours.txt2img("a cat <lora:ink:0.7>", **options)
    ours.load_lora(lora_dir / "ink.safetensors", scale=0.7)
    assert torch.equal(tagged, ours.txt2img("a cat ", **options))


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("a cat <lora:nowhere:1>", "no LoRA file named nowhere in"),
        ("a cat <lora:ink:1> <lora:broken:1>", "broken.safetensors"),
    ],
)
def test_bad_tags_leave_the_pipeline_as_it_was(ours, prompt: str, message: str) -> None:
    before = weights(ours)
    with pytest.raises(latentdiff.UserError, match=re.escape(message)):
        latents(ours, prompt)
    assert_same_weights(weights(ours), before)
    assert ours.loras == {}


def test_one_lora_with_two_weights_in_a_call_is_refused(ours) -> None:
    with pytest.raises(latentdiff.BadArgument, match="two different weights"):
        latents(ours, ["a <lora:ink:1>", "b <lora:ink:0.5>"])


def test_a_tag_without_lora_dirs_is_refused(pipe: latentdiff.Pipeline) -> None:
    with pytest.raises(latentdiff.BadArgument, match="no LoRA folder is set"):
        latents(pipe, "a cat <lora:ink:1>")


def test_lora_dir_on_the_command_line(diffusers_dir: Path, lora_dir: Path, tmp_path: Path, capsys) -> None:
    """``--lora-dir`` with a tag gives the image of ``--lora FILE:WEIGHT``; a tag naming no file
    is one line and exit 2 before any work."""
    common = ["--model", str(diffusers_dir), "--steps", "2"]
    assert main(["generate", "a cat <lora:ink:0.7>", *common, "--lora-dir", str(lora_dir),
                 "--out", str(tmp_path / "tag.png")]) == 0
    assert main(["generate", "a cat ", *common, "--lora", f"{lora_dir / 'ink.safetensors'}:0.7",
                 "--out", str(tmp_path / "file.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "tag.png")), np.asarray(Image.open(tmp_path / "file.png")))
    assert read_parameters(tmp_path / "tag.png").startswith("a cat <lora:ink:0.7>\n")
    capsys.readouterr()
    assert main(["generate", "a cat <lora:nowhere>", *common, "--lora-dir", str(lora_dir),
                 "--out", str(tmp_path / "never.png")]) == 2
    err = capsys.readouterr().err
    assert "no LoRA file named nowhere" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "never.png").exists()
