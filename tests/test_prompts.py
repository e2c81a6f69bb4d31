"""Prompt weighting syntax and long prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import latentdiff
from latentdiff.prompts import parse_weighted_prompt, tokenize_weighted


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [  # AUTOMATIC1111's documented examples, plus edge cases
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
             (", sun, ", 1.1), ("sky", 1.1**4), (".", 1.1)],
        ),
        ("", [("", 1.0)]),
        ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
        ("(a : 2 )", [("a ", 2.0)]),
        ("ratio 16:9 (b:-0.5)", [("ratio 16:9 ", 1.0), ("b", -0.5)]),
        ("unmatched) and ]", [("unmatched) and ]", 1.0)]),
        ("\\\\ backslash", [("\\ backslash", 1.0)]),
    ],
)
def test_parse_weighted_prompt(prompt: str, expected: list[tuple[str, float]]) -> None:
    got = parse_weighted_prompt(prompt)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


@pytest.fixture(scope="module")
def pipe(diffusers_dir: Path) -> latentdiff.Pipeline:
    return latentdiff.load(diffusers_dir)


def test_plain_prompt_is_plain_clip(pipe: latentdiff.Pipeline) -> None:
    ids = pipe.tokenizer(["a red circle on a white background"])
    with torch.no_grad():
        expected = pipe.text_encoder(ids)
    assert torch.equal(pipe.encode_prompt("a red circle on a white background"), expected)


def test_weights_scale_tokens_and_keep_the_mean(diffusers_dir: Path) -> None:
    pipe = latentdiff.load(diffusers_dir)
    with torch.no_grad():  # a random final norm has bias 0, so hidden states average to ~0: give them a mean
        pipe.text_encoder.text_model.final_layer_norm.bias.fill_(0.3)
    ids = pipe.tokenizer(["red circle"])
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)  # (1, 77, D)
    n_red = len(pipe.tokenizer.encode("red"))
    weights = torch.ones(1, 77)
    weights[0, 1 : 1 + n_red] = 1.5
    weighted = hidden * weights[:, :, None]
    weighted = weighted * (hidden.mean() / weighted.mean())
    got = pipe.encode_prompt("(red:1.5) circle")
    torch.testing.assert_close(got, weighted, rtol=1e-5, atol=1e-6)
    # Unweighted prompts in the same batch are untouched.
    both = pipe.encode_prompt(["(red:1.5) circle", "red circle"])
    assert torch.equal(both[1], hidden[0])


def test_long_prompt_is_chunked(pipe: latentdiff.Pipeline) -> None:
    words = " ".join(["red circle blue square"] * 40)
    tokens = pipe.tokenizer.encode(words)
    assert len(tokens) > 75 * 2
    emb = pipe.encode_prompt(words)
    chunks = -(-len(tokens) // 75)
    assert emb.shape == (1, 77 * chunks, pipe.text_encoder.config.hidden_size)
    tok = pipe.tokenizer
    second = tokens[75:150]
    ids = torch.tensor([[tok.bos_token_id, *second, tok.eos_token_id]])
    with torch.no_grad():
        expected = pipe.text_encoder(ids)
    torch.testing.assert_close(emb[:, 77 : 77 + 77], expected, rtol=1e-5, atol=1e-6)

    # A short prompt batched with a long one gets padded with empty chunks; so does a negative prompt.
    batch = pipe.encode_prompt([words, "a cat"])
    assert batch.shape[1] == 77 * chunks
    # equal up to float rounding: the batch runs more chunks through the encoder at once, and on CPUs
    # without AVX512 oneDNN's kernels round differently for another batch size
    torch.testing.assert_close(batch[1, :77], pipe.encode_prompt("a cat")[0], rtol=1e-5, atol=1e-6)
    assert pipe.encode_prompt("", min_chunks=chunks).shape[1] == 77 * chunks


def test_chunk_framing(pipe: latentdiff.Pipeline) -> None:
    chunks = tokenize_weighted(pipe.tokenizer, ["(a:2)", ""], min_chunks=2)
    tok = pipe.tokenizer
    assert chunks.ids.shape == (2, 2, 77)
    assert chunks.ids[0, 0, 0] == tok.bos_token_id
    assert chunks.ids[1, 1, :2].tolist() == [tok.bos_token_id, tok.eos_token_id]
    assert chunks.weights[0, 0, 1] == 2.0 and chunks.weights[0, 0, 0] == 1.0
