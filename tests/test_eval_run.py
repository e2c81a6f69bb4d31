"""``latentdiff eval``: the guidance sweep's metrics, reports, grids, plot, reference cache and sharding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import latentdiff
from latentdiff.checkpoints.clip_folder import save_clip_model
from latentdiff.cli import main
from latentdiff.eval import feature_statistics, frechet_distance_from_stats, load_statistics, save_statistics
from latentdiff.eval.config import parse_features, parse_guidance, parse_samplers
from latentdiff.eval.distributed import batches, merge_shards, shard
from latentdiff.eval.plot import Series, line_plot, nice_ticks
from latentdiff.eval.run import txt2img_seeded
from latentdiff.models.clip_model import CLIPConfig, CLIPModel
from latentdiff.world import ATTRIBUTES

SWEEP = ["--guidance", "1,3", "--samplers", "ddim:2", "--images-per-prompt", "2", "--n-prompts", "2"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP (no tokenizer files: the pipeline's tokenizer is used)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-clip") / "clip"
    save_clip_model(CLIPModel(CLIPConfig.tiny()), folder)
    return folder


@pytest.fixture(scope="module")
def first_run(diffusers_dir: Path, clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("eval")
    out, cache = root / "out", root / "cache"
    argv = ["eval", "--prompts", "builtin", *SWEEP, "--model", str(diffusers_dir), "--clip", str(clip_dir),
            "--out", str(out), "--cache-dir", str(cache)]
    assert main(argv) == 0
    return {"out": out, "cache": cache, "argv": argv, "metrics": json.loads((out / "metrics.json").read_text())}


def test_outputs_and_keys(first_run: dict) -> None:
    out, metrics = first_run["out"], first_run["metrics"]
    assert metrics["fd_name"] == "FD (clip-tiny-clip0)"  # a clip/ folder is named after its parent
    assert metrics["n_prompts"] == 2 and metrics["images_per_prompt"] == 2 and metrics["world_size"] == 1
    assert metrics["reference"]["n_images"] == 4 and metrics["reference"]["cached"] is False
    assert [r["setting"] for r in metrics["results"]] == ["ddim2_w1", "ddim2_w3"]
    for r in metrics["results"]:
        assert {"setting", "sampler", "steps", "guidance", "n_images", "fd", "clip_score", "world",
                "world_by_objects", "grid", "seconds"} <= r.keys()
        assert r["n_images"] == 4 and r["fd"] >= 0 and 0 <= r["clip_score"] <= 100
        assert r["world"]["n"] == 4 and set(ATTRIBUTES) <= r["world"].keys()
        assert set(r["world_by_objects"]) == {"1 object", "2 objects"}
        grid = Image.open(out / r["grid"])
        assert r["grid"] == f"grid_{r['setting']}.png" and grid.width >= 2 * 64 and grid.height >= 2 * 64
    report = (out / "report.md").read_text()
    assert "| ddim2_w3 | ddim | 2 | 3 |" in report and "FD (clip-tiny-clip0)" in report and "fd_vs_clip.png" in report
    plot = Image.open(out / "fd_vs_clip.png")
    assert plot.size == (800, 560) and len(plot.convert("RGB").getcolors(1 << 20)) > 10  # something was drawn


def test_fd_is_frechet_distance_to_the_cached_reference(first_run: dict, diffusers_dir: Path, clip_dir: Path) -> None:
    """Recompute setting ddim2_w3's FD from the images themselves (seeds 0..3) and the cached statistics."""
    from latentdiff.eval.scorers import ClipScorer
    from latentdiff.world import held_out_prompts

    metrics = first_run["metrics"]
    pipe = latentdiff.load(diffusers_dir)
    prompts = [p for p in held_out_prompts(2) for _ in range(2)]
    images = pipe.txt2img(held_out_prompts(2), steps=2, guidance_scale=3, sampler="ddim", seed=0, images_per_prompt=2)
    feats = ClipScorer(clip_dir, pipe.tokenizer, "cpu").image_features(images)
    mu, sigma = load_statistics(metrics["reference"]["stats"])
    expected = frechet_distance_from_stats(*feature_statistics(feats), mu, sigma)
    assert metrics["results"][1]["fd"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert len(prompts) == metrics["results"][1]["n_images"]


def test_reference_statistics_are_cached(first_run: dict, tmp_path: Path) -> None:
    stats = Path(first_run["metrics"]["reference"]["stats"])
    before = stats.stat().st_mtime_ns
    argv = [a if a != str(first_run["out"]) else str(tmp_path / "again") for a in first_run["argv"]]
    assert main(argv) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["reference"]["cached"] is True and again["reference"]["stats"] == str(stats)
    assert stats.stat().st_mtime_ns == before
    for a, b in zip(first_run["metrics"]["results"], again["results"]):  # deterministic seeds: the same numbers
        assert a["fd"] == pytest.approx(b["fd"], rel=1e-6) and a["clip_score"] == pytest.approx(b["clip_score"])
        assert a["world"] == b["world"]


def test_prompt_file_with_reference_folder_and_npz(diffusers_dir: Path, clip_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    refs = tmp_path / "real"
    refs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(refs / f"{i}.png")
    common = ["eval", "--prompts", str(prompts), "--guidance", "2", "--samplers", "euler_a:2", "--images-per-prompt", "1",
              "--model", str(diffusers_dir), "--clip", str(clip_dir), "--cache-dir", str(tmp_path / "cache")]
    assert main([*common, "--reference", str(refs), "--out", str(tmp_path / "a")]) == 0
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert a["reference"]["n_images"] == 3 and "world" not in a["results"][0] and a["n_prompts"] == 2
    # the same statistics given as a .npz give the same FD
    npz = tmp_path / "ref.npz"
    save_statistics(npz, *load_statistics(a["reference"]["stats"]))
    assert main([*common, "--reference", str(npz), "--out", str(tmp_path / "b")]) == 0
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert b["results"][0]["fd"] == pytest.approx(a["results"][0]["fd"], rel=1e-6)


def test_seeded_generation_matches_txt2img(diffusers_dir: Path) -> None:
    pipe = latentdiff.load(diffusers_dir)
    kwargs = dict(steps=2, guidance_scale=3.0, sampler="euler_a")
    consecutive = txt2img_seeded(pipe, ["a cat", "a dog"], [5, 6], **kwargs)
    expected = pipe.txt2img(["a cat", "a dog"], seed=5, **kwargs)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(consecutive, expected))
    strided = txt2img_seeded(pipe, ["a cat", "a dog"], [9, 3], **kwargs)  # any seeds: image i is seeds[i]'s alone
    for image, prompt, seed in zip(strided, ["a cat", "a dog"], [9, 3]):
        alone = np.asarray(pipe.txt2img(prompt, seed=seed, **kwargs)[0]).astype(int)
        assert np.abs(np.asarray(image).astype(int) - alone).max() <= 1


@pytest.mark.parametrize(("n", "world"), [(10, 3), (4, 2), (1, 4), (0, 2)])
def test_shards_partition_the_images(n: int, world: int) -> None:
    shards = [shard(n, r, world) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    seed = 100
    # every image keeps the seed it has in a single process run: seed + global index
    single = {g: seed + g for g in shard(n, 0, 1)}
    assert all(single[g] == seed + g for s in shards for g in s)
    merged = merge_shards([[(g, f"img{g}") for g in s] for s in shards], n)
    assert merged == [f"img{g}" for g in range(n)]


def test_merge_shards_and_batches_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="missing"):
        merge_shards([[(0, "a")], [(2, "c")]], 3)
    with pytest.raises(ValueError, match="two ranks"):
        merge_shards([[(0, "a")], [(0, "b")]], 1)
    with pytest.raises(ValueError):
        shard(4, 2, 2)
    assert batches([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]


def test_parsers() -> None:
    assert parse_guidance("1, 3,7.5") == [1.0, 3.0, 7.5]
    assert parse_samplers("ddim:20,Euler a:30,dpmpp_2m") == [("ddim", 20), ("euler_a", 30), ("dpmpp_2m", 20)]
    assert parse_features("clip").kind == "clip"
    for bad in ("x", "1,,2", "-1"):
        with pytest.raises(ValueError, match="--guidance"):
            parse_guidance(bad)
    with pytest.raises(ValueError, match="unknown sampler"):
        parse_samplers("nope:20")
    with pytest.raises(ValueError, match="SAMPLER:STEPS"):
        parse_samplers("ddim:x")


def test_plot_helpers() -> None:
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(13.2, 13.2)  # a zero range still gets ticks
    image = line_plot([Series("a", [1, 2, float("nan")], [3, 4, 5], ["w=1", "w=2", "w=3"]), Series("b", [], [])],
                      "t", "x", "y", size=(400, 300))
    assert image.size == (400, 300)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prompts", "/nowhere.txt"], "prompts file /nowhere.txt does not exist"),
        (["--features", "resnet"], "unknown feature extractor 'resnet'"),
        (["--features", "inception:/nowhere.pth"], "no such Inception weight file"),
        (["--prompts", "{prompts}"], "a prompts file needs --reference"),
        (["--prompts", "{prompts}", "--reference", "/nowhere"], "reference /nowhere does not exist"),
        (["--prompts", "{prompts}", "--reference", "{prompts}"], "must be a folder of images or a statistics .npz"),
        (["--samplers", "nope:2"], "unknown sampler 'nope'"),
        (["--guidance", "abc"], "--guidance: 'abc' is not a number"),
        (["--n-prompts", "1", "--images-per-prompt", "1"], "FD needs at least 2 images per setting"),
        (["--n-prompts", "100000"], "--n-prompts must be in 1..400"),
        (["--clip", "/nowhere"], "--clip /nowhere is not a CLIP model folder"),
        (["--width", "15"], "width 15 is not a positive multiple of the VAE factor 2"),
    ],
)
def test_bad_inputs_exit_2(argv: list[str], message: str, diffusers_dir: Path, clip_dir: Path, tmp_path: Path,
                           capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    argv = [a.replace("{prompts}", str(prompts)) for a in argv]
    base = ["eval", "--model", str(diffusers_dir), "--clip", str(clip_dir), "--out", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"), "--samplers", "ddim:1", "--guidance", "1", "--n-prompts", "2"]
    assert main([*base, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("latentdiff: error:") and message in err, err


def test_model_without_clip_needs_clip_flag(diffusers_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["eval", "--model", str(diffusers_dir), "--out", str(tmp_path)]) == 2
    assert "has no clip/ folder" in capsys.readouterr().err


def test_torchrun_two_ranks_match_one_process(first_run: dict, diffusers_dir: Path, clip_dir: Path,
                                              tmp_path: Path) -> None:
    """The same sweep under ``torchrun --nproc_per_node 2``: same numbers, same grid images."""
    argv = [a if a != str(first_run["out"]) else str(tmp_path / "dist") for a in first_run["argv"]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "latentdiff.cli", *argv, "--batch-size", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist = json.loads((tmp_path / "dist" / "metrics.json").read_text())
    assert dist["world_size"] == 2 and dist["reference"]["cached"] is True
    for a, b in zip(first_run["metrics"]["results"], dist["results"]):
        assert a["setting"] == b["setting"]
        assert b["fd"] == pytest.approx(a["fd"], rel=1e-3, abs=1e-5)
        assert b["clip_score"] == pytest.approx(a["clip_score"], abs=1e-3)
        grid_a = np.asarray(Image.open(first_run["out"] / a["grid"])).astype(int)
        grid_b = np.asarray(Image.open(tmp_path / "dist" / b["grid"])).astype(int)
        assert grid_a.shape == grid_b.shape and np.abs(grid_a - grid_b).max() <= 1


def test_fid_inception_features(diffusers_dir: Path, clip_dir: Path, tmp_path: Path) -> None:
    """``--features inception:PATH``: the FID network (random weights here) gives 2048-d features, reported as FID."""
    from latentdiff.eval.inception import FIDInceptionV3

    torch.manual_seed(0)
    weights = tmp_path / "pt_inception-random.pth"
    torch.save(FIDInceptionV3().state_dict(), weights)
    out = tmp_path / "fid"
    assert main(["eval", "--prompts", "builtin", "--n-prompts", "2", "--images-per-prompt", "1", "--guidance", "2",
                 "--samplers", "ddim:1", "--model", str(diffusers_dir), "--clip", str(clip_dir),
                 "--features", f"inception:{weights}", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fd_name"] == "FID" and metrics["features"]["name"] == "inception-v3-fid"
    assert np.load(metrics["reference"]["stats"])["mu"].shape == (2048,)
    assert metrics["results"][0]["fd"] >= 0 and "| FID |" in (out / "report.md").read_text()


def test_reports_name_the_builtin_models_files_the_same_on_every_machine() -> None:
    from latentdiff.loading import BUILTIN_MODEL, shown_path

    assert shown_path(BUILTIN_MODEL / "clip") == f"latentdiff/weights/{BUILTIN_MODEL.name}/clip"
    assert shown_path("runs/elsewhere/clip") == "runs/elsewhere/clip"
