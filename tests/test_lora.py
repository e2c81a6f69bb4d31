"""LoRA adapters against diffusers' load_lora_weights + fuse_lora, on the tiny random model.

Random LoRAs cover the UNet's attention (q/k/v/out), feed-forward, proj_in/proj_out, LoCon
convolutions (ResNet 3x3 convs with 3x3 down / 1x1 up, the 1x1 shortcut, the time-embedding
projection, down- and up-sampler convs) and the text encoder's attention and MLP, with
alphas (some layers without: scale 1).  The final latents must agree within 1e-5 (relative)
and the images within 1/255.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import diffusers
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_generate import assert_images_match, assert_latents_match, generators
from torch import Tensor, nn

import latentdiff
from latentdiff.adapters import kohya, lora_hash
from latentdiff.generate import decode, to_pil

pytest.importorskip("peft")  # diffusers' load_lora_weights needs it

PROMPTS = ["a photo of a cat"]  # one image (two UNet passes a step): the CPU time goes to generation
SEED = 3
SIZE = 32
STEPS = 6
RANK = 4


@pytest.fixture(scope="module")
def pipe(diffusers_dir: Path) -> latentdiff.Pipeline:
    return latentdiff.load(diffusers_dir)


@pytest.fixture(scope="module")
def base_latents(pipe: latentdiff.Pipeline) -> Tensor:
    return latents_of(pipe)


@pytest.fixture()
def ours(pipe: latentdiff.Pipeline):
    """The shared pipeline, with every LoRA unloaded afterwards (even when a test fails)."""
    yield pipe
    pipe.unload_lora()


def reference(diffusers_dir: Path):
    ref = diffusers.StableDiffusionPipeline.from_pretrained(diffusers_dir)
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref


def _unet_layers(unet: nn.Module) -> list[str]:
    """The UNet layers a LoCon trainer patches: attention, ff, proj_in/out, ResNet and sampler convs."""
    leaves = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
              "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
    return [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n.endswith(leaves)]


def _text_layers(text: nn.Module) -> list[str]:
    leaves = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    return [n for n, m in text.named_modules() if isinstance(m, nn.Linear) and n.endswith(leaves)]


def random_lora(pipe: latentdiff.Pipeline, seed: int, alphas: str = "kohya") -> dict[tuple[str, str], tuple[Tensor, Tensor, float | None]]:
    """{(target, module): (down, up, alpha)}: random rank-4 updates of every patched layer.

    ``alphas``: "kohya" as kohya's trainer writes them (network_alpha 2 on the linears and 1x1
    convs, conv_alpha 1 on the 3x3 convs), "mixed" (several values, some layers without),
    "none"."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    layers = [("unet", n) for n in _unet_layers(pipe.unet)] + [("text_encoder", n) for n in _text_layers(pipe.text_encoder)]
    for i, (target, name) in enumerate(layers):
        w = getattr(pipe, target).get_parameter(name + ".weight")  # (out, in[, k, k])
        kernel = tuple(w.shape[2:])
        down = torch.randn((RANK, w.shape[1], *kernel), generator=g) / (w[0].numel() ** 0.5)  # (r, in[, k, k])
        up = torch.randn((w.shape[0], RANK, *((1, 1) if kernel else ())), generator=g) * 0.2  # (out, r[, 1, 1])
        if alphas == "kohya":
            alpha: float | None = 1.0 if kernel == (3, 3) else 2.0
        elif alphas == "mixed":
            alpha = None if i % 5 == 0 else float((1.0, 2.0, 8.0)[i % 3])
        else:
            alpha = None
        out[target, name] = (down, up, alpha)
    return out


def kohya_file(lora: dict, path: Path, sd_form: bool = False, pipe: latentdiff.Pipeline | None = None) -> Path:
    """Write ``lora`` with kohya keys; ``sd_form`` names the UNet's layers as the original SD does."""
    original = kohya._original_names(pipe.unet, [n for t, n in lora if t == "unet"]) if sd_form else {}
    sd = {}
    for (target, name), (down, up, alpha) in lora.items():
        name = original.get(name, name) if target == "unet" else name
        stem = ("lora_unet_" if target == "unet" else "lora_te_") + name.replace(".", "_")
        sd[stem + ".lora_down.weight"], sd[stem + ".lora_up.weight"] = down, up
        if alpha is not None:
            sd[stem + ".alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return path


def peft_file(lora: dict, path: Path, alphas: bool = False) -> Path:
    """Write ``lora`` as diffusers' save_lora_weights does (PEFT lora_A / lora_B; alphas optional)."""
    sd = {}
    for (target, name), (down, up, alpha) in lora.items():
        sd[f"{target}.{name}.lora_A.weight"], sd[f"{target}.{name}.lora_B.weight"] = down, up
        if alphas and alpha is not None:
            sd[f"{target}.{name}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return path


def latents_of(p: latentdiff.Pipeline) -> Tensor:
    return p.txt2img(PROMPTS, steps=STEPS, seed=SEED, sampler="ddim", negative_prompt="blurry",
                     width=SIZE, height=SIZE, output_type="latent")


def compare_with(pipe: latentdiff.Pipeline, ref) -> Tensor:
    """Ours vs ``ref`` (fused): the merged weights, then the final latents within 1e-5 and each decode
    within 1/255; returns our final latents."""
    assert_weights_match(pipe, ref)
    ours = latents_of(pipe)
    theirs = ref(PROMPTS, negative_prompt=["blurry"] * len(PROMPTS), num_inference_steps=STEPS, guidance_scale=7.5,
                 generator=generators(len(PROMPTS), SEED), width=SIZE, height=SIZE, output_type="latent").images
    assert_latents_match(ours, theirs)
    with torch.no_grad():
        pixels = ref.vae.decode(theirs / ref.vae.config.scaling_factor).sample
    assert_images_match(to_pil(decode(pipe, ours)), (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy())
    return ours


def assert_weights_match(pipe: latentdiff.Pipeline, ref, rtol: float = 1e-6) -> None:
    """The merged weights equal diffusers' fused ones (after unload_lora_weights, which keeps the fusion)."""
    ref.unload_lora_weights()
    for name in ("unet", "text_encoder"):
        theirs = getattr(ref, name).state_dict()
        for key, value in getattr(pipe, name).state_dict().items():
            if key in theirs:  # position_ids and the like aside
                err = ((value - theirs[key]).abs().max() / theirs[key].abs().max().clamp_min(1e-12)).item()
                assert err <= rtol, f"{name}.{key}: relative error {err:.3g}"


def test_kohya_lora_matches_diffusers(ours, base_latents: Tensor, diffusers_dir: Path, tmp_path: Path) -> None:
    base = base_latents
    path = kohya_file(random_lora(ours, 0), tmp_path / "style.safetensors")
    assert ours.load_lora(path, 0.7) == "style" and ours.loras == {"style": 0.7}
    ref = reference(diffusers_dir)
    ref.load_lora_weights(str(path))
    ref.fuse_lora(lora_scale=0.7)
    latents = compare_with(ours, ref)
    assert (latents - base).abs().max() > 0.05 * base.abs().max(), "the LoRA must change the result"


def test_sd_form_names_equal_diffusers_form(ours, tmp_path: Path) -> None:
    lora = random_lora(ours, 1, alphas="mixed")
    ours.load_lora(kohya_file(lora, tmp_path / "d.safetensors"), 0.8)
    merged = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    ours.unload_lora()
    path = kohya_file(lora, tmp_path / "sd.safetensors", sd_form=True, pipe=ours)
    keys = [k for k in load_file(str(path))]
    assert any("input_blocks_1_1_transformer_blocks_0_attn1_to_q" in k for k in keys)
    assert any("output_blocks_2_1_conv" in k for k in keys) and any("middle_block_0_in_layers_2" in k for k in keys)
    ours.load_lora(path, 0.8)
    for k, v in ours.unet.state_dict().items():
        assert torch.equal(v, merged[k]), k


def test_peft_lora_matches_diffusers(ours, diffusers_dir: Path, tmp_path: Path) -> None:
    lora = random_lora(ours, 2, alphas="none")  # as save_lora_weights writes them: no alphas
    path = peft_file(lora, tmp_path / "peft.safetensors")
    ours.load_lora(path, 0.7)
    ref = reference(diffusers_dir)
    ref.load_lora_weights(str(path))
    ref.fuse_lora(lora_scale=0.7)
    compare_with(ours, ref)


def test_peft_alphas_and_processor_keys_equal_kohya(ours, tmp_path: Path) -> None:
    lora = random_lora(ours, 3, alphas="mixed")
    ours.load_lora(kohya_file(lora, tmp_path / "k.safetensors"), 0.6)
    merged = {t: {k: v.clone() for k, v in getattr(ours, t).state_dict().items()} for t in ("unet", "text_encoder")}
    ours.unload_lora()
    ours.load_lora(peft_file(lora, tmp_path / "p.safetensors", alphas=True), 0.6)
    for t in merged:
        for k, v in getattr(ours, t).state_dict().items():
            assert torch.equal(v, merged[t][k]), (t, k)
    ours.unload_lora()
    # the attention-processor form (diffusers <= 0.20): UNet attention, text encoder attention and MLP, no alphas
    attn = {k: (d, u, None) for k, (d, u, _) in lora.items() if k[0] == "text_encoder" or ".attn" in k[1]}
    proc = {}
    for (target, name), (down, up, _) in attn.items():
        if target == "text_encoder" and ".mlp." in name:
            stem = f"text_encoder.{name}.lora_linear_layer"
        elif target == "text_encoder":
            head, leaf = name.rsplit(".", 1)  # self_attn, q_proj
            stem = f"text_encoder.{head}.to_{'out' if leaf == 'out_proj' else leaf[0]}_lora"
        else:
            head, leaf = name.removesuffix(".0").rsplit(".", 1)  # attn1, to_q / to_out
            stem = f"unet.{head}.processor.{leaf}_lora"
        proc[f"{stem}.down.weight"], proc[f"{stem}.up.weight"] = down, up
    save_file(proc, str(tmp_path / "proc.safetensors"))
    ours.load_lora(tmp_path / "proc.safetensors", 0.6)
    assert any("processor.to_out_lora" in k for k in proc) and any("lora_linear_layer" in k for k in proc)
    via_proc = {t: {k: v.clone() for k, v in getattr(ours, t).state_dict().items()} for t in ("unet", "text_encoder")}
    ours.unload_lora()
    ours.load_lora(peft_file(attn, tmp_path / "attn.safetensors"), 0.6)
    for t in via_proc:
        for k, v in getattr(ours, t).state_dict().items():
            assert torch.equal(v, via_proc[t][k]), (t, k)


def test_alpha_over_rank_and_missing_alpha(ours, tmp_path: Path) -> None:
    """scale = alpha / rank; a layer without alpha has scale 1 (alpha = rank), as in kohya and A1111."""
    lora = random_lora(ours, 11, alphas="mixed")
    before = {t: {k: v.clone() for k, v in getattr(ours, t).state_dict().items()} for t in ("unet", "text_encoder")}
    ours.load_lora(kohya_file(lora, tmp_path / "m.safetensors"), 0.3)
    assert {a for *_, a in lora.values()} == {None, 1.0, 2.0, 8.0}
    for (t, name), (down, up, alpha) in lora.items():
        w = before[t][name + ".weight"]
        scale = 1.0 if alpha is None else alpha / RANK
        expected = w + (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * (scale * 0.3)
        torch.testing.assert_close(getattr(ours, t).get_parameter(name + ".weight"), expected, rtol=0, atol=1e-6)


def test_unload_restores_originals_exactly(ours, base_latents: Tensor, tmp_path: Path) -> None:
    before = {t: {k: v.clone() for k, v in getattr(ours, t).state_dict().items()} for t in ("unet", "text_encoder")}
    base = base_latents
    a = ours.load_lora(kohya_file(random_lora(ours, 4), tmp_path / "a.safetensors"), 0.9)
    b = ours.load_lora(peft_file(random_lora(ours, 5), tmp_path / "b.safetensors"), -0.5, name="bee",
                       text_encoder_scale=0.3)
    assert ours.loras == {"a": 0.9, "bee": -0.5} and b == "bee"
    with pytest.raises(latentdiff.BadArgument, match="already loaded"):
        ours.load_lora(tmp_path / "a.safetensors")
    ours.unload_lora(a)
    assert ours.loras == {"bee": -0.5}
    ours.unload_lora("bee")
    assert ours.loras == {}
    for t, sd in before.items():
        for k, v in getattr(ours, t).state_dict().items():
            assert torch.equal(v, sd[k]), (t, k)
    assert torch.equal(latents_of(ours), base)
    with pytest.raises(latentdiff.BadArgument, match="no LoRA named"):
        ours.unload_lora("a")


def test_two_loras_stack_like_set_adapters(ours, diffusers_dir: Path, tmp_path: Path) -> None:
    one = kohya_file(random_lora(ours, 6), tmp_path / "one.safetensors")
    two = kohya_file(random_lora(ours, 7), tmp_path / "two.safetensors")
    ours.load_lora(one, 0.7)
    ours.load_lora(two, -0.4, unet_scale=-0.4, text_encoder_scale=0.5)  # per-network scales too
    ref = reference(diffusers_dir)
    ref.load_lora_weights(str(one), adapter_name="one")
    ref.load_lora_weights(str(two), adapter_name="two")
    ref.set_adapters(["one", "two"], adapter_weights=[0.7, {"unet": -0.4, "text_encoder": 0.5}])
    ref.fuse_lora()
    compare_with(ours, ref)


@pytest.mark.parametrize(("edit", "named"), [
    (lambda sd: sd.update({"lora_unet_down_blocks_0_attentions_0_nonsense.lora_down.weight": torch.zeros(4, 32),
                           "lora_unet_down_blocks_0_attentions_0_nonsense.lora_up.weight": torch.zeros(32, 4)}),
     "lora_unet_down_blocks_0_attentions_0_nonsense"),
    (lambda sd: sd.update({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(36, 4)}),
     "lora_te_text_model_encoder_layers_0_mlp_fc1"),
    (lambda sd: sd.update({"lora_unet_mid_block_resnets_0_conv1.hada_w1_a": torch.zeros(64, 4)}), "LoHa"),
    (lambda sd: sd.update({"lora_unet_mid_block_resnets_0_conv1.lokr_w1": torch.zeros(8, 8)}), "LoKr"),
    (lambda sd: sd.update({"lora_unet_mid_block_resnets_0_conv1.lora_mid.weight": torch.zeros(4, 4, 3, 3)}),
     "lora_mid"),
    (lambda sd: sd.update({"lora_unet_mid_block_resnets_0_conv1.lora_down.bias": torch.zeros(4)}),
     "lora_down.bias"),
])
def test_bad_kohya_files_are_refused(ours, tmp_path: Path, edit, named: str) -> None:
    path = kohya_file(random_lora(ours, 9), tmp_path / "good.safetensors")
    sd = load_file(str(path))
    edit(sd)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    before = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    with pytest.raises(latentdiff.CheckpointError, match=named.replace(".", r"\.")):
        ours.load_lora(tmp_path / "bad.safetensors")
    assert ours.loras == {}
    assert all(torch.equal(v, before[k]) for k, v in ours.unet.state_dict().items()), "a refused file touched weights"


def test_bad_peft_files_are_refused(ours, tmp_path: Path) -> None:
    lora = {k: v for k, v in random_lora(ours, 10).items() if k[0] == "unet"}
    sd = {}
    for (t, n), (d, u, _) in lora.items():
        sd[f"{t}.{n}.lora_A.weight"], sd[f"{t}.{n}.lora_B.weight"] = d, u
    bad = dict(sd, **{"unet.mid_block.nowhere.lora_A.weight": torch.zeros(4, 8),
                      "unet.mid_block.nowhere.lora_B.weight": torch.zeros(8, 4)})
    save_file(bad, str(tmp_path / "unknown.safetensors"))
    with pytest.raises(latentdiff.CheckpointError, match="unet.mid_block.nowhere"):
        ours.load_lora(tmp_path / "unknown.safetensors")
    key = next(k for k in sd if k.endswith("to_q.lora_B.weight"))
    save_file(dict(sd, **{key: torch.zeros(7, RANK)}), str(tmp_path / "shape.safetensors"))
    with pytest.raises(latentdiff.CheckpointError, match=r"does not fit"):
        ours.load_lora(tmp_path / "shape.safetensors")
    save_file({"unet.x.weird": torch.zeros(2)}, str(tmp_path / "weird.safetensors"))
    with pytest.raises(latentdiff.CheckpointError, match="unet.x.weird"):
        ours.load_lora(tmp_path / "weird.safetensors")
    assert ours.loras == {}


def test_lora_hash_is_a1111s(tmp_path: Path) -> None:
    tensors = {"lora_unet_x.alpha": torch.tensor(4.0), "lora_unet_x.lora_down.weight": torch.ones(2, 3)}
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"ss_note": "one"})
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata={"ss_note": "a longer note"})
    data = (tmp_path / "a.safetensors").read_bytes()
    body = data[8 + int.from_bytes(data[:8], "little"):]
    assert lora_hash(tmp_path / "a.safetensors") == hashlib.sha256(body).hexdigest()[:12]
    assert lora_hash(tmp_path / "b.safetensors") == lora_hash(tmp_path / "a.safetensors")  # metadata aside
    torch.save(tensors, tmp_path / "c.pt")
    assert lora_hash(tmp_path / "c.pt") == hashlib.sha256((tmp_path / "c.pt").read_bytes()).hexdigest()[:12]


def test_lora_hash_reads_a_file_once_until_it_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import latentdiff.adapters as adapters

    reads = []
    real = adapters.sha256_file
    monkeypatch.setattr(adapters, "sha256_file", lambda path, start=0: reads.append(path) or real(path, start))
    path = tmp_path / "ink.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 3)}, str(path))
    first = lora_hash(path)
    assert lora_hash(path) == lora_hash(str(path)) == first and len(reads) == 1  # prompts ask on every call
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 3)}, str(path))
    os.utime(path, ns=(1, os.stat(path).st_mtime_ns + 1))  # a rewrite within the clock's resolution
    assert lora_hash(path) != first and len(reads) == 2


def test_linear_shaped_lora_on_a_1x1_conv(ours, tmp_path: Path) -> None:
    """A proj_in LoRA trained on a linear projection (SD 2 style, (r, in) / (out, r)) fits the 1x1 conv."""
    w = ours.unet.get_parameter("down_blocks.0.attentions.0.proj_in.weight").detach().clone()  # (out, in, 1, 1)
    down, up = torch.randn(RANK, w.shape[1]), torch.randn(w.shape[0], RANK)
    stem = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(2.0)},
              str(tmp_path / "lin.safetensors"))
    ours.load_lora(tmp_path / "lin.safetensors", 0.5)
    expected = w + (up @ down).reshape(w.shape) * (2.0 / RANK * 0.5)
    torch.testing.assert_close(ours.unet.get_parameter("down_blocks.0.attentions.0.proj_in.weight"), expected,
                               rtol=0, atol=1e-6)
