"""The bad-input corpus: every bad argument, file and model a user can hand latentdiff gives one
clear line (CLI: ``latentdiff: error: ...`` on stderr, exit status 2, no file written) or a
:class:`latentdiff.UserError` naming the argument (Python API) -- never a traceback from deep
inside, never a silent reinterpretation, never an allocation past the memory budget."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import latentdiff
from latentdiff.cli import main
from latentdiff.errors import BadArgument, OutOfBudget, UserError


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (the data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, diffusers_dir: Path) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad-inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / "image.png")
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(folder / "mask.png")
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(folder / "small-mask.png")
    (folder / "not-an-image.png").write_text("hello")
    (folder / "truncated.png").write_bytes((folder / "image.png").read_bytes()[:60])
    (folder / "huge.png").write_bytes(png_claiming(60000, 60000))
    (folder / "a-folder").mkdir()
    (folder / "not-a-model.safetensors").write_text("nope")
    for name, change in [("steps-zero", {"num_train_timesteps": 0}), ("beta-text", {"beta_start": "abc"}),
                         ("spacing-bad", {"timestep_spacing": "sideways"})]:
        model = folder / name
        shutil.copytree(diffusers_dir, model)
        config_file = model / "scheduler" / "scheduler_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **change}))
    nan_model = folder / "nan-weights"
    shutil.copytree(diffusers_dir, nan_model)
    from safetensors.torch import load_file, save_file

    weights = nan_model / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["conv_in.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, weights)
    out = folder / "out"
    out.mkdir()
    return {"dir": folder, "out": out, "model": diffusers_dir,
            **{p.stem: p for p in folder.iterdir() if p.name not in ("out",)}}


# (argv, the text the one line must contain).  {name} is a path from the fixture; {model} the tiny model.
CLI_CASES = [
    # numbers out of their domain, or not numbers
    (["generate", "x", "--width", "15"], "width 15 is not a positive multiple of the VAE factor 2"),
    (["generate", "x", "--width", "0"], "width 0 is not a positive multiple"),
    (["generate", "x", "--height", "-16"], "height -16 is not a positive multiple"),
    (["generate", "x", "--steps", "0"], "steps must be in [1, 1000]"),
    (["generate", "x", "--steps", "1001"], "steps must be in [1, 1000]"),
    (["generate", "x", "--steps", "abc"], "argument --steps: invalid int value"),
    (["generate", "x", "--steps", "1000"], "past the schedule's last"),
    (["generate", "x", "--guidance", "nan"], "guidance_scale must be a finite number"),
    (["generate", "x", "--guidance", "inf"], "guidance_scale must be a finite number"),
    (["generate", "x", "--guidance", "-1"], "guidance_scale must be in [0, 100]"),
    (["generate", "x", "--eta", "nan"], "eta must be a finite number"),
    (["generate", "x", "--eta", "2"], "eta must be in [0, 1]"),
    (["generate", "x", "--seed", "-2"], "seed must be in [-1, 4294967295]"),
    (["generate", "x", "--seed", "4294967296"], "seed must be in [-1, 4294967295]"),
    (["generate", "x", "--subseed-strength", "1.5"], "subseed_strength must be in [0, 1]"),
    (["generate", "x", "--subseed-strength", "nan"], "subseed_strength must be a finite number"),
    (["generate", "x", "--subseed", "-5", "--subseed-strength", "0.5"], "subseed must be in [-1, 4294967295]"),
    (["generate", "x", "--batch", "0"], "images_per_prompt must be in [1, 10000]"),
    (["generate", "x", "--clip-skip", "0"], "clip_skip must be in [1, 2]"),
    (["generate", "x", "--clip-skip", "99"], "clip_skip must be in [1, 2]"),
    (["generate", "x", "--upscale", "0"], "--upscale must be in [1, 64]"),
    (["generate", "x", "--upscale", "100000"], "--upscale must be in [1, 64]"),
    (["img2img", "x", "--image", "{image}", "--strength", "1.5"], "strength must be in [0, 1]"),
    (["img2img", "x", "--image", "{image}", "--strength", "-0.1"], "strength must be in [0, 1]"),
    (["img2img", "x", "--image", "{image}", "--strength", "nan"], "strength must be a finite number"),
    (["img2img", "x", "--image", "{image}", "--strength", "0.01", "--steps", "5"], "leaves no step to run"),
    # samplers and schedules
    (["generate", "x", "--sampler", "nope"], "unknown sampler 'nope'"),
    (["generate", "x", "--schedule", "nope"], "unknown schedule type 'nope'"),
    (["generate", "x", "--sampler", "DDIM", "--schedule", "karras"], "does not take schedule type 'karras'"),
    (["generate", "x", "--sampler", "DPM++ 2M Karras", "--schedule", "exponential"], "names schedule type 'karras'"),
    # text
    (["generate", "caf\udcff"], "prompts is not valid UTF-8"),
    (["generate", "x", "--negative", "\udcfe"], "negative_prompt is not valid UTF-8"),
    # memory
    (["generate", "x", "--batch", "64", "--memory-budget", "1M"], "over the budget of 1.0 MiB"),
    (["generate", "x", "--width", "100000", "--memory-budget", "1G"], "100000x16 x 1 image(s) needs about"),
    (["generate", "x", "--width", "200000", "--height", "64", "--memory-budget", "1G"], "over the budget"),
    (["generate", "x", "--upscale", "64", "--batch", "4", "--memory-budget", "20M"], "over the budget"),
    (["generate", "x", "--memory-budget", "abc"], "memory size 'abc' is not a number"),
    (["img2img", "x", "--image", "{huge}"], "pixels"),
    # devices and dtypes
    (["generate", "x", "--device", "cuda"], "CUDA is not available"),
    (["generate", "x", "--device", "cuda:abc"], "is not a torch device"),
    (["generate", "x", "--device", "banana"], "is not a torch device"),
    (["generate", "x", "--dtype", "int8"], "argument --dtype: invalid choice"),
    # output paths
    (["generate", "x", "--out", "{out}"], "is a directory"),
    (["generate", "x", "--out", "{dir}/missing/x.png"], "does not exist"),
    (["generate", "x", "--out", "/dev/full"], "is not a regular file"),
    (["generate", "x", "--out", "{image}/x.png"], "is not a folder"),
    # input files
    (["img2img", "x", "--image", "{dir}/nowhere.png"], "does not exist"),
    (["img2img", "x", "--image", "{not-an-image}"], "not-an-image.png"),
    (["img2img", "x", "--image", "{a-folder}"], "a-folder"),
    (["img2img", "x", "--image", "{truncated}"], "truncated.png"),
    (["inpaint", "x", "--image", "{image}", "--mask", "{small-mask}"], "mask size 8x8 differs from image size 16x16"),
    (["inpaint", "x", "--image", "{image}", "--mask", "{not-an-image}"], "not-an-image.png"),
    (["inpaint", "x", "--image", "{image}"], "the following arguments are required: --mask"),
    # models
    (["generate", "x", "--model", "{dir}/no-model"], "no such model file or folder"),
    (["generate", "x", "--model", "{not-a-model}"], "not-a-model.safetensors"),
    (["generate", "x", "--model", "{steps-zero}"], "num_train_timesteps must be in [2, 100000]"),
    (["generate", "x", "--model", "{beta-text}"], "beta_start must be int or float"),
    (["generate", "x", "--model", "{spacing-bad}"], "timestep_spacing must be one of"),
    (["generate", "x", "--model", "{nan-weights}"], "conv_in.weight"),
    (["generate", "x", "--vae", "{dir}/no-vae"], "no-vae"),
    (["generate", "x", "--model", "{not-a-model}", "--tokenizer", "{dir}/no-tokenizer"], "no-tokenizer"),
    # other commands
    (["vae", "{image}", "--size", "7"], "size"),
    (["vae", "{dir}/nowhere.png"], "does not exist"),
    (["eval", "--samplers", "nope:20", "--out", "{dir}/eval"], "nope"),
    (["eval", "--guidance", "abc", "--out", "{dir}/eval"], "abc"),
]


@pytest.mark.parametrize(("argv", "message"), CLI_CASES, ids=[" ".join(a)[:60] for a, _ in CLI_CASES])
def test_cli_bad_input_is_one_line_and_exit_2(files, argv, message, capsys) -> None:
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    if argv[0] in ("generate", "img2img", "inpaint"):
        if "--model" not in argv:
            argv += ["--model", str(files["model"])]
        if "--out" not in argv:
            argv += ["--out", str(files["out"] / "result.png")]
    before = sorted(files["out"].iterdir())
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("latentdiff: error:") and message in lines[0], lines[0]
    assert sorted(files["out"].iterdir()) == before  # nothing written


def test_corpus_is_large_enough() -> None:
    assert len(CLI_CASES) + len(API_CASES) >= 60


@pytest.fixture(scope="module")
def pipe(diffusers_dir: Path) -> latentdiff.Pipeline:
    return latentdiff.load(diffusers_dir)


IMAGE = Image.fromarray(np.zeros((16, 16, 3), np.uint8))
API_CASES = [
    (lambda p: p.txt2img(None), BadArgument, "prompts must be a string or a non-empty list of strings, got None"),
    (lambda p: p.txt2img([]), BadArgument, "prompts must be a string or a non-empty list"),
    (lambda p: p.txt2img([1]), BadArgument, "prompts must be a string"),
    (lambda p: p.txt2img("x", negative_prompt=None), BadArgument, "negative_prompt must be a string"),
    (lambda p: p.txt2img("x", negative_prompt=["a", "b"]), BadArgument, "got 2 negative prompts for 1 prompts"),
    (lambda p: p.txt2img("x", sampler=None), BadArgument, "sampler must be a string"),
    (lambda p: p.txt2img("x", schedule=3), BadArgument, "schedule must be a string or None"),
    (lambda p: p.txt2img("x", images_per_prompt="2"), BadArgument, "images_per_prompt must be an integer, got '2'"),
    (lambda p: p.txt2img("x", seed=1.7), BadArgument, "seed must be an integer, got 1.7"),
    (lambda p: p.txt2img("x", seed="3"), BadArgument, "seed must be an integer, got '3'"),
    (lambda p: p.txt2img("x", steps=2.5), BadArgument, "steps must be an integer, got 2.5"),
    (lambda p: p.txt2img("x", width=True), BadArgument, "width True is not a positive multiple"),
    (lambda p: p.txt2img("x", guidance_scale=float("nan")), BadArgument, "guidance_scale must be a finite number"),
    (lambda p: p.txt2img("x", guidance_scale="7"), BadArgument, "guidance_scale must be a number"),
    (lambda p: p.txt2img("x", eta=-1.0), BadArgument, "eta must be in [0, 1]"),
    (lambda p: p.txt2img("x", output_type="np"), BadArgument, "output_type must be one of"),
    (lambda p: p.txt2img("x", vae_tiling="yes"), BadArgument, "vae_tiling must be True or False"),
    (lambda p: p.txt2img("x", stepz=3), BadArgument, "unknown generation option(s) stepz"),
    (lambda p: p.txt2img("x", options={"steps": 3}), BadArgument, "options must be a GenerationOptions"),
    (lambda p: p.txt2img("x", latents=torch.zeros(1, 4, 4, 4)), BadArgument, "latents must be a tensor of shape"),
    (lambda p: p.txt2img("x", latents=torch.full((1, 4, 8, 8), float("nan"))), BadArgument, "latents must be finite"),
    (lambda p: p.img2img("x", None), BadArgument, "image must be a PIL image, got NoneType"),
    (lambda p: p.img2img("x", IMAGE, strength="0.5"), BadArgument, "strength must be a number"),
    (lambda p: p.inpaint("x", IMAGE, None), BadArgument, "mask must be a PIL image, got NoneType"),
    (lambda p: p.txt2img("x", images_per_prompt=64, width=1024, height=1024), OutOfBudget, "over the budget"),
]


@pytest.mark.parametrize(("call", "error", "message"), API_CASES, ids=[m[:50] for _, _, m in API_CASES])
def test_api_bad_input_names_the_argument(pipe, call, error, message, monkeypatch) -> None:
    monkeypatch.setenv("LATENTDIFF_MEMORY_BUDGET", "256M")
    with pytest.raises(error) as info:
        call(pipe)
    assert isinstance(info.value, UserError)
    assert message in str(info.value)


def test_load_takes_dtype_names_and_refuses_others(diffusers_dir: Path) -> None:
    assert latentdiff.load(diffusers_dir, dtype="float16").dtype == torch.float16
    with pytest.raises(BadArgument, match="dtype must be one of float32, float16, bfloat16, got 'int8'"):
        latentdiff.load(diffusers_dir, dtype="int8")
    with pytest.raises(BadArgument, match="is not a torch device"):
        latentdiff.load(diffusers_dir, device="gpu please")


def test_memory_budget_is_checked_before_any_allocation(pipe, monkeypatch) -> None:
    """A request over the budget is refused without running the networks at all."""
    calls = []
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        monkeypatch.setattr(module, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(OutOfBudget, match="needs about"):
        pipe.txt2img("x", width=100000, height=100000)
    assert calls == []


def test_budget_parsing_and_default(monkeypatch) -> None:
    from latentdiff import budget

    assert budget.parse_size("6G") == 6 * 2**30 and budget.parse_size("512M") == 512 * 2**20
    assert budget.parse_size("1.5K") == 1536 and budget.parse_size("100") == 100
    monkeypatch.setenv(budget.ENV_BUDGET, "2G")
    assert budget.memory_budget() == 2 * 2**30
    monkeypatch.delenv(budget.ENV_BUDGET)
    available = budget.available_memory()
    assert available is None or budget.memory_budget() == int(available * budget.AVAILABLE_FRACTION)


def test_a_long_run_says_so_after_its_first_step(monkeypatch, capsys) -> None:
    """The CLI's step report prints one time estimate when the first step shows the run will
    take more than about a minute, and stays quiet for a short run."""
    from latentdiff import cli

    clock = iter([100.0, 104.0, 200.0, 200.5])
    monkeypatch.setattr("time.perf_counter", lambda: next(clock))
    slow = cli._StepReport("generate")
    for step in range(3):
        slow(step, 20, None)
    slow.close()
    assert "this will take about 80 s (20 steps at 4.0 s each)" in capsys.readouterr().err
    fast = cli._StepReport("generate")
    fast(0, 20, None)
    fast(1, 20, None)
    fast.close()
    assert "will take" not in capsys.readouterr().err
