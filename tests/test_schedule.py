"""Noise schedule against diffusers' schedulers (the test-only oracle)."""

import math

import numpy as np
import pytest
import torch
from _oracles import k_diffusion_sampling

diffusers = pytest.importorskip("diffusers")

from latentdiff.schedule import (  # noqa: E402
    CLASS_DEFAULTS,
    SD15_SCHEDULER_CONFIG as SD15_IN_PACKAGE,
    NoiseSchedule,
    ScheduleConfig,
    class_defaults,
    img2img_start,
    kdpm2_step_levels,
    sde_midpoint_sigma,
)

SPACINGS = ["leading", "linspace", "trailing"]
STEP_COUNTS = [1, 2, 3, 7, 10, 20, 25, 50, 999]

SD15_SCHEDULER_CONFIG = {  # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


def make(cls, cfg, **extra):
    return getattr(diffusers, cls).from_config({**cfg.to_dict(cls), **extra})


# ----------------------------------------------------------------------------- config
def test_config_defaults_are_sd15s_file():
    c = ScheduleConfig()
    assert SD15_IN_PACKAGE == SD15_SCHEDULER_CONFIG
    assert (c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule) == (1000, 0.00085, 0.012, "scaled_linear")
    assert (c.timestep_spacing, c.steps_offset, c.prediction_type) == (None, 1, None)
    assert not c.clip_sample and not c.set_alpha_to_one
    assert c.resolve("DDIMScheduler").timestep_spacing == "leading"
    assert c.resolve("EulerDiscreteScheduler").timestep_spacing == "linspace"
    assert c.resolve("EulerDiscreteScheduler").prediction_type == "epsilon"


@pytest.mark.parametrize("cls", sorted(CLASS_DEFAULTS))
def test_class_defaults_are_diffusers_constructor_defaults(cls):
    """An absent key means what diffusers' <cls>.from_config makes of it."""
    ours = class_defaults(cls)
    theirs = getattr(diffusers, cls).from_config({}).config
    for key, value in ours.items():
        if key in theirs:
            assert theirs[key] == value, (cls, key, theirs[key], value)


@pytest.mark.parametrize("cls", sorted(CLASS_DEFAULTS))
def test_absent_keys_resolve_like_from_config(cls):
    """SD 1.5's own file (no timestep_spacing) and an empty file, resolved for a class, give the
    values diffusers' from_config gives that class."""
    for config in (SD15_SCHEDULER_CONFIG, {}):
        ours = ScheduleConfig.from_dict(config).resolve(cls)
        theirs = getattr(diffusers, cls).from_config(config).config
        for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "timestep_spacing",
                    "steps_offset", "prediction_type", "clip_sample", "set_alpha_to_one", "skip_prk_steps",
                    "original_inference_steps", "timestep_scaling"):
            if key in theirs:
                assert getattr(ours, key) == theirs[key], (cls, key)


def test_config_from_dict_ignores_unknown_keys_and_roundtrips():
    c = ScheduleConfig.from_dict(SD15_SCHEDULER_CONFIG)
    assert c == ScheduleConfig()
    assert "timestep_spacing" not in c.to_dict()  # absent stays absent
    c2 = ScheduleConfig.from_dict({**c.to_dict(), "prediction_type": "v_prediction", "timestep_spacing": "trailing"})
    assert c2.prediction_type == "v_prediction" and c2.timestep_spacing == "trailing"
    assert ScheduleConfig.from_dict(c2.to_dict("EulerDiscreteScheduler")) == c2


@pytest.mark.parametrize("cls", ["DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler"])
def test_to_dict_accepted_by_diffusers(cls):
    cfg = ScheduleConfig(timestep_spacing="trailing", prediction_type="v_prediction")
    d = cfg.to_dict(cls)
    assert d["_class_name"] == cls
    s = getattr(diffusers, cls).from_config(d)
    for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "timestep_spacing",
              "steps_offset", "prediction_type"):
        assert s.config[k] == getattr(cfg, k), k


@pytest.mark.parametrize(("bad", "field"), [
    ({"timestep_spacing": "nope"}, "timestep_spacing"), ({"beta_schedule": "nope"}, "beta_schedule"),
    ({"prediction_type": "x"}, "prediction_type"), ({"num_train_timesteps": 0}, "num_train_timesteps"),
    ({"num_train_timesteps": "1000"}, "num_train_timesteps"), ({"beta_start": "abc"}, "beta_start"),
    ({"beta_end": float("nan")}, "beta_end"), ({"steps_offset": -1}, "steps_offset"),
    ({"clip_sample": "yes"}, "clip_sample"), ({"num_train_timesteps": True}, "num_train_timesteps"),
    ({"trained_betas": [0.1, "x"]}, "trained_betas"),
])
def test_config_rejects_bad_values_naming_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        ScheduleConfig.from_dict(bad)


# ----------------------------------------------------------------------------- tables
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_and_sigmas_bitwise(beta_schedule):
    cfg = ScheduleConfig(beta_schedule=beta_schedule)
    ns = NoiseSchedule(cfg)
    ref = make("DDIMScheduler", cfg)
    assert ns.alphas_cumprod.dtype == torch.float32
    assert torch.equal(ns.betas, ref.betas)
    assert torch.equal(ns.alphas_cumprod, ref.alphas_cumprod)
    eul = make("EulerDiscreteScheduler", cfg)
    assert torch.equal(ns.sigmas, eul.sigmas[:-1].flip(0))


def test_trained_betas():
    betas = np.linspace(1e-4, 2e-2, 1000).tolist()
    cfg = ScheduleConfig.from_dict({"trained_betas": betas})
    ns = NoiseSchedule(cfg)
    assert torch.equal(ns.alphas_cumprod, make("DDIMScheduler", cfg).alphas_cumprod)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_timesteps_match_diffusers(spacing):
    cfg = ScheduleConfig(timestep_spacing=spacing)
    ns = NoiseSchedule(cfg)
    ddim, euler = make("DDIMScheduler", cfg), make("EulerDiscreteScheduler", cfg)
    dpm, unipc = make("DPMSolverMultistepScheduler", cfg), make("UniPCMultistepScheduler", cfg)
    for n in STEP_COUNTS:
        ddim.set_timesteps(n)
        euler.set_timesteps(n)
        dpm.set_timesteps(n)
        unipc.set_timesteps(n)
        assert torch.equal(ns.timesteps(n, "discrete"), ddim.timesteps), n
        assert torch.equal(ns.timesteps(n, "continuous"), euler.timesteps), n
        assert torch.equal(ns.timesteps(n, "multistep"), dpm.timesteps), n
        assert torch.equal(ns.timesteps(n, "multistep"), unipc.timesteps), n


# ----------------------------------------------------------------------------- plans
def _close(a, b, rtol=1e-6):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, rtol=rtol, atol=1e-7), (a, b)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("n", [1, 7, 10, 25])
def test_k_plans_match_diffusers_sigmas(spacing, n):
    cfg = ScheduleConfig(timestep_spacing=spacing)
    ns = NoiseSchedule(cfg)
    karras, exponential = {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}
    for kind, cls, extra, sched in [
        ("euler", "EulerDiscreteScheduler", {}, None),
        ("euler", "EulerAncestralDiscreteScheduler", {}, None),
        ("euler", "LMSDiscreteScheduler", {}, None),
        ("euler", "EulerDiscreteScheduler", karras, "karras"),
        ("euler", "LMSDiscreteScheduler", karras, "karras"),
        ("euler", "EulerDiscreteScheduler", exponential, "exponential"),
        ("euler", "HeunDiscreteScheduler", exponential, "exponential"),
        ("dpm", "DPMSolverMultistepScheduler", {}, None),
        ("dpm", "UniPCMultistepScheduler", {}, None),
        ("dpm", "DPMSolverMultistepScheduler", karras, "karras"),
        ("dpm", "UniPCMultistepScheduler", karras, "karras"),
        ("dpm", "DPMSolverMultistepScheduler", exponential, "exponential"),
        ("deis", "DEISMultistepScheduler", {}, None),
        ("deis", "DEISMultistepScheduler", karras, "karras"),
        ("deis", "DEISMultistepScheduler", exponential, "exponential"),
    ]:
        if n == 1 and sched is not None:
            continue  # one Karras / exponential sigma is a 0/0 in diffusers
        ref = make(cls, cfg, **extra)
        ref.set_timesteps(n)
        if cls == "HeunDiscreteScheduler":  # Heun lists each inner sigma twice
            ref_sigmas = torch.cat([ref.sigmas[:1], ref.sigmas[1:-1:2], ref.sigmas[-1:]])
            _close(ns.plan(kind, n, sigma_schedule=sched).sigmas, ref_sigmas)
            continue
        plan = ns.plan(kind, n, sigma_schedule=sched)
        assert plan.sigmas.dtype == torch.float32
        _close(plan.sigmas, ref.sigmas)
        init = float(ref.init_noise_sigma)
        if kind in ("dpm", "deis"):  # VP scheduler: unit noise in VP space
            init = math.sqrt(1 + float(plan.sigmas[0]) ** 2)
        assert plan.init_noise_sigma == pytest.approx(init, rel=1e-6)
        # the timesteps the model gets: exactly diffusers'
        t = torch.tensor([plan.timesteps[float(s)] for s in plan.sigmas[:-1]])
        assert torch.equal(t, ref.timesteps.float()), (kind, cls, sched, t, ref.timesteps)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_heun_plan_is_undoubled_diffusers_list(spacing):
    cfg = ScheduleConfig(timestep_spacing=spacing)
    ref = make("HeunDiscreteScheduler", cfg)
    ref.set_timesteps(10)
    plan = NoiseSchedule(cfg).plan("euler", 10)
    _close(torch.cat([ref.sigmas[:1], ref.sigmas[1:-1:2], ref.sigmas[-1:]]), plan.sigmas)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("kind,cls", [("kdpm2", "KDPM2DiscreteScheduler"),
                                      ("kdpm2_a", "KDPM2AncestralDiscreteScheduler")])
def test_kdpm2_plans_match_diffusers(spacing, kind, cls):
    """KDPM2's doubled lists: the plan's sigmas are the undoubled ``sigmas``, its step midpoints
    diffusers' ``sigmas_interpol`` (to the bit, but for DPM2 a's one-ulp separation from the
    next sigma), and the timesteps the model gets, main and midpoint calls in order, exactly
    diffusers' interleaved ``timesteps``."""
    cfg = ScheduleConfig(timestep_spacing=spacing)
    ns = NoiseSchedule(cfg, cls)
    for sched, extra in [(None, {}), ("karras", {"use_karras_sigmas": True}),
                         ("exponential", {"use_exponential_sigmas": True})]:
        for n in [1, 2, 7, 10, 25] + ([999] if sched is None else []):
            ref = make(cls, cfg, **extra)
            ref.set_timesteps(n)
            plan = ns.plan(kind, n, sigma_schedule=sched)
            assert torch.equal(plan.sigmas, torch.cat([ref.sigmas[:1], ref.sigmas[1:-1:2]])), (sched, n)
            assert plan.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
            mids = [kdpm2_step_levels(plan.sigmas[i], plan.sigmas[i + 1], kind == "kdpm2_a")[0] for i in range(n)]
            # per step, (n,): DPM2 uses sigmas_interpol[i + 1], DPM2 a sigmas_interpol[i]
            ref_mids = ref.sigmas_interpol[1:-1:2] if kind == "kdpm2" else \
                torch.cat([ref.sigmas_interpol[:1], ref.sigmas_interpol[1:-1:2]])[:n]
            mids_t = torch.stack(mids)
            moved = torch.nextafter(ref_mids, plan.sigmas[:-1]) if kind == "kdpm2_a" else ref_mids
            assert ((mids_t == ref_mids) | (mids_t == moved)).all(), (sched, n)
            seq = []
            for s, m in zip(plan.sigmas[:-1], mids):
                seq += [plan.timesteps[float(s)]] + ([plan.timesteps[float(m)]] if m > 0 else [])
            assert torch.equal(torch.tensor(seq), ref.timesteps.float()), (sched, n)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_dpm_sde_plan_matches_diffusers(spacing):
    """DPMSolverSDEScheduler's doubled lists: the plan's sigmas are the undoubled ``sigmas``, and
    the timesteps the model gets, main and midpoint (:func:`sde_midpoint_sigma`) calls in order,
    exactly diffusers' interleaved ``timesteps``; the Brownian tree's range is its."""
    cfg = ScheduleConfig(timestep_spacing=spacing)
    ns = NoiseSchedule(cfg, "DPMSolverSDEScheduler")
    for sched, extra in [(None, {}), ("karras", {"use_karras_sigmas": True}),
                         ("exponential", {"use_exponential_sigmas": True})]:
        for n in [1, 2, 7, 10, 25] + ([999, 1000] if sched is None else []):
            if n == 1 and sched is not None:
                continue  # one Karras / exponential sigma is a 0/0 in diffusers
            ref = make("DPMSolverSDEScheduler", cfg, **extra)
            ref.set_timesteps(n)
            plan = ns.plan("dpm_sde", n, sigma_schedule=sched)
            undoubled = torch.cat([ref.sigmas[:1], ref.sigmas[1:-1:2], ref.sigmas[-1:]])
            assert torch.equal(plan.sigmas, undoubled), (sched, n)
            assert plan.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
            positive = ref.sigmas[ref.sigmas > 0]
            assert plan.options["brownian_range"] == (float(positive.min()), float(ref.sigmas.max()))
            if len(set(plan.sigmas[:-1].tolist())) < n:
                # "leading" at 1000 steps: diffusers' t=1000 has sigma(999) (clamped); the table, keyed
                # by sigma, gives both calls t=999
                continue
            seq = []
            for i in range(n):
                seq.append(plan.timesteps[float(plan.sigmas[i])])
                if i < n - 1:
                    seq.append(plan.timesteps[float(sde_midpoint_sigma(plan.sigmas[i], plan.sigmas[i + 1]))])
            assert torch.equal(torch.tensor(seq), ref.timesteps.float()), (sched, n)
    with pytest.raises(ValueError, match="cannot exceed"):
        ns.plan("dpm_sde", 1001)


def test_sgm_uniform_is_a1111s_formula_on_k_diffusions_schedule():
    """A1111's "SGM Uniform" (modules/sd_schedulers.py ``sgm_uniform``): timesteps
    ``linspace(t(sigma_max), t(sigma_min), n + 1)[:-1]`` read back as sigmas, both ways through
    k-diffusion's DiscreteSchedule (CompVisDenoiser's base, float32 log-sigma interpolation).
    latentdiff interpolates in float64: a few float32 ulps apart, never more than 1e-6."""
    sampling = k_diffusion_sampling()
    if sampling is None:
        pytest.skip("k-diffusion is not installed")
    from k_diffusion.external import DiscreteSchedule

    for cfg in (ScheduleConfig(), ScheduleConfig(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
                ScheduleConfig(beta_schedule="squaredcos_cap_v2")):
        ns = NoiseSchedule(cfg, "EulerDiscreteScheduler")
        inner = DiscreteSchedule(ns.sigmas, quantize=False)
        sigma_min, sigma_max = inner.sigmas[0].item(), inner.sigmas[-1].item()  # as A1111's get_sigmas
        start, end = inner.sigma_to_t(torch.tensor(sigma_max)), inner.sigma_to_t(torch.tensor(sigma_min))
        for n in (1, 2, 3, 7, 10, 25, 50, 999, 1000):
            ref = torch.FloatTensor([inner.t_to_sigma(ts) for ts in torch.linspace(start, end, n + 1)[:-1]] + [0.0])
            for kind in ("euler", "dpm", "dpm_sde"):
                sigmas = ns.plan(kind, n, sigma_schedule="sgm_uniform").sigmas
                assert sigmas.shape == ref.shape and sigmas[-1] == 0, (kind, n)
                err = ((sigmas[:-1].double() - ref[:-1].double()).abs() / ref[:-1].double()).max().item()
                assert err < 1e-6, (cfg.beta_schedule, kind, n, err)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_ddim_ddpm_pndm_plans(spacing, set_alpha_to_one):
    cfg = ScheduleConfig(timestep_spacing=spacing, set_alpha_to_one=set_alpha_to_one)
    ns = NoiseSchedule(cfg)
    for n in [1, 7, 10, 25]:
        ddim = make("DDIMScheduler", cfg)
        ddim.set_timesteps(n)
        plan = ns.plan("ddim", n)
        _close(plan.sigmas[:-1], ns.sigmas[ddim.timesteps])
        prev_t = int(ddim.timesteps[-1]) - 1000 // n  # diffusers: t - T // steps, or the final alpha
        final = float(ns.sigmas[prev_t]) if prev_t >= 0 else (0.0 if set_alpha_to_one else float(ns.sigmas[0]))
        assert float(plan.sigmas[-1]) == pytest.approx(final)
        assert plan.discrete_timesteps
        assert torch.equal(ns.sigma_to_t(plan.sigmas[:-1], quantize=True), ddim.timesteps.float())
        ddpm = ns.plan("ddpm", n)
        assert float(ddpm.sigmas[-1]) == 0.0
        _close(ddpm.sigmas[:-1], plan.sigmas[:-1])
        pndm = make("PNDMScheduler", cfg)
        pndm.set_timesteps(n)
        plms = ns.plan("pndm", n)
        ts = pndm.timesteps if n == 1 else torch.cat([pndm.timesteps[:1], pndm.timesteps[2:]])  # drop the repeat
        _close(plms.sigmas[:-1], ns.sigmas[ts])


def test_leading_plans_need_no_quirk_options():
    ns = NoiseSchedule()
    for kind in ("ddim", "pndm"):
        for n in (10, 25, 50):
            assert ns.plan(kind, n).options == {}


def test_to_vp():
    ns = NoiseSchedule()
    plan = ns.plan("ddim", 10)
    x = torch.ones(3)
    s = float(plan.sigmas[-1])
    assert torch.allclose(plan.to_vp(x), x * math.sqrt(float(ns.alphas_cumprod[0])), rtol=1e-6)
    assert s > 0
    assert torch.equal(ns.plan("euler", 10).to_vp(x), x)


# ----------------------------------------------------------------------------- sigma <-> t
def test_sigma_to_t_at_training_sigmas():
    ns = NoiseSchedule()
    t = ns.sigma_to_t(ns.sigmas)
    assert (t - torch.arange(1000)).abs().max() < 1e-3
    assert torch.equal(ns.sigma_to_t(ns.sigmas, quantize=True), torch.arange(1000, dtype=torch.float32))
    assert torch.equal(ns.t_to_sigma(torch.arange(1000)), ns.sigmas)


def test_sigma_to_t_matches_diffusers_and_clips():
    ns = NoiseSchedule()
    ref = make("EulerDiscreteScheduler", ScheduleConfig())
    log_sigmas = np.log(ns.sigmas.numpy())
    sig = ns.karras_sigmas(37).numpy()
    ours = ns.sigma_to_t(torch.from_numpy(sig), dtype=torch.float64).numpy()
    theirs = np.array([ref._sigma_to_t(s, log_sigmas) for s in sig])
    assert np.array_equal(ours, theirs)  # to the bit
    assert float(ns.sigma_to_t(1e-6)) == 0.0 and float(ns.sigma_to_t(1e6)) == 999.0
    # fractional t: t_to_sigma (linear in sigma) and sigma_to_t (linear in log-sigma) nearly invert
    t = torch.tensor([957.375, 500.5, 41.625, 3.25])
    assert torch.allclose(ns.sigma_to_t(ns.t_to_sigma(t)), t, atol=0.05)


def test_karras_sigmas_match_diffusers():
    ns = NoiseSchedule()
    ref = make("DPMSolverMultistepScheduler", ScheduleConfig(), use_karras_sigmas=True)
    ref.set_timesteps(20)
    _close(ns.karras_sigmas(20).float(), ref.sigmas[:-1])
    k = ns.karras_sigmas(5, 0.1, 10.0)
    assert float(k[0]) == pytest.approx(10.0) and float(k[-1]) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- img2img
@pytest.mark.parametrize("steps,strength", [(50, 0.8), (10, 0.75), (25, 0.3), (10, 1.0), (7, 0.5)])
def test_img2img_tail_matches_diffusers_get_timesteps(steps, strength):
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    assert img2img_start(steps, strength) == t_start
    for kind, cls in [("ddim", "DDIMScheduler"), ("euler", "EulerDiscreteScheduler"),
                      ("dpm", "DPMSolverMultistepScheduler")]:
        ns = NoiseSchedule(ScheduleConfig(), cls)
        ref = make(cls, ScheduleConfig())
        ref.set_timesteps(steps)
        ts = ref.timesteps[t_start * ref.order:]
        plan = ns.plan(kind, steps, strength=strength)
        assert plan.steps == len(ts) == init_timestep
        assert torch.equal(torch.tensor([plan.timesteps[float(s)] for s in plan.sigmas[:-1]]), ts.float())
        assert plan.init_noise_sigma == float(plan.sigmas[0])


def test_img2img_rejects_empty_and_bad_strength():
    ns = NoiseSchedule()
    with pytest.raises(ValueError):
        ns.plan("euler", 10, strength=0.05)
    with pytest.raises(ValueError):
        img2img_start(10, 1.5)
    with pytest.raises(ValueError):
        ns.plan("nope", 10)
