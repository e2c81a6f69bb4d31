"""Attention maps: each cross-attention layer's probabilities equal diffusers' get_attention_scores
on the same UNet; word positions; the built-in model's shape word points at its object; the CLI."""

from __future__ import annotations

from pathlib import Path

import diffusers
from diffusers.models.attention_processor import AttnProcessor
import pytest
import torch
from PIL import Image

import latentdiff
from latentdiff.cli import main
from latentdiff.explain import CrossAttentionRecorder, cross_attention_probs, prompt_words


class RecordingProcessor(AttnProcessor):
    """diffusers' plain attention processor, keeping the cross-attention probabilities it computes."""

    def __init__(self, store: list) -> None:
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if encoder_hidden_states is not None:
            query = attn.head_to_batch_dim(attn.to_q(hidden_states))
            key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
            probs = attn.get_attention_scores(query, key, None)  # (B * heads, N, M)
            self.store.append(probs.reshape(hidden_states.shape[0], attn.heads, *probs.shape[1:]))
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def test_layer_probabilities_match_diffusers(diffusers_dir: Path) -> None:
    ref = diffusers.UNet2DConditionModel.from_pretrained(diffusers_dir, subfolder="unet").eval()
    theirs: list = []
    ref.set_attn_processor(RecordingProcessor(theirs))
    ours: list = []
    pipe = latentdiff.load(diffusers_dir)
    layers = [m for name, m in pipe.unet.named_modules() if name.endswith("attn2")]
    hooks = [m.register_forward_hook(lambda m, i, o: ours.append(cross_attention_probs(m, i[0], i[1]))) for m in layers]
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 128, generator=g)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        ref(x, t, context)
        pipe.unet(x, t, context)
    for h in hooks:
        h.remove()
    assert len(ours) == len(theirs) == len(layers) > 0
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-6)


def test_recorder_averages_upsampled_layer_maps(diffusers_dir: Path) -> None:
    """The recorder's mean is the mean over calls of each layer's head-averaged, upsampled map,
    computed on the conditional half of a guided batch."""
    pipe = latentdiff.load(diffusers_dir)
    expected = []
    layers = [m for name, m in pipe.unet.named_modules() if name.endswith("attn2")]

    def independent(module, inputs, output):
        probs = cross_attention_probs(module, inputs[0][1:], inputs[1][1:]).mean(dim=1)  # (1, HW, 77)
        side = int(probs.shape[1] ** 0.5)
        maps = probs.transpose(1, 2).reshape(1, 77, side, side)
        expected.append(torch.nn.functional.interpolate(maps, size=(8, 8), mode="bilinear", align_corners=False))

    hooks = [m.register_forward_hook(independent) for m in layers]
    recorder = CrossAttentionRecorder(pipe.unet, (8, 8))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in (900, 400):
            pipe.unet(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([t, t]), torch.randn(2, 77, 128, generator=g))
    recorder.remove()
    for h in hooks:
        h.remove()
    torch.testing.assert_close(recorder.mean(), torch.stack(expected).mean(dim=0), rtol=1e-5, atol=1e-7)
    assert recorder.calls == 2 * len(layers)


def test_prompt_words_cover_the_prompts_tokens() -> None:
    pipe = latentdiff.load()
    prompt = "a small blue square in the top left, on a black background"
    words = prompt_words(pipe.tokenizer, prompt)
    assert [w for w, _ in words] == ["a", "small", "blue", "square", "in", "the", "top", "left", ",", "on", "a",
                                    "black", "background"]
    positions = [p for _, ps in words for p in ps]
    assert positions == list(range(1, 1 + len(pipe.tokenizer.encode(prompt))))
    ids = pipe.tokenizer(prompt)[0]
    assert [int(ids[p]) for p in positions] == pipe.tokenizer.encode(prompt)


@pytest.mark.parametrize("prompt, word, cell", [
    ("a large red circle in the top left on a white background", "circle", (0, 0)),
    ("a large blue square in the bottom right on a black background", "square", (2, 2)),
])
def test_builtin_models_shape_word_points_at_its_object(prompt: str, word: str, cell: tuple[int, int]) -> None:
    pipe = latentdiff.load(dtype=torch.float32)
    result = pipe.attention_maps(prompt, steps=10, guidance_scale=7.5, sampler="ddim", seed=0)
    assert result.maps.shape == (len(result.words), 64, 64) and len(result.x0_steps) == 10
    x, y = result.peak(result.words.index(word))
    assert (y * 3 // 64, x * 3 // 64) == cell
    background = result.peak(result.words.index("background"))
    assert background != (x, y)


def test_cli_explain_writes_the_sheet(tmp_path: Path, capsys) -> None:
    out = tmp_path / "explain.png"
    assert main(["explain", "a small green triangle on the left", "--steps", "4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "triangle" in text and "peak at" in text and str(out) in text
    sheet = Image.open(out)
    words = 7  # a, small, green, triangle, on, the, left
    assert sheet.size == ((words + 1) * 128, 2 * (128 + 12))  # image + 7 overlays; 4 x0 steps below
