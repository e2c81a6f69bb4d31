"""LCM-LoRA distillation on a tiny model: the target math, zero-init student, frozen teacher,
exact resume, kohya export read by latentdiff and diffusers, config errors, CLI."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import latentdiff
from latentdiff.train import InMemorySource, TrainConfigError
from latentdiff.train.checkpoint import load_checkpoint
from latentdiff.train.lcm import LCMTrainConfig, LCMTrainer, consistency_loss, ddim_timesteps, train_lcm
from latentdiff.train.optim import clipped_step

from conftest import assert_rel_close


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


CAPTIONS = ["a red square on the left", "a blue square on the right", "a green circle", "a yellow triangle"]


def source(size: int = 16) -> InMemorySource:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(len(CAPTIONS), 3, size, size, generator=g) * 2 - 1
    return InMemorySource(images, CAPTIONS)


def config(out: Path, **changes) -> LCMTrainConfig:
    base = dict(
        out_dir=str(out), max_steps=4, batch_size=2, grad_accum=2, lr=1e-3, warmup_steps=2, lora_rank=4,
        lora_alpha=2.0, sample_every=0, checkpoint_every=0, num_sample_images=2, resolution=16,
    )
    return LCMTrainConfig(**{**base, **changes})


def trainer(diffusers_dir: Path, out: Path, **changes) -> LCMTrainer:
    return LCMTrainer(config(out, **changes), source=source(), pipeline=latentdiff.load(diffusers_dir))


def randomize(tr: LCMTrainer, seed: int) -> None:
    """Non-zero LoRA in student and target (different), so the math is not trivially the teacher's."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for net in (tr.lora, tr.target):
            for name, p in net.named_parameters():
                if name.endswith("up.weight"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def save_kohya(net, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file(net.kohya_state_dict(), str(path))
    return path


def _unet_eps(unet, x, t, emb):
    with torch.no_grad():
        return unet(x, t, emb).float()


# ---------------------------------------------------------------------------- the math
def test_target_math_matches_an_independent_formula(diffusers_dir, tmp_path) -> None:
    tr = trainer(diffusers_dir, tmp_path / "run")
    randomize(tr, 1)
    x0 = tr.latents[:2].clone()
    emb = tr.embed(CAPTIONS[:2])
    uncond = tr.embed(["", ""])
    index = torch.tensor([0, 37])
    w = torch.tensor([3.0, 7.5])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        student, target = tr.distillation_terms(x0, emb, uncond, index, w, noise)

    # Independent: SD's scaled_linear schedule in float64, the nets as merged hook-free copies.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    k = 1000 // 50
    t = torch.tensor([k * 1 - 1, k * 38 - 1])  # 19, 759
    s = torch.tensor([0, 739])
    assert torch.equal(ddim_timesteps(1000, 50)[index], t)

    def c(ts):  # boundary conditions, sigma_data 0.5, timestep scaling 10
        u = ts.double() * 10
        return (0.25 / (u**2 + 0.25)).view(-1, 1, 1, 1), (u / (u**2 + 0.25).sqrt()).view(-1, 1, 1, 1)

    def col(v):
        return v.view(-1, 1, 1, 1)

    teacher = latentdiff.load(diffusers_dir).unet
    student_pipe = latentdiff.load(diffusers_dir)
    student_pipe.load_lora(save_kohya(tr.lora, tmp_path / "student.safetensors"))
    target_pipe = latentdiff.load(diffusers_dir)
    target_pipe.load_lora(save_kohya(tr.target, tmp_path / "target.safetensors"))

    x0d, nd = x0.double(), noise.double()
    a_t, a_s = col(abar[t]), col(abar[s])
    x_t = a_t.sqrt() * x0d + (1 - a_t).sqrt() * nd
    eps_s = _unet_eps(student_pipe.unet, x_t.float(), t, emb).double()
    cs, co = c(t)
    student_ref = cs * x_t + co * (x_t - (1 - a_t).sqrt() * eps_s) / a_t.sqrt()

    e_c = _unet_eps(teacher, x_t.float(), t, emb).double()
    e_u = _unet_eps(teacher, x_t.float(), t, uncond).double()
    e = e_u + (1 + col(w.double())) * (e_c - e_u)  # CFG at guidance scale 1 + w
    x0_hat = (x_t - (1 - a_t).sqrt() * e) / a_t.sqrt()
    x_s = a_s.sqrt() * x0_hat + (1 - a_s).sqrt() * e
    eps_t = _unet_eps(target_pipe.unet, x_s.float(), s, emb).double()
    cs, co = c(s)
    target_ref = cs * x_s + co * (x_s - (1 - a_s).sqrt() * eps_t) / a_s.sqrt()

    assert_rel_close(student, student_ref.float(), 1e-4)
    assert_rel_close(target, target_ref.float(), 1e-4)
    # boundary: at s = 0 the consistency function is the identity (c_skip 1, c_out 0)
    assert_rel_close(target[0], x_s[0].float(), 1e-4)


def test_consistency_loss_formulas() -> None:
    a, b = torch.tensor([0.0, 0.3, -1.0]), torch.tensor([0.1, 0.3, 1.0])
    c = 0.001
    want = sum(math.sqrt(d * d + c * c) - c for d in (-0.1, 0.0, -2.0)) / 3
    assert consistency_loss(a, b, "huber", c).item() == pytest.approx(want, rel=1e-6)
    assert consistency_loss(a, b, "l2", c).item() == pytest.approx((0.01 + 4.0) / 3, rel=1e-6)


def test_student_starts_as_the_teacher(diffusers_dir, tmp_path) -> None:
    tr = trainer(diffusers_dir, tmp_path)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 19])
    emb = tr.embed(CAPTIONS[:2])
    with tr.using("student"):
        student = _unet_eps(tr.unet, x, t, emb)
    with tr.using("teacher"):
        teacher = _unet_eps(tr.unet, x, t, emb)
    fresh = _unet_eps(latentdiff.load(diffusers_dir).unet, x, t, emb)
    assert torch.equal(student, teacher) and torch.equal(student, fresh)
    assert all(torch.equal(p, q) for p, q in zip(tr.lora.parameters(), tr.target.parameters()))
    ups = [p for n, p in tr.lora.named_parameters() if n.endswith("up.weight")]
    downs = [p for n, p in tr.lora.named_parameters() if n.endswith("down.weight")]
    assert ups and all(not p.any() for p in ups) and all(p.abs().sum() > 0 for p in downs)
    # the default targets: attention projections, feed-forward linears, proj_in / proj_out
    names = set(tr.lora.module_names.values())
    for suffix in ("attn1.to_q", "attn2.to_k", "attn1.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2",
                   "attentions.0.proj_in", "attentions.0.proj_out"):
        assert any(n.endswith(suffix) for n in names), suffix


def test_steps_reduce_loss_on_a_fixed_batch_and_touch_only_lora(diffusers_dir, tmp_path) -> None:
    tr = trainer(diffusers_dir, tmp_path, lr=3e-3, warmup_steps=0, loss_type="l2")
    base = {k: v.clone() for k, v in tr.unet.state_dict().items()}
    x0 = tr.latents[:4].clone()
    emb, uncond = tr.embed(CAPTIONS), tr.embed([""] * 4)
    index = torch.tensor([10, 20, 30, 40])
    w = torch.full((4,), 5.0)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))

    def loss() -> torch.Tensor:
        student, target = tr.distillation_terms(x0, emb, uncond, index, w, noise)
        return consistency_loss(student, target, "l2", 0.001)

    first = None
    for step in range(8):
        value = loss()
        first = value.item() if first is None else first
        value.backward()
        clipped_step(tr.optimizers["lora"], 1.0)
        tr.update_target(step)
    with torch.no_grad():
        assert loss().item() < 0.8 * first
    after = tr.unet.state_dict()
    assert set(after) == set(base) and all(torch.equal(after[k], base[k]) for k in base)  # teacher untouched


def test_training_run_keeps_the_teacher_and_writes_everything(diffusers_dir, tmp_path) -> None:
    pipe = latentdiff.load(diffusers_dir)
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    result = train_lcm(config(tmp_path, sample_every=2, max_steps=3), source=source(), pipeline=pipe, progress=False)
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in base.items())
    assert result.exported == tmp_path / "lcm_lora.safetensors" and result.exported.is_file()
    assert [p.name for p in result.samples] == ["step_000002.png", "step_000003.png"]
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert set(state["modules"]) == {"lora", "target"}
    assert all("adapters." in k for k in state["modules"]["lora"])  # only LoRA weights are checkpointed
    sd = load_file(str(result.exported))
    ups = [v for k, v in sd.items() if k.endswith("lora_up.weight")]
    assert ups and any(v.abs().sum() > 0 for v in ups)  # the student moved
    assert all(k.startswith("lora_unet_") for k in sd)


def _same(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            _same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_resume_is_bitwise_exact(diffusers_dir, tmp_path) -> None:
    def run(out, resume=False, **changes):
        return train_lcm(config(out, **changes), source=source(), pipeline=latentdiff.load(diffusers_dir),
                         resume=resume, progress=False)

    run(tmp_path / "straight")
    run(tmp_path / "split", max_steps=2)
    run(tmp_path / "split", resume=True)
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    for key in ("modules", "optimizers", "data", "step"):
        _same(a[key], b[key], key)
    _same(a["rng"]["generators"], b["rng"]["generators"], "rng")
    fa = load_file(str(tmp_path / "straight" / "lcm_lora.safetensors"))
    fb = load_file(str(tmp_path / "split" / "lcm_lora.safetensors"))
    _same(fa, fb, "export")


# ---------------------------------------------------------------------------- export
def test_export_loads_in_latentdiff_and_diffusers_alike(diffusers_dir, tmp_path) -> None:
    from diffusers import StableDiffusionPipeline

    tr = trainer(diffusers_dir, tmp_path)
    randomize(tr, 2)
    path = tr.export(tmp_path / "lcm_lora.safetensors")

    ours = latentdiff.load(diffusers_dir)
    original = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    ours.load_lora(path)
    merged = ours.unet.state_dict()
    # the hook-free merged copy the sample grids use agrees with latentdiff's reader
    copy_sd = tr.merged_unet().state_dict()

    ref = StableDiffusionPipeline.from_pretrained(diffusers_dir, safety_checker=None, requires_safety_checker=False)
    ref.load_lora_weights(str(path), adapter_name="lcm")
    ref.fuse_lora()
    ref.unload_lora_weights()
    theirs = ref.unet.state_dict()

    changed = 0
    for name in tr.lora.module_names.values():
        key = name + ".weight"
        assert_rel_close(merged[key], theirs[key], 1e-6)
        assert_rel_close(copy_sd[key], merged[key], 1e-6)
        changed += not torch.equal(merged[key], original[key])
    assert changed == len(tr.lora.module_names)
    untouched = [k for k in original if k not in {n + ".weight" for n in tr.lora.module_names.values()}]
    assert all(torch.equal(merged[k], original[k]) for k in untouched)


def test_samples_use_the_lcm_sampler_with_the_lora_merged(diffusers_dir, tmp_path) -> None:
    tr = trainer(diffusers_dir, tmp_path)
    randomize(tr, 3)
    images = tr.generate(CAPTIONS[:2])
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1.0
    pipe = latentdiff.load(diffusers_dir)
    pipe.load_lora(tr.export(tmp_path / "l.safetensors"))
    ref = pipe.txt2img(CAPTIONS[:2], width=16, height=16, steps=4, guidance_scale=1.0, sampler="lcm", seed=0,
                       output_type="pil")
    want = torch.stack([torch.from_numpy(np.array(im)) for im in ref]).permute(0, 3, 1, 2)
    assert (images - (want.float() / 127.5 - 1)).abs().max() <= 2 / 127.5


# ---------------------------------------------------------------------------- config and CLI
@pytest.mark.parametrize(("changes", "field"), [
    ({"lora_rank": 0}, "lora_rank"),
    ({"lora_alpha": 0.0}, "lora_alpha"),
    ({"lora_targets": []}, "lora_targets"),
    ({"num_ddim_timesteps": 0}, "num_ddim_timesteps"),
    ({"w_min": 9.0, "w_max": 3.0}, "w_min"),
    ({"loss_type": "l1"}, "loss_type"),
    ({"huber_c": 0.0}, "huber_c"),
    ({"timestep_scaling": -1.0}, "timestep_scaling"),
    ({"ema_decay": 1.0}, "ema_decay"),
    ({"latent_mode": "median"}, "latent_mode"),
    ({"sample_steps": 0}, "sample_steps"),
])
def test_bad_config_values_name_the_field(changes, field) -> None:
    with pytest.raises(TrainConfigError, match=field):
        LCMTrainConfig.from_dict(changes)


def test_config_file_types_and_unknown_keys(tmp_path) -> None:
    path = tmp_path / "lcm.toml"
    path.write_text('lora_rank = 8\nlora_alpha = 8\nw_min = 5\nlora_targets = ["to_q", "to_v"]\n')
    cfg = LCMTrainConfig.from_file(path)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.w_min, cfg.lora_targets) == (8, 8.0, 5.0, ["to_q", "to_v"])
    assert (cfg.num_ddim_timesteps, cfg.huber_c, cfg.ema_decay, cfg.timestep_scaling) == (50, 0.001, 0.95, 10.0)
    with pytest.raises(TrainConfigError, match="lora_rnak"):
        LCMTrainConfig.from_dict({"lora_rnak": 4})
    with pytest.raises(TrainConfigError, match="lora_rank"):
        LCMTrainConfig.from_dict({"lora_rank": "four"})


def test_targets_and_timesteps_that_do_not_fit_the_model(diffusers_dir, tmp_path) -> None:
    with pytest.raises(TrainConfigError, match="lora_targets"):
        trainer(diffusers_dir, tmp_path / "a", lora_targets=["no_such_layer"])
    with pytest.raises(TrainConfigError, match="num_ddim_timesteps"):
        trainer(diffusers_dir, tmp_path / "b", num_ddim_timesteps=2000)


def test_cli_train_lcm(diffusers_dir, tmp_path, capsys) -> None:
    from latentdiff.cli import main

    data = tmp_path / "data"
    data.mkdir()
    from PIL import Image

    for i, caption in enumerate(CAPTIONS):
        Image.new("RGB", (16, 16), (60 * i, 100, 200 - 40 * i)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(caption)
    cfg = tmp_path / "lcm.toml"
    cfg.write_text(f'pretrained = "{diffusers_dir}"\ndata = "{data}"\nresolution = 16\nmax_steps = 5\n'
                   "batch_size = 2\nlora_rank = 2\nsample_every = 0\nnum_sample_images = 1\n")
    out = tmp_path / "run"
    assert main(["train", "lcm", "--config", str(cfg), "--out", str(out), "--steps", "2"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2
    assert (out / "lcm_lora.safetensors").is_file()
    assert main(["train", "lcm", "--config", str(cfg), "--out", str(out), "--steps", "3", "--resume"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 3
    bad = tmp_path / "bad.toml"
    bad.write_text("lora_rank = 0\n")
    assert main(["train", "lcm", "--config", str(bad)]) == 2
    assert "lora_rank" in capsys.readouterr().err
