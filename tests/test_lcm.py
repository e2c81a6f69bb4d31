"""Latent consistency models against diffusers: the LCM sampler (LCMScheduler) on a normal SD
model (as LCM-LoRA is used), an LCM-distilled UNet (guidance as a ``timestep_cond`` embedding)
through LatentConsistencyModelPipeline, and the guidance-scale embedding itself."""

from __future__ import annotations

from pathlib import Path

import diffusers
import pytest
import torch
from conftest import assert_rel_close, tiny_diffusers_components
from test_generate import PROMPTS, SEED, SIZE, compare, generators, with_scheduler
from test_samplers import run_diffusers, run_ours

import latentdiff
from latentdiff.cli import main
from latentdiff.models.layers import guidance_scale_embedding
from latentdiff.models.unet import UNet2DCondition, UNetConfig
from latentdiff.samplers import SAMPLERS, get_sampler
from latentdiff.schedule import SD15_SCHEDULER_CONFIG, NoiseSchedule, ScheduleConfig

COND_DIM = 32
# The boundary conditions (c_skip ~ 0.25 / (10 t)^2) are below float32 noise with SD's default
# timestep_scaling 10 at the timesteps of a few steps; a small scaling makes them visible.
VISIBLE_SCALING = 0.05



# ----------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 8, 25, 50])
@pytest.mark.parametrize("strength", [1.0, 0.6, 0.3])
def test_lcm_timesteps_match_set_timesteps(steps, strength):
    ns = NoiseSchedule(ScheduleConfig.from_dict(SD15_SCHEDULER_CONFIG), "LCMScheduler")
    sched = diffusers.LCMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    try:
        sched.set_timesteps(steps, strength=strength)
    except ValueError:
        with pytest.raises(ValueError):
            ns.lcm_timesteps(steps, strength)
        return
    assert ns.lcm_timesteps(steps, strength).tolist() == sched.timesteps.tolist()


def test_lcm_plan_follows_the_config_and_cuts_img2img_tails():
    cfg = ScheduleConfig.from_dict({**SD15_SCHEDULER_CONFIG, "original_inference_steps": 20, "timestep_scaling": 5})
    spec = SAMPLERS["lcm"]
    ns = spec.schedule(cfg)
    sched = diffusers.LCMScheduler.from_config(cfg.to_dict("LCMScheduler"))
    sched.set_timesteps(4)
    plan = spec.plan(ns, 4)
    assert plan.options["timesteps"] == [float(t) for t in sched.timesteps.tolist()]
    assert plan.options["timestep_scaling"] == 5.0
    assert list(plan.timesteps.values()) == plan.options["timesteps"]
    assert float(plan.sigmas[-1]) == 0.0 and plan.discrete_timesteps
    tail = spec.plan(ns, 4, strength=0.6)  # int(4 * 0.6) = 2 steps: the last two of the full list
    assert tail.options["timesteps"] == plan.options["timesteps"][2:]
    assert torch.equal(tail.sigmas, plan.sigmas[2:])
    with pytest.raises(ValueError, match="at most"):
        spec.plan(ns, 21)
    with pytest.raises(ValueError, match="schedule type"):
        get_sampler("lcm", "karras")


# ----------------------------------------------------------------------------- sampler alone
@pytest.mark.parametrize("config", [{}, {"timestep_scaling": 0.01}, {"timestep_scaling": VISIBLE_SCALING},
                                    {"prediction_type": "v_prediction", "timestep_scaling": 0.1},
                                    {"original_inference_steps": 20, "timestep_scaling": 0.1},
                                    {"clip_sample": True, "clip_sample_range": 0.5}])
def test_lcm_sampler_matches_diffusers_loop(config):
    """The scheduler loop of test_samplers (a toy VP model, per-image generators): txt2img at 1, 4, 8
    and all original steps, and img2img tails."""
    spec = SAMPLERS["lcm"]
    cfg = ScheduleConfig.from_dict({**SD15_SCHEDULER_CONFIG, **config})
    x0 = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(99))
    for steps in (1, 4, 8, cfg.original_inference_steps or 50):
        assert_rel_close(run_ours(spec, cfg, steps), run_diffusers(spec, cfg, steps), 1e-5)
    for steps, strength in [(4, 0.6), (8, 0.5), (10, 0.75)]:
        assert_rel_close(run_ours(spec, cfg, steps, strength=strength, x0=x0),
                         run_diffusers(spec, cfg, steps, strength=strength, x0=x0), 1e-5)


# ----------------------------------------------------------------------------- (a) LCM sampler, SD pipelines
@pytest.mark.parametrize("steps", [4, 8])
@pytest.mark.parametrize("guidance", [1.0, 1.5])
def test_txt2img_lcm_matches_diffusers(pipe, ref, steps: int, guidance: float) -> None:
    reference = with_scheduler(ref, "lcm")
    assert type(reference.scheduler).__name__ == "LCMScheduler"
    compare(
        lambda **kw: pipe.txt2img(PROMPTS, steps=steps, guidance_scale=guidance, seed=SEED, sampler="LCM",
                                  width=SIZE, height=SIZE, **kw),
        lambda **kw: reference(PROMPTS, num_inference_steps=steps, guidance_scale=guidance,
                               generator=generators(len(PROMPTS)), width=SIZE, height=SIZE, **kw),
        pipe, reference,
    )


@pytest.mark.parametrize("steps", [4, 8])
@pytest.mark.parametrize("guidance", [1.0, 1.5])
def test_img2img_lcm_matches_diffusers(pipe, ref, init_image, steps: int, guidance: float) -> None:
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
    img2img._original_scheduler_config = with_scheduler(ref, "ddim")._original_scheduler_config
    with_scheduler(img2img, "lcm")
    compare(
        lambda **kw: pipe.img2img(PROMPTS, image=init_image, strength=0.6, steps=steps, guidance_scale=guidance,
                                  seed=SEED, sampler="lcm", **kw),
        lambda **kw: img2img(PROMPTS, image=init_image, strength=0.6, num_inference_steps=steps,
                             guidance_scale=guidance, generator=generators(len(PROMPTS)), **kw),
        pipe, img2img,
    )


# ----------------------------------------------------------------------------- (b) LCM-distilled UNet
def tiny_lcm_unet():
    torch.manual_seed(1)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32, time_cond_proj_dim=COND_DIM,
    ).eval()


@pytest.fixture(scope="module")
def lcm_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A tiny LCM-distilled pipeline saved by diffusers (LatentConsistencyModelPipeline, LCMScheduler
    with a small timestep_scaling, read from the folder's scheduler config)."""
    parts = tiny_diffusers_components(tokenizer_dir)
    parts["unet"] = tiny_lcm_unet()
    parts["scheduler"] = diffusers.LCMScheduler.from_config(SD15_SCHEDULER_CONFIG, timestep_scaling=VISIBLE_SCALING)
    lcm = diffusers.LatentConsistencyModelPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("lcm-tiny")
    lcm.save_pretrained(folder, safe_serialization=True)
    return folder


def test_guidance_scale_embedding_matches_diffusers():
    w = torch.tensor([0.0, 0.5, 3.5, 7.0, 11.25])
    reference = diffusers.LatentConsistencyModelPipeline.get_guidance_scale_embedding
    for dim in (4, 32, 33, 256):
        theirs = reference(None, w, embedding_dim=dim)
        ours = guidance_scale_embedding(w, dim)
        assert ours.dtype == torch.float32 and torch.equal(ours, theirs), dim
    with pytest.raises(ValueError, match="1-D"):
        guidance_scale_embedding(w[None], 32)


def test_time_cond_proj_dim_is_a_config_field():
    assert UNetConfig().time_cond_proj_dim is None
    assert UNetConfig.from_dict({**UNetConfig.tiny().to_dict(), "time_cond_proj_dim": 16}).time_cond_proj_dim == 16
    unet = UNet2DCondition(UNetConfig.tiny().replace(time_cond_proj_dim=16))
    assert tuple(unet.state_dict()["time_embedding.cond_proj.weight"].shape) == (32, 16)
    assert "time_embedding.cond_proj.weight" not in UNet2DCondition(UNetConfig.tiny()).state_dict()
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        UNetConfig.tiny().replace(time_cond_proj_dim=0).validate()


def test_lcm_unet_loads_and_matches_diffusers(lcm_dir: Path):
    ours = latentdiff.load(lcm_dir).unet
    theirs = diffusers.UNet2DConditionModel.from_pretrained(lcm_dir / "unet").eval()
    assert ours.config.time_cond_proj_dim == COND_DIM
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, 128, generator=g)
    t = torch.tensor([999, 259])
    cond = guidance_scale_embedding(torch.tensor([7.0, 2.0]), COND_DIM)
    with torch.no_grad():
        expected = theirs(x, t, ctx, timestep_cond=cond).sample
        assert_rel_close(ours(x, t, ctx, timestep_cond=cond), expected)
        assert_rel_close(ours(x, t, ctx), theirs(x, t, ctx).sample)
        assert (ours(x, t, ctx) - expected).abs().max() > 1e-3 * expected.abs().max()  # the condition matters


@pytest.mark.parametrize("sampler", ["lcm", "euler"])
def test_lcm_distilled_txt2img_matches_diffusers(lcm_dir: Path, sampler: str):
    """LatentConsistencyModelPipeline (guidance 8 as the embedding of 7, one UNet pass per step);
    any other sampler on such a UNet is StableDiffusionPipeline's, which does the same."""
    pipe = latentdiff.load(lcm_dir)
    if sampler == "lcm":
        reference = diffusers.LatentConsistencyModelPipeline.from_pretrained(lcm_dir)
        reference.set_progress_bar_config(disable=True)
    else:
        reference = with_scheduler(diffusers.StableDiffusionPipeline.from_pretrained(lcm_dir), sampler)
    compare(
        lambda **kw: pipe.txt2img(PROMPTS, steps=4, guidance_scale=8.0, seed=SEED, sampler=sampler,
                                  negative_prompt="ignored by LCM", width=SIZE, height=SIZE, **kw),
        lambda **kw: reference(PROMPTS, num_inference_steps=4, guidance_scale=8.0,
                               generator=generators(len(PROMPTS)), width=SIZE, height=SIZE, **kw),
        pipe, reference,
    )


# ----------------------------------------------------------------------------- (d) registry, CLI
def test_registry_and_cli_list_lcm(capsys):
    spec = get_sampler("LCM")
    assert spec is SAMPLERS["lcm"] and get_sampler("lcm") is spec
    assert (spec.diffusers_class, spec.plan_kind, spec.stochastic, spec.schedules) == ("LCMScheduler", "lcm", True, ())
    assert main(["samplers"]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines() if row.startswith("lcm "))
    assert "LCM" in line and "LCMScheduler" in line


def test_lcm_lora_through_load_lora_matches_diffusers(diffusers_dir: Path, tmp_path: Path) -> None:
    """An LCM-LoRA file (kohya keys) merged with load_lora and sampled with "lcm" at guidance 1
    equals diffusers' load_lora_weights + fuse_lora with LCMScheduler."""
    pytest.importorskip("peft")
    from test_lora import kohya_file, random_lora

    pipe = latentdiff.load(diffusers_dir)
    lora = kohya_file(random_lora(pipe, seed=9), tmp_path / "lcm-lora.safetensors")
    pipe.load_lora(lora)
    ref = with_scheduler(diffusers.StableDiffusionPipeline.from_pretrained(diffusers_dir), "lcm")
    ref.load_lora_weights(str(tmp_path), weight_name=lora.name)
    ref.fuse_lora(lora_scale=1.0)
    compare(
        lambda **kw: pipe.txt2img(PROMPTS, steps=4, guidance_scale=1.0, seed=SEED, sampler="lcm",
                                  width=SIZE, height=SIZE, **kw),
        lambda **kw: ref(PROMPTS, num_inference_steps=4, guidance_scale=1.0, generator=generators(2),
                         width=SIZE, height=SIZE, **kw),
        pipe, ref,
    )


def test_the_builtin_models_lcm_lora_gives_diffusers_images(tmp_path: Path) -> None:
    """The shipped distilled LoRA loads in diffusers (load_lora_weights) and gives the images
    latentdiff gives with it (the built-in model's fast default: LCM, guidance 1)."""
    pytest.importorskip("peft")
    from latentdiff.loading import BUILTIN_MODEL

    lora = BUILTIN_MODEL / "lcm_lora.safetensors"
    pipe = latentdiff.load(dtype=torch.float32)
    pipe.load_lora(lora)
    ref = with_scheduler(diffusers.StableDiffusionPipeline.from_pretrained(BUILTIN_MODEL, dtype=torch.float32),
                         "lcm")
    ref.load_lora_weights(str(BUILTIN_MODEL), weight_name=lora.name)
    ref.fuse_lora(lora_scale=1.0)
    prompts = ["a large red circle in the center on a white background",
               "a small blue square in the top left on a black background"]
    compare(
        lambda **kw: pipe.txt2img(prompts, steps=8, guidance_scale=1.0, seed=SEED, sampler="lcm", **kw),
        lambda **kw: ref(prompts, num_inference_steps=8, guidance_scale=1.0, generator=generators(2),
                         width=64, height=64, **kw),
        pipe, ref,
    )
