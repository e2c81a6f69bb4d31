"""Textual-inversion embeddings against diffusers' load_textual_inversion, and A1111's semantics.

diffusers adds the tokens ``name``, ``name_1``, ... to its tokenizer and rewrites ``name`` in a
prompt into ``name name_1 ...``; latentdiff replaces the token-id run of ``name`` by the vectors
(A1111's way). Both must give the same text embeddings and the same images.
"""

from __future__ import annotations

from pathlib import Path

import diffusers
import pytest
import torch
from safetensors.torch import save_file

import latentdiff
from latentdiff.adapters.embeddings import embedding_hash, read_embedding
from latentdiff.generate import decode, to_pil

from conftest import assert_rel_close
from test_generate import assert_images_match, assert_latents_match, generators

D = 128  # the tiny text encoder's width (conftest)
ONE, TRI = "zqxone", "zqxtri"  # names that the tiny tokenizer cuts into several tokens


def _vectors(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 0.5  # (n, D)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An A1111 .pt (1 vector) and an A1111 emb_params .safetensors (3 vectors)."""
    folder = tmp_path_factory.mktemp("embeddings")
    one = folder / f"{ONE}.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": _vectors(1, 1)}, "name": ONE,
                "step": 1000, "sd_checkpoint": "abcdef1234", "sd_checkpoint_name": "model"}, one)
    tri = folder / f"{TRI}.safetensors"
    save_file({"emb_params": _vectors(3, 2)}, tri)
    return {ONE: one, TRI: tri}


@pytest.fixture(scope="module")
def pipe(diffusers_dir: Path, files: dict[str, Path]) -> latentdiff.Pipeline:
    pipe = latentdiff.load(diffusers_dir)
    assert pipe.load_textual_inversion(files[ONE]) == ONE
    assert pipe.load_textual_inversion(files[TRI]) == TRI
    return pipe


@pytest.fixture(scope="module")
def ref(diffusers_dir: Path, files: dict[str, Path]):
    ref = diffusers.StableDiffusionPipeline.from_pretrained(diffusers_dir)
    ref.set_progress_bar_config(disable=True)
    ref.load_textual_inversion(str(files[ONE]), token=ONE)
    ref.load_textual_inversion(str(files[TRI]), token=TRI)
    return ref


def ref_hidden(ref, ids: list[list[int]]) -> torch.Tensor:
    """transformers' text encoder on framed id rows (B, 77) -> (B, 77, D)."""
    with torch.no_grad():
        return ref.text_encoder(torch.tensor(ids)).last_hidden_state


def ref_ids(ref, text: str) -> list[int]:
    """diffusers' token ids of ``text`` (its multi-vector rewrite), no start/end tokens."""
    return ref.tokenizer(ref.maybe_convert_prompt(text, ref.tokenizer), add_special_tokens=False).input_ids


def frame(ref, ids: list[int]) -> list[int]:
    tok = ref.tokenizer
    framed = [tok.bos_token_id, *ids, tok.eos_token_id]
    return framed + [tok.pad_token_id] * (77 - len(framed))


def test_read_formats(tmp_path: Path, files: dict[str, Path]) -> None:
    assert read_embedding(files[ONE]).shape == (1, D)
    assert torch.equal(read_embedding(files[TRI]), _vectors(3, 2))
    single = tmp_path / "learned_embeds.bin"  # diffusers: {token: (D,)}
    torch.save({"<cat>": _vectors(1, 3)[0]}, single)
    assert torch.equal(read_embedding(single), _vectors(1, 3))
    multi = tmp_path / "learned_embeds.safetensors"  # diffusers: {token: (n, D)}
    save_file({"<cat>": _vectors(2, 4)}, multi)
    assert torch.equal(read_embedding(multi), _vectors(2, 4))
    import hashlib
    assert embedding_hash(files[ONE]) == hashlib.sha256(files[ONE].read_bytes()).hexdigest()[:12]


@pytest.mark.parametrize("prompt", [f"a photo of {ONE} cat", f"{TRI}, a red circle", f"{ONE} and {TRI} {ONE}"])
def test_encode_prompt_matches_diffusers(pipe, ref, prompt: str) -> None:
    ours = pipe.encode_prompt(prompt)  # (1, 77, D)
    with torch.no_grad():
        theirs, _ = ref.encode_prompt(prompt, "cpu", 1, False)
    assert ours.shape == theirs.shape
    assert_rel_close(ours, theirs, 1e-5)
    assert (ours - pipe.encode_prompt(prompt.replace(ONE, "a").replace(TRI, "a"))).abs().max() > 1e-2


def test_txt2img_with_embeddings_matches_diffusers(pipe, ref) -> None:
    prompt, negative = f"a photo of {TRI} on a sofa", f"blurry {ONE}"
    ours = pipe.txt2img(prompt, negative_prompt=negative, steps=6, seed=3, sampler="ddim", width=32, height=32,
                        output_type="latent")
    theirs = ref(prompt, negative_prompt=negative, num_inference_steps=6, guidance_scale=7.5,
                 generator=generators(1), width=32, height=32, output_type="latent").images
    assert_latents_match(ours, theirs)
    with torch.no_grad():
        pixels = ref.vae.decode(theirs / ref.vae.config.scaling_factor).sample
    assert_images_match(to_pil(decode(pipe, ours)), (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy())


def test_negative_prompt_uses_embeddings(pipe, ref) -> None:
    with torch.no_grad():
        _, theirs = ref.encode_prompt("a cat", "cpu", 1, True, negative_prompt=f"{TRI} blurry")
    assert_rel_close(pipe.encode_prompt(f"{TRI} blurry"), theirs, 1e-5)


def test_weighted_embedding_scales_its_vectors(pipe, ref) -> None:
    """(name:1.2): the n vectors' hidden states get 1.2, then the chunk mean is restored (A1111)."""
    ref_model = getattr(ref.text_encoder, "text_model", ref.text_encoder)  # transformers 4 / 5
    norms = [pipe.text_encoder.text_model.final_layer_norm, ref_model.final_layer_norm]
    saved = [norm.bias.detach().clone() for norm in norms]
    with torch.no_grad():  # a random final norm has bias 0, so hidden states average to ~0: give them a mean
        for norm in norms:
            norm.bias.fill_(0.3)
    try:
        ours = pipe.encode_prompt(f"a photo of ({TRI}:1.2) cat")
        expected = _weighted_expectation(ref)
    finally:
        with torch.no_grad():
            for norm, bias in zip(norms, saved):
                norm.bias.copy_(bias)
    assert_rel_close(ours, expected, 1e-5)


def _weighted_expectation(ref) -> torch.Tensor:
    ids = ref_ids(ref, "a photo of ") + ref_ids(ref, TRI) + ref_ids(ref, " cat")
    start = 1 + len(ref_ids(ref, "a photo of "))
    hidden = ref_hidden(ref, [frame(ref, ids)])  # (1, 77, D)
    weights = torch.ones(1, 77, 1)
    weights[:, start : start + 3] = 1.2
    return hidden * weights * (hidden.mean() / (hidden * weights).mean())


def test_long_prompt_keeps_embedding_whole(pipe, ref) -> None:
    """Over 75 tokens: chunks of 75; an embedding that would straddle a chunk end moves whole
    to the next chunk (A1111), which leaves the first chunk short."""
    filler = "a red circle " * 40
    head = ref_ids(ref, filler)[:74]
    text = ref.tokenizer.decode(head) + f" {TRI} cat"
    assert ref_ids(ref, ref.tokenizer.decode(head)) == head
    ours = pipe.encode_prompt(text)  # (1, 154, D)
    tri = ref_ids(ref, TRI)
    assert len(tri) == 3
    expected = ref_hidden(ref, [frame(ref, head), frame(ref, tri + ref_ids(ref, " cat"))]).reshape(1, 154, D)
    assert_rel_close(ours, expected, 1e-5)
    # and a prompt made long by the embedding alone still encodes, framed per chunk
    assert pipe.encode_prompt(ref.tokenizer.decode(head[:73]) + f" {ONE} {TRI}").shape == (1, 154, D)


def test_ti_hashes_infotext(pipe, files: dict[str, Path]) -> None:
    settings = pipe.settings(f"a {TRI} cat", negative_prompt=f"({ONE}:1.3), {TRI}", steps=2)
    line = settings.infotext(0).splitlines()[-1]
    h1, h3 = embedding_hash(files[ONE]), embedding_hash(files[TRI])
    assert line.endswith(f'TI hashes: "{TRI}: {h3}, {ONE}: {h1}, {TRI}: {h3}"'), line
    assert "TI hashes" not in pipe.settings("a cat", steps=2).infotext(0)


def test_unload(diffusers_dir: Path, files: dict[str, Path]) -> None:
    pipe = latentdiff.load(diffusers_dir)
    plain = pipe.encode_prompt(f"a {ONE}")
    assert pipe.load_textual_inversion(files[ONE], token="other") == "other"
    assert torch.equal(pipe.encode_prompt(f"a {ONE}"), plain)
    assert not torch.equal(pipe.encode_prompt("a other"), pipe.encode_prompt("a"))
    pipe.unload_textual_inversion("other")
    assert pipe.embeddings == {}
    with pytest.raises(latentdiff.BadArgument):
        pipe.unload_textual_inversion("other")


class _Code:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_bad_files(diffusers_dir: Path, tmp_path: Path) -> None:
    pipe = latentdiff.load(diffusers_dir)
    wide = tmp_path / "wide.safetensors"
    save_file({"emb_params": torch.zeros(2, 64)}, wide)
    with pytest.raises(latentdiff.CheckpointError, match=r"wide\.safetensors.*D=64.*128"):
        pipe.load_textual_inversion(wide)
    code = tmp_path / "code.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, D)}, "x": _Code()}, code)  # needs code to unpickle
    with pytest.raises(latentdiff.CheckpointError, match=r"code\.pt.*weights_only"):
        pipe.load_textual_inversion(code)
    assert pipe.embeddings == {}
