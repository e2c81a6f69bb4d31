"""Samplers: equivalence with diffusers' scheduler loops, convergence on an analytic problem,
the registry and the callback."""

import inspect
import math
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from _oracles import k_diffusion_sampling

from latentdiff.samplers import (
    SAMPLERS,
    SamplingCancelled,
    get_sampler,
    lms_coefficient,
    randn_like,
    sample_ddim,
    sample_euler,
    vp_denoiser,
)
from latentdiff.samplers.sde import BrownianNoise
from latentdiff.schedule import SD15_SCHEDULER_CONFIG, NoiseSchedule, ScheduleConfig

SHAPE = (2, 4, 8, 8)
W = torch.randn(4, 4, generator=torch.Generator().manual_seed(123)) / 2


def eps_model(x, t):
    """Deterministic toy VP model: a channel mix through tanh plus t-dependent terms."""
    t = torch.as_tensor(t).to(torch.float32)
    if t.ndim:
        t = t.reshape(-1, *([1] * (x.ndim - 1)))
    h = torch.einsum("oc,bchw->bohw", W, x)
    return torch.tanh(h) * 0.5 + 0.5 * x * torch.cos(t / 300) + 0.2 * torch.sin(t / 150 + x)


def gens(seed=5):
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(SHAPE[0])]


def run_diffusers(spec, cfg, steps, *, strength=None, step_kw=None, x0=None):
    """diffusers' pipeline loop: initial noise from per-image CPU generators, which the
    stochastic schedulers then keep drawing from.  DPMSolverSDEScheduler seeds one Brownian
    tree per scheduler (``noise_sampler_seed``), latentdiff (as A1111) one per image from the
    image's seed: that one runs image by image (the toy model treats images independently)."""
    pytest.importorskip("diffusers")
    if not spec.diffusers_class:
        pytest.skip(f"diffusers has no {spec.name!r}; k-diffusion is its reference")
    if spec.diffusers_class == "DPMSolverSDEScheduler":
        return torch.cat([_run_diffusers(spec, cfg, steps, [g], strength, step_kw,
                                         None if x0 is None else x0[i:i + 1], noise_sampler_seed=g.initial_seed())
                          for i, g in enumerate(gens())])
    return _run_diffusers(spec, cfg, steps, gens(), strength, step_kw, x0)


def _run_diffusers(spec, cfg, steps, g, strength, step_kw, x0, **config):
    diffusers = pytest.importorskip("diffusers")
    sched = getattr(diffusers, spec.diffusers_class).from_config(
        {**cfg.to_dict(spec.diffusers_class), **spec.reference_config, **config})
    noise = randn_like(torch.zeros((len(g), *SHAPE[1:])), g)
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    if strength is None:
        lat = noise * sched.init_noise_sigma
    else:
        init_timestep = min(int(steps * strength), steps)
        t_start = max(steps - init_timestep, 0)
        timesteps = timesteps[t_start * sched.order:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
        lat = sched.add_noise(x0, noise, timesteps[:1])
    kw = dict(step_kw or {})
    if (spec.stochastic or kw.get("eta", 0) > 0) and "generator" in inspect.signature(sched.step).parameters:
        kw["generator"] = g
    for t in timesteps:
        out = eps_model(sched.scale_model_input(lat, t), t)
        lat = sched.step(out, t, lat, **kw).prev_sample
    return lat


def run_ours(spec, cfg, steps, *, strength=None, options=None, x0=None):
    ns = spec.schedule(cfg)
    plan = spec.plan(ns, steps, strength=strength)
    denoise = vp_denoiser(eps_model, ns, discrete_timesteps=plan.discrete_timesteps, timesteps=plan.timesteps)
    g = gens()
    noise = randn_like(torch.zeros(SHAPE), g)
    x = noise * plan.init_noise_sigma if strength is None else x0 + noise * plan.sigmas[0]
    x = spec(denoise, x, plan.sigmas, generator=g, **plan.options, **(options or {}))
    return plan.to_vp(x)


def assert_rel(out, ref, tol=1e-4):
    assert torch.isfinite(ref).all()
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err < tol, f"relative error {err:.3g}"


# ----------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_matches_diffusers(sampler, spacing, steps):
    spec = SAMPLERS[sampler]
    cfg = ScheduleConfig(timestep_spacing=spacing)
    assert_rel(run_ours(spec, cfg, steps), run_diffusers(spec, cfg, steps))


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_matches_diffusers_odd_steps_and_tiny_runs(sampler):
    spec = SAMPLERS[sampler]
    for spacing, steps in [("trailing", 7), ("linspace", 7), ("leading", 1), ("linspace", 2), ("leading", 3)]:
        cfg = ScheduleConfig(timestep_spacing=spacing)
        assert_rel(run_ours(spec, cfg, steps), run_diffusers(spec, cfg, steps))


@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if s != "plms"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_matches_diffusers_v_prediction(sampler, spacing):
    spec = SAMPLERS[sampler]
    cfg = ScheduleConfig(timestep_spacing=spacing, prediction_type="v_prediction")
    for steps in (10, 25):
        assert_rel(run_ours(spec, cfg, steps), run_diffusers(spec, cfg, steps))


@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_ddim_eta_matches_diffusers(eta, spacing):
    spec = SAMPLERS["ddim"]
    cfg = ScheduleConfig(timestep_spacing=spacing)
    for steps in (10, 25):
        assert_rel(run_ours(spec, cfg, steps, options={"eta": eta}),
                   run_diffusers(spec, cfg, steps, step_kw={"eta": eta}))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_clip_sample_matches_diffusers(sampler):
    spec = SAMPLERS[sampler]
    cfg = ScheduleConfig(clip_sample=True, clip_sample_range=0.5)
    assert_rel(run_ours(spec, cfg, 10), run_diffusers(spec, cfg, 10))


@pytest.mark.parametrize("schedule", ["karras", "exponential"])
@pytest.mark.parametrize("sampler", ["euler", "heun", "lms", "dpmpp_2m", "unipc", "dpm2", "dpm2_a", "deis",
                                     "dpmpp_2m_sde", "dpmpp_sde"])
def test_schedule_types_match_diffusers(sampler, schedule):
    spec = get_sampler(sampler, schedule)
    for cfg in (ScheduleConfig(timestep_spacing="leading"), ScheduleConfig()):
        for steps in (10, 25):
            assert_rel(run_ours(spec, cfg, steps), run_diffusers(spec, cfg, steps), 1e-5)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_sd15_config_verbatim_matches_from_config(sampler):
    """SD 1.5's own scheduler_config.json (no timestep_spacing), read as diffusers'
    ``<Scheduler>.from_config(pipe.scheduler.config)`` reads it, for every sampler."""
    spec = SAMPLERS[sampler]
    cfg = ScheduleConfig.from_dict(SD15_SCHEDULER_CONFIG)
    for steps in (8, 20):
        assert_rel(run_ours(spec, cfg, steps), run_diffusers(spec, cfg, steps), 1e-5)


# Left out (documented deviations, diffusers bugs not mirrored): PLMS, whose repeated-timestep
# list diffusers slices with the step offset, dropping the repeat and re-reading the sample at a
# skipped level; LMS, whose order diffusers takes from the absolute step index, so the first
# tail steps use coefficients for sigmas never visited.  latentdiff runs the plain tail.
@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if s not in ("plms", "lms")])
def test_img2img_matches_diffusers(sampler):
    spec = SAMPLERS[sampler]
    cfg = ScheduleConfig()
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(99))
    for steps, strength in [(10, 0.75), (25, 0.5)]:
        assert_rel(run_ours(spec, cfg, steps, strength=strength, x0=x0),
                   run_diffusers(spec, cfg, steps, strength=strength, x0=x0))


# ----------------------------------------------------------------------------- k-diffusion oracle
# What diffusers cannot check: DPM++ 2S a (no diffusers scheduler), A1111's one Brownian tree per
# image in a batch, A1111's Brownian DPM++ 2M SDE, and schedule types diffusers' class lacks.
# k-diffusion's own sampler runs on the same plan sigmas from the same start with the same
# denoiser (it passes a batch of equal sigmas) and the same noise.
K_CONFIGS = {"sd15": ScheduleConfig(), "trailing-v": ScheduleConfig(timestep_spacing="trailing",
                                                                     prediction_type="v_prediction")}


def run_with_k_diffusion(kfn_name, spec, cfg, steps, *, strength=None, brownian=False, **options):
    """(ours, k-diffusion's ``kfn_name``), as VP latents.  Noise: drawn from the per-image
    generators as ours draws it, or, with ``brownian``, k-diffusion's BrownianTreeNoiseSampler
    with one tree per image seeded with the image's seed over the whole schedule's sigma range
    (what A1111's create_noise_sampler makes, also for img2img); ours then uses its plan's trees
    (DPM++ SDE) or a BrownianNoise made the same way."""
    ks = k_diffusion_sampling()
    if ks is None:
        pytest.skip("k-diffusion is not installed")
    ns = spec.schedule(cfg)
    full, plan = spec.plan(ns, steps), spec.plan(ns, steps, strength=strength)
    denoise = vp_denoiser(eps_model, ns, discrete_timesteps=plan.discrete_timesteps, timesteps=plan.timesteps)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(99))
    lo, hi = float(full.sigmas[full.sigmas > 0].min()), float(full.sigmas.max())
    seeds = [g.initial_seed() for g in gens()]
    outs = []
    for reference in (False, True):
        g = gens()
        noise = randn_like(torch.zeros(SHAPE), g)
        x = noise * plan.init_noise_sigma if strength is None else x0 + noise * plan.sigmas[0]
        if reference:
            if brownian:
                noise_sampler = ks.BrownianTreeNoiseSampler(x, lo, hi, seed=seeds)
            else:
                def noise_sampler(sigma, sigma_next, x=x, g=g):
                    return randn_like(x, g)
            out = getattr(ks, kfn_name)(lambda x, s: denoise(x, s[0]), x, plan.sigmas, disable=True,
                                        noise_sampler=noise_sampler, **options)
        else:
            extra = {}
            if brownian and "brownian_range" not in plan.options:
                extra["noise_sampler"] = BrownianNoise(x, lo, hi, seeds)
            out = spec(denoise, x, plan.sigmas, generator=g, **plan.options, **extra, **options)
        outs.append(plan.to_vp(out))
    return outs


@pytest.mark.parametrize("config", list(K_CONFIGS))
@pytest.mark.parametrize("schedule", [None, "karras", "exponential", "sgm_uniform"])
def test_dpmpp_2s_a_matches_k_diffusion(schedule, config):
    spec = get_sampler("dpmpp_2s_a", schedule)
    for steps in (1, 2, 10, 25):
        assert_rel(*run_with_k_diffusion("sample_dpmpp_2s_ancestral", spec, K_CONFIGS[config], steps), 1e-5)
    assert_rel(*run_with_k_diffusion("sample_dpmpp_2s_ancestral", spec, K_CONFIGS[config], 25, strength=0.5), 1e-5)


@pytest.mark.parametrize("config", list(K_CONFIGS))
@pytest.mark.parametrize("schedule", [None, "karras", "exponential", "sgm_uniform"])
def test_dpmpp_sde_batch_matches_k_diffusion_with_a_tree_per_image(schedule, config):
    """A batch: one Brownian tree per image seeded with its seed (A1111), spanning the whole
    schedule in img2img too; diffusers (one tree per scheduler) checks batches of one."""
    spec = get_sampler("dpmpp_sde", schedule)
    for steps in (1, 2, 10, 25):
        assert_rel(*run_with_k_diffusion("sample_dpmpp_sde", spec, K_CONFIGS[config], steps, brownian=True), 1e-5)
    assert_rel(*run_with_k_diffusion("sample_dpmpp_sde", spec, K_CONFIGS[config], 25, strength=0.5, brownian=True),
               1e-5)


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("brownian", [False, True], ids=["generator-noise", "brownian-noise"])
def test_dpmpp_2m_sde_matches_k_diffusion(brownian, solver_type):
    """k-diffusion's sample_dpmpp_2m_sde: A1111's DPM++ 2M SDE (Brownian noise, on A1111's
    default exponential schedule among others) and the "heun" solver type."""
    for schedule in (None, "exponential"):
        spec = get_sampler("dpmpp_2m_sde", schedule)
        for config in K_CONFIGS.values():
            for steps in (2, 10, 25):
                assert_rel(*run_with_k_diffusion("sample_dpmpp_2m_sde", spec, config, steps, brownian=brownian,
                                                 solver_type=solver_type), 1e-5)


@pytest.mark.parametrize("schedule", ["karras", "exponential", "sgm_uniform"])
def test_euler_a_schedule_types_match_k_diffusion(schedule):
    """diffusers' EulerAncestralDiscreteScheduler has no Karras/exponential sigmas: k-diffusion's
    sample_euler_ancestral on the same sigmas with the same noise."""
    spec = get_sampler("euler_a", schedule)
    for config in K_CONFIGS.values():
        for steps in (1, 2, 10, 25):
            assert_rel(*run_with_k_diffusion("sample_euler_ancestral", spec, config, steps), 1e-5)


@pytest.mark.parametrize("sampler", ["dpmpp_2m_sde", "dpmpp_sde", "dpmpp_2s_a"])
def test_sde_samplers_finite_for_every_spacing_and_step_count(sampler):
    """1, 2, 999 and 1000 steps with every spacing and a schedule type: finite results, no
    error.  1000 steps repeat a sigma ("leading": t=1000 clamps to t=999; "linspace" in the
    multistep spacing: a timestep twice), where diffusers divides by zero.  One image of 4x1x1;
    DPM++ SDE's Brownian tree (some 8 s a 1000-step run) only where the first two sigmas are
    equal, generator noise elsewhere at 999/1000 steps.  DPM++ 2M SDE with "leading" spacing at
    1000 steps (every multistep timestep the same) is refused with a ValueError."""
    x = torch.zeros(1, 4, 1, 1)
    for spec in (SAMPLERS[sampler], get_sampler(sampler, "karras")):
        for spacing in ("leading", "linspace", "trailing"):
            for steps in (1, 2, 999, 1000):
                ns = spec.schedule(ScheduleConfig(timestep_spacing=spacing))
                if (spec.id, spec.sigma_schedule, spacing, steps) == ("dpmpp_2m_sde", None, "leading", 1000):
                    with pytest.raises(ValueError, match="one timestep"):
                        spec.plan(ns, steps)
                    continue
                plan = spec.plan(ns, steps)
                denoise = vp_denoiser(eps_model, ns, discrete_timesteps=plan.discrete_timesteps,
                                      timesteps=plan.timesteps)
                g = [torch.Generator().manual_seed(5)]
                options = dict(plan.options)
                tree = (spec.sigma_schedule, spacing, steps) == (None, "leading", 1000)
                if sampler == "dpmpp_sde" and steps >= 999 and not tree:
                    options["noise_sampler"] = lambda sigma, sigma_next, g=g: randn_like(x, g)
                out = spec(denoise, randn_like(x, g) * plan.init_noise_sigma, plan.sigmas, generator=g, **options)
                assert torch.isfinite(out).all(), (spec.sigma_schedule, spacing, steps)


CLASSIC = ["ddim", "ddpm", "plms", "euler", "euler_a", "heun", "lms", "dpmpp_2m", "unipc"]


@pytest.mark.parametrize("sampler", CLASSIC)
def test_up_to_1000_steps_finite_or_refused(sampler):
    """1, 2, 999 and 1000 steps with every spacing give finite results or a ValueError that says
    why (where diffusers raises an IndexError or returns NaN): DDIM/DDPM/PLMS with "leading"
    spacing at 1000 steps would reach timestep 1000; the multistep solvers with "leading" at 1000
    steps would put every step on one timestep.  Plans that repeat a sigma (1000 steps) run their
    distinct sigmas in the samplers that cannot take a zero-length step (LMS, DPM++ 2M, UniPC)."""
    spec = SAMPLERS[sampler]
    refused = {("ddim", "leading"), ("ddpm", "leading"), ("plms", "leading"), ("dpmpp_2m", "leading"),
               ("unipc", "leading")}
    for spacing in ("leading", "linspace", "trailing"):
        ns = spec.schedule(ScheduleConfig(timestep_spacing=spacing))
        for steps in (1, 2, 999, 1000):
            if steps == 1000 and (sampler, spacing) in refused:
                with pytest.raises(ValueError, match="leading"):
                    spec.plan(ns, steps)
                continue
            plan = spec.plan(ns, steps)
            denoise = vp_denoiser(lambda x, t: torch.tanh(x) * 0.5 + t / 2000, ns,
                                  discrete_timesteps=plan.discrete_timesteps, timesteps=plan.timesteps)
            x = torch.randn(1, 2, 2, 2, generator=torch.Generator().manual_seed(0)) * plan.init_noise_sigma
            out = spec(denoise, x, plan.sigmas, generator=[torch.Generator().manual_seed(1)], **plan.options)
            assert torch.isfinite(out).all(), (spacing, steps)


@pytest.mark.parametrize("sampler", ["dpm2", "dpm2_a", "deis"])
def test_dpm2_deis_finite_or_refused_for_every_spacing_and_step_count(sampler):
    """1, 2, 999 and 1000 steps with every spacing: finite results (1000-step schedules repeat a
    sigma, where diffusers' DEIS divides by zero), except DEIS with "leading" spacing and 1000
    steps, whose timesteps would all be one: a ValueError saying so.  Schedule types at 1, 2 steps."""

    def run(spec, cfg, steps):  # run_ours with a cheap model on a small batch
        ns = spec.schedule(cfg)
        plan = spec.plan(ns, steps)
        denoise = vp_denoiser(lambda x, t: torch.tanh(x) * 0.5 + t / 2000, ns,
                              discrete_timesteps=plan.discrete_timesteps, timesteps=plan.timesteps)
        x = torch.randn(2, 2, 2, 2, generator=torch.Generator().manual_seed(0)) * plan.init_noise_sigma
        return plan.to_vp(spec(denoise, x, plan.sigmas, generator=gens(), **plan.options))

    for spacing in ("leading", "linspace", "trailing"):
        cfg = ScheduleConfig(timestep_spacing=spacing)
        for steps in (1, 2, 999, 1000):
            if sampler == "deis" and spacing == "leading" and steps == 1000:
                with pytest.raises(ValueError, match="at most 999 steps"):
                    run(SAMPLERS[sampler], cfg, steps)
                continue
            assert torch.isfinite(run(SAMPLERS[sampler], cfg, steps)).all(), (spacing, steps)
        for schedule in ("karras", "exponential", "sgm_uniform"):
            for steps in (1, 2):
                assert torch.isfinite(run(get_sampler(sampler, schedule), cfg, steps)).all(), (spacing, schedule)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_deis_order_3_matches_diffusers(spacing):
    spec = replace(SAMPLERS["deis"], diffusers_config={"solver_order": 3})
    cfg = ScheduleConfig(timestep_spacing=spacing)
    for steps in (7, 10, 25):
        assert_rel(run_ours(spec, cfg, steps, options={"order": 3}), run_diffusers(spec, cfg, steps))


def test_single_generator_draws_whole_batch_like_diffusers():
    """One generator (not a list): the whole batch in one draw, as diffusers' randn_tensor."""
    diffusers = pytest.importorskip("diffusers")
    x = torch.zeros(SHAPE)
    a = randn_like(x, torch.Generator().manual_seed(3))
    b = diffusers.utils.torch_utils.randn_tensor(SHAPE, generator=torch.Generator().manual_seed(3))
    c = randn_like(x, [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)])
    d = diffusers.utils.torch_utils.randn_tensor(
        SHAPE, generator=[torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)])
    assert torch.equal(a, b) and torch.equal(c, d)
    with pytest.raises(ValueError):
        randn_like(x, [torch.Generator()] * 3)


def test_lms_coefficients_match_quadrature():
    integrate = pytest.importorskip("scipy.integrate")
    sig = [14.6, 9.0, 5.5, 3.1, 1.7, 0.8, 0.0]
    for i in range(len(sig) - 1):
        order = min(i + 1, 4)
        for j in range(order):
            def basis(tau):
                p = 1.0
                for k in range(order):
                    if k != j:
                        p *= (tau - sig[i - k]) / (sig[i - j] - sig[i - k])
                return p
            ref = integrate.quad(basis, sig[i], sig[i + 1], epsabs=1e-13, epsrel=1e-13)[0]
            assert lms_coefficient(sig, i, order, j) == pytest.approx(ref, rel=1e-10, abs=1e-12)


# ----------------------------------------------------------------------------- convergence
MU, S = 0.5, 0.5  # data x0 ~ N(MU, S^2) per coordinate


def gaussian_denoiser(x, sigma):
    """Exact E[x0 | x0 + sigma * eps = x] for Gaussian data."""
    sigma = float(sigma)
    return MU + S * S / (S * S + sigma * sigma) * (x - MU)


DETERMINISTIC = [s for s, spec in SAMPLERS.items() if not spec.stochastic]
MIN_ORDER = {"euler": (0.7, 1.5), "ddim": (0.7, 1.5), "heun": (1.5, 9), "dpmpp_2m": (1.5, 9),
             "unipc": (1.5, 9), "lms": (1.5, 9), "plms": (1.5, 9), "dpm2": (1.5, 9), "deis": (1.5, 9)}


@pytest.mark.parametrize("sampler", DETERMINISTIC)
def test_convergence_order_on_gaussian_data(sampler):
    """The probability-flow ODE maps x(sigma_max) to
    MU + sqrt((S^2 + s^2) / (S^2 + sigma_max^2)) (x - MU); the error at sigma_min on a Karras
    grid shrinks like steps^-order."""
    ns = NoiseSchedule()
    smin, smax = ns.sigma_min, ns.sigma_max
    dx = torch.linspace(-2, 2, 5, dtype=torch.float64)
    exact = MU + math.sqrt((S * S + smin**2) / (S * S + smax**2)) * dx
    counts = [8, 16, 32, 64]
    errs = []
    for n in counts:
        sigmas = ns.karras_sigmas(n + 1)  # float64, ends at sigma_min
        out = SAMPLERS[sampler].fn(gaussian_denoiser, MU + dx, sigmas)
        errs.append((out - exact).abs().max().item())
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    slope = -np.polyfit(np.log(counts), np.log(errs), 1)[0]
    lo, hi = MIN_ORDER[sampler]
    assert lo <= slope <= hi, (slope, errs)


@pytest.mark.parametrize("sampler,options", [("euler_a", {}), ("ddpm", {}), ("ddim", {"eta": 1.0})])
def test_stochastic_samplers_sample_the_data_distribution(sampler, options):
    """Ancestral steps with the exact posterior mean (but not its variance) lose a little
    variance per step: first-order in the step size, so the std approaches S as steps grow."""
    ns = NoiseSchedule()
    n = 10000
    std_err = []
    for steps in (30, 300):
        g = torch.Generator().manual_seed(0)
        sigmas = torch.cat([ns.karras_sigmas(steps), torch.zeros(1, dtype=torch.float64)])
        x = MU + math.sqrt(S * S + float(sigmas[0]) ** 2) * torch.randn(n, 1, generator=g, dtype=torch.float64)
        out = SAMPLERS[sampler].fn(gaussian_denoiser, x, sigmas, generator=g, **options)
        assert abs(out.mean().item() - MU) < 5 * S / math.sqrt(n)
        std_err.append(abs(out.std().item() - S))
        det = sample_euler(gaussian_denoiser, x, sigmas)  # it is random, not the ODE map
        assert not torch.allclose(out, det)
    assert std_err[1] < std_err[0] / 3 and std_err[1] < 0.03 * S, std_err


@pytest.mark.parametrize("sampler", ["dpmpp_2m_sde", "dpmpp_sde", "dpmpp_2s_a"])
def test_sde_samplers_sample_the_data_distribution(sampler):
    """With the exact posterior mean of Gaussian data, 30 Karras steps end at the data's mean and
    std (within 3%; Euler a is still 11% low there), and not at the ODE's deterministic map."""
    ns = NoiseSchedule()
    n = 10000
    g = torch.Generator().manual_seed(0)
    sigmas = torch.cat([ns.karras_sigmas(30), torch.zeros(1, dtype=torch.float64)])
    x = MU + math.sqrt(S * S + float(sigmas[0]) ** 2) * torch.randn(n, 1, generator=g, dtype=torch.float64)
    out = SAMPLERS[sampler].fn(gaussian_denoiser, x, sigmas, generator=g)
    assert abs(out.mean().item() - MU) < 5 * S / math.sqrt(n)
    assert abs(out.std().item() - S) < 0.03 * S
    assert not torch.allclose(out, sample_euler(gaussian_denoiser, x, sigmas))


def test_ddim_eta0_is_euler_on_the_same_sigmas():
    sig = NoiseSchedule().karras_sigmas(12).float()
    x = torch.randn(3, 4)
    a = sample_ddim(gaussian_denoiser, x, sig)
    b = sample_euler(gaussian_denoiser, x, sig)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- registry / callback
def test_registry_names():
    names = {"ddim": "DDIM", "ddpm": "DDPM", "plms": "PLMS", "euler": "Euler", "euler_a": "Euler a",
             "heun": "Heun", "lms": "LMS", "dpmpp_2m": "DPM++ 2M", "unipc": "UniPC", "dpm2": "DPM2",
             "dpm2_a": "DPM2 a", "deis": "DEIS", "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_sde": "DPM++ SDE",
             "dpmpp_2s_a": "DPM++ 2S a"}
    assert {k: v.name for k, v in SAMPLERS.items() if k in names} == names
    for sid, spec in SAMPLERS.items():
        for key in (sid, spec.name, spec.name.upper(), f"  {spec.name.lower()} "):
            assert get_sampler(key) is SAMPLERS[sid]


def test_combined_names_resolve_to_sampler_and_schedule():
    for name, sid, sched in [("DPM++ 2M Karras", "dpmpp_2m", "karras"), ("dpmpp_2m_karras", "dpmpp_2m", "karras"),
                             ("LMS Karras", "lms", "karras"), ("Euler Exponential", "euler", "exponential"),
                             ("euler_sgm_uniform", "euler", "sgm_uniform"), ("Heun SGM Uniform", "heun", "sgm_uniform")]:
        spec = get_sampler(name)
        assert (spec.id, spec.sigma_schedule) == (sid, sched), name
    assert get_sampler("DPM++ 2M", "Karras") == get_sampler("DPM++ 2M Karras")
    assert get_sampler("Euler", "automatic").sigma_schedule is None
    assert get_sampler("DPM++ 2M Karras").reference_config == {"use_karras_sigmas": True}
    with pytest.raises(ValueError, match="names schedule type 'karras' but 'exponential'"):
        get_sampler("DPM++ 2M Karras", "exponential")
    with pytest.raises(ValueError, match="unknown schedule type 'nope'"):
        get_sampler("Euler", "nope")
    with pytest.raises(ValueError, match="does not take schedule type 'karras'"):
        get_sampler("DDIM Karras")


def test_dpm2_and_deis_names_with_schedule_types():
    for name, sid, sched in [("DPM2 a Karras", "dpm2_a", "karras"), ("dpm2_a_exponential", "dpm2_a", "exponential"),
                             ("DPM2 Karras", "dpm2", "karras"), ("DEIS SGM Uniform", "deis", "sgm_uniform")]:
        spec = get_sampler(name)
        assert (spec.id, spec.sigma_schedule) == (sid, sched), name


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(ValueError) as e:
        get_sampler("DPM++ 9000")
    msg = str(e.value)
    assert "DPM++ 9000" in msg
    for spec in SAMPLERS.values():
        assert repr(spec.id) in msg and repr(spec.name) in msg


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_callback_and_cancellation(sampler):
    spec = SAMPLERS[sampler]
    ns = NoiseSchedule()
    plan = spec.plan(ns, 6)
    x = torch.randn(1, 2, 3, 3) * plan.init_noise_sigma
    seen = []
    spec(gaussian_denoiser, x, plan.sigmas, generator=torch.Generator().manual_seed(0),
         callback=lambda i, n, x0: seen.append((i, n, x0.shape)), **plan.options)
    assert seen == [(i, 6, x.shape) for i in range(6)]

    def cancel_at_2(i, n, x0):
        return i == 2

    with pytest.raises(SamplingCancelled):
        spec(gaussian_denoiser, x, plan.sigmas, generator=torch.Generator().manual_seed(0),
             callback=cancel_at_2, **plan.options)


def test_package_imports_neither_diffusers_nor_scipy():
    code = ("import sys, latentdiff.schedule, latentdiff.samplers; "
            "bad = [m for m in ('diffusers', 'scipy') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
