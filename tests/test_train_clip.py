"""CLIP trainer on the Shapes World: loss math, hard negatives, tokenizer, smoke run, export, exact resume."""

from __future__ import annotations

import csv
import json
import math
import warnings

import numpy as np
import pytest
import torch

from latentdiff.checkpoints.errors import CheckpointError
from latentdiff.loading import load_component
from latentdiff.models.clip import CLIPTextModel
from latentdiff.checkpoints.clip_folder import load_clip_model
from latentdiff.models.tokenizer import CLIPTokenizer, train_clip_bpe
from latentdiff.train.checkpoint import load_checkpoint
from latentdiff.eval.zero_shot import zero_shot_accuracy
from latentdiff.train.clip import CLIPTrainConfig, CLIPTrainer, tokenize_batch, train_clip, train_world_tokenizer
from latentdiff.train.config import TrainConfigError
from latentdiff.train.losses import clip_loss
from latentdiff.world import WorldDataset, held_out_prompts, parse_caption, scene_from_caption, zero_shot_candidates
from latentdiff.world.negatives import (
    ATTRIBUTE_KINDS,
    attribute_difference,
    describes,
    hard_negatives,
    one_attribute_variants,
    world_words,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def tiny_config(out_dir, **changes) -> CLIPTrainConfig:
    base = dict(
        out_dir=str(out_dir), text_hidden_size=32, text_layers=2, text_heads=2, text_intermediate_size=48,
        vision_image_size=32, vision_patch_size=8, vision_hidden_size=32, vision_layers=2, vision_heads=2,
        vision_intermediate_size=48, projection_dim=16, tokenizer_captions=400, batch_size=6, hard_negatives=2,
        lr=1e-3, warmup_steps=2, max_steps=4, sample_every=0, checkpoint_every=2, zero_shot_n=10, world_seed=3,
    )
    return CLIPTrainConfig(**{**base, **changes})


# ----------------------------------------------------------------------------- loss
def test_info_nce_hand_made_2x2():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # normalised: (1, 0), (1, 1)/sqrt(2)
    c = 1 / math.sqrt(2)
    # logits (scale 1): [[1, c], [0, c]]
    i2t = (-math.log(math.e / (math.e + math.exp(c))) - math.log(math.exp(c) / (1 + math.exp(c)))) / 2
    t2i = (-math.log(math.e / (math.e + 1)) + math.log(2)) / 2
    loss, parts = clip_loss(image, text, torch.tensor(0.0))
    assert parts["i2t"].item() == pytest.approx(i2t, abs=1e-6)
    assert parts["t2i"].item() == pytest.approx(t2i, abs=1e-6)
    assert loss.item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)
    assert parts["acc"].item() == 1.0  # both diagonals win their rows (1 > c, c > 0)
    # The scale multiplies every logit: log(2) doubles them.
    loss2, parts2 = clip_loss(image, text, torch.tensor(math.log(2.0)))
    assert parts2["t2i"].item() == pytest.approx(
        (-math.log(math.e**2 / (math.e**2 + 1)) + math.log(2)) / 2, abs=1e-6
    )


def test_hard_negative_columns_and_mask_change_the_loss():
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    hard = torch.randn(4, 3, 8, generator=g)
    base, p0 = clip_loss(image, text, torch.tensor(1.0))
    with_hard, p1 = clip_loss(image, text, torch.tensor(1.0), hard)
    assert p1["i2t"] > p0["i2t"]  # more candidates in every row: strictly larger cross-entropy
    assert p1["t2i"].item() == pytest.approx(p0["t2i"].item(), abs=1e-7)  # not in the text -> image direction
    assert with_hard > base
    # A hard negative equal to the true caption costs log-sum-exp terms exactly as computed by hand.
    same = text[:, None, :].expand(4, 1, 8)
    _, p2 = clip_loss(image, text, torch.tensor(0.0), same)
    im, tx = torch.nn.functional.normalize(image, dim=-1), torch.nn.functional.normalize(text, dim=-1)
    logits = im @ tx.t()
    rows = torch.cat([logits, logits.diagonal()[:, None]], dim=1)
    assert p2["i2t"].item() == pytest.approx(torch.nn.functional.cross_entropy(rows, torch.arange(4)).item(), abs=1e-6)
    # Masking a false negative removes it from both directions: loss drops.
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 1] = True
    masked, p3 = clip_loss(image, text, torch.tensor(1.0), mask=mask)
    assert p3["i2t"] < p0["i2t"] and p3["t2i"] < p0["t2i"]
    # The diagonal is never masked.
    assert clip_loss(image, text, torch.tensor(1.0), mask=torch.eye(4, dtype=torch.bool))[0].item() == pytest.approx(
        base.item(), abs=1e-7
    )


def test_gradient_reaches_logit_scale():
    scale = torch.tensor(1.0, requires_grad=True)
    image, text = torch.eye(3), torch.eye(3) + 0.1
    clip_loss(image, text, scale)[0].backward()
    assert scale.grad is not None and scale.grad.item() < 0  # matched pairs: a sharper softmax lowers the loss


# ----------------------------------------------------------------------------- hard negatives
def test_hard_negatives_differ_in_one_attribute_and_parse():
    world = WorldDataset(seed=5, length=10**6)
    kinds_seen = set()
    for i in range(150):
        scene, text = world.scene_and_caption(i)
        spec = parse_caption(text)
        negatives = hard_negatives(spec, scene, 7, np.random.default_rng([5, i]))
        assert len(set(negatives)) == 7 and text not in negatives
        for neg in negatives:
            variant = parse_caption(neg)  # a valid caption of the grammar
            assert variant.text == neg
            kind = attribute_difference(spec, variant)
            assert kind in ATTRIBUTE_KINDS, (text, neg)
            kinds_seen.add(kind)
            assert not describes(variant, scene), (text, neg)  # false of the image
        assert describes(spec, scene)
    assert kinds_seen == set(ATTRIBUTE_KINDS)


def test_variants_cover_zero_shot_candidates():
    for prompt in held_out_prompts(40):
        spec = parse_caption(prompt)
        variants = {v.text for vs in one_attribute_variants(spec).values() for v in vs}
        candidates = zero_shot_candidates(prompt)
        assert set(candidates[1:]) <= variants
        assert all(attribute_difference(spec, parse_caption(c)) not in (None, "swap") for c in candidates[1:])


def test_swap_and_attribute_difference():
    spec = parse_caption("a large red circle in the top left and a small blue square at the bottom")
    swaps = {v.text for v in one_attribute_variants(spec)["swap"]}
    assert swaps == {
        "a large blue circle in the top left and a small red square at the bottom",
        "a large red square in the top left and a small blue circle at the bottom",
        "a small red circle in the top left and a large blue square at the bottom",
        "a large red circle at the bottom and a small blue square in the top left",
    }
    assert attribute_difference(spec, parse_caption("a red circle and a blue square")) is None
    # Swapping the colours of two circles describes the same scene: never a hard negative.
    two_circles = parse_caption("a red circle and a blue circle")
    scene = scene_from_caption(two_circles, np.random.default_rng(0))
    for neg in hard_negatives(two_circles, scene, 7, np.random.default_rng(1)):
        assert not describes(parse_caption(neg), scene)


# ----------------------------------------------------------------------------- tokenizer, config
def test_tokenizer_has_one_token_per_world_word(tmp_path):
    cfg = tiny_config(tmp_path)
    tok = train_world_tokenizer(cfg)
    assert all(len(tok.encode(w)) == 1 for w in world_words())
    with pytest.raises(TrainConfigError, match="several tokens"):
        train_world_tokenizer(cfg.replace(tokenizer_vocab_size=530))
    trainer = CLIPTrainer(cfg)
    text = trainer.model.config.text_config
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id, text.vocab_size) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.vocab_size
    )
    assert CLIPTokenizer.from_folder(tmp_path / "tokenizer").vocab == tok.vocab


def test_config_validation_and_file_round_trip(tmp_path):
    with pytest.raises(TrainConfigError, match="hard_negatives"):
        CLIPTrainConfig(hard_negatives=8).validate()
    with pytest.raises(TrainConfigError, match="world"):
        CLIPTrainConfig(data="photos/").validate()
    with pytest.raises(TrainConfigError, match="not divisible"):
        CLIPTrainConfig(text_hidden_size=130).validate()
    with pytest.raises(TrainConfigError, match="unknown"):
        CLIPTrainConfig.from_dict({"hard_negative": 3})
    path = tmp_path / "clip.json"
    CLIPTrainConfig(max_steps=7).save(path)
    assert CLIPTrainConfig.from_file(path) == CLIPTrainConfig(max_steps=7)
    cfg = CLIPTrainConfig(lr=1.0, warmup_steps=10, decay_steps=110, min_lr_ratio=0.1)
    assert cfg.lr_at(0) == pytest.approx(0.1) and cfg.lr_at(9) == pytest.approx(1.0)
    assert cfg.lr_at(60) == pytest.approx(0.55) and cfg.lr_at(110) == pytest.approx(0.1)
    assert cfg.lr_at(500) == pytest.approx(0.1)
    assert cfg.replace(decay_steps=0).lr_at(500) == 1.0


def test_cut_texts_encode_like_full_length(tmp_path):
    trainer = CLIPTrainer(tiny_config(tmp_path))
    texts = ["a red circle", "a large blue square in the top left and a small red circle on a black background"]
    short = tokenize_batch(trainer.tokenizer, texts)
    assert short.shape == (2, 2 + 17)  # 17 words, start and end
    with torch.no_grad():
        a = trainer.model.encode_text(short)
        b = trainer.model.encode_text(trainer.tokenizer(texts))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- training runs
def test_smoke_run_writes_everything_and_exports(tmp_path):
    cfg = tiny_config(tmp_path / "run", sample_every=2, ema_decay=0.9)
    result = train_clip(cfg, progress=False)
    out = tmp_path / "run"
    assert result.step == 4 and math.isfinite(result.last["loss"]) and result.last["loss"] > 0
    assert (out / "checkpoint.pt").is_file() and load_checkpoint(out / "checkpoint.pt")["step"] == 4
    with (out / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    assert {"i2t", "t2i", "acc", "hard_acc", "logit_scale", "lr"} <= set(rows[0])
    # Zero-shot evaluation instead of sample grids, at step 2 and at the end.
    assert [p.name for p in result.samples] == ["step_000002.png", "step_000004.png"]
    report = json.loads((out / "samples" / "step_000004.json").read_text())
    assert 0 <= report["accuracy"] <= 1 and report["n"] == 10
    with (out / "zero_shot.csv").open() as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [2, 4]
    # Export: whole CLIP (transformers layout + tokenizer), SD text_encoder/ and tokenizer/.
    assert result.exported == out / "clip"
    clip = load_clip_model(out / "clip")
    text_encoder = load_component(out / "text_encoder")
    assert isinstance(text_encoder, CLIPTextModel)
    tokenizer = CLIPTokenizer.from_folder(out / "tokenizer")
    assert CLIPTokenizer.from_folder(out / "clip").vocab == tokenizer.vocab
    ids = tokenizer(["a small red circle on the left", "a blue square"])
    with torch.no_grad():
        torch.testing.assert_close(text_encoder(ids), clip.text_encoder()(ids))
        assert text_encoder(ids).shape == (2, 77, 32)
    assert 0 <= zero_shot_accuracy(clip, tokenizer, n=4)["accuracy"] <= 1


def test_fine_tuning_with_the_text_tower_frozen(tmp_path):
    first = train_clip(tiny_config(tmp_path / "first", max_steps=2), progress=False)
    tuned = train_clip(tiny_config(tmp_path / "tuned", pretrained=str(first.exported), freeze_text_tower=True,
                                   vision_image_size=64, text_layers=4), progress=False)  # sizes come from the folder
    before, after = load_clip_model(first.exported).state_dict(), load_clip_model(tuned.exported).state_dict()
    assert before.keys() == after.keys()
    text = [k for k in before if k.startswith("text_model.")]
    learned = [k for k in before if not k.startswith("text_model.")]
    assert text and all(torch.equal(before[k], after[k]) for k in text)
    assert all(not torch.equal(before[k], after[k]) for k in ("text_projection.weight", "visual_projection.weight",
                                                               "vision_model.embeddings.patch_embedding.weight"))
    assert learned
    # The SD text encoder a UNet was trained on is the same, and so is the tokenizer.
    ids = CLIPTokenizer.from_folder(tmp_path / "first" / "tokenizer")(["a small red circle on the left"])
    with torch.no_grad():
        assert torch.equal(load_component(tmp_path / "first" / "text_encoder")(ids),
                           load_component(tmp_path / "tuned" / "text_encoder")(ids))
    assert CLIPTokenizer.from_folder(tmp_path / "tuned" / "tokenizer").vocab == \
        CLIPTokenizer.from_folder(tmp_path / "first" / "tokenizer").vocab
    with pytest.raises(CheckpointError, match="no such folder"):
        CLIPTrainer(tiny_config(tmp_path / "bad", pretrained=str(tmp_path / "missing")))


def test_a_fresh_image_tower_on_a_frozen_text_tower(tmp_path):
    """fresh_image_tower: the image tower takes this config's sizes (4 px patches here) and new
    weights; the text tower, its projection's shape and the tokenizer come from the folder, and the
    export is a transformers CLIPModel with the new vision config."""
    transformers = pytest.importorskip("transformers")
    first = train_clip(tiny_config(tmp_path / "first", max_steps=2), progress=False)
    tuned = train_clip(tiny_config(tmp_path / "tuned", pretrained=str(first.exported), freeze_text_tower=True,
                                   fresh_image_tower=True, vision_patch_size=4, vision_hidden_size=24,
                                   vision_intermediate_size=40, max_steps=2), progress=False)
    before, after = load_clip_model(first.exported), load_clip_model(tuned.exported)
    assert after.config.vision_config.patch_size == 4 and after.config.vision_config.hidden_size == 24
    assert after.vision_model.embeddings.patch_embedding.weight.shape == (24, 3, 4, 4)
    assert after.visual_projection.weight.shape == (16, 24)
    text = {k: v for k, v in before.state_dict().items() if k.startswith("text_model.")}
    assert all(torch.equal(v, after.state_dict()[k]) for k, v in text.items())
    hf = transformers.CLIPModel.from_pretrained(tuned.exported).eval()
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf.get_image_features(pixel_values=pixels).pooler_output, after.encode_image(pixels),
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(TrainConfigError, match="fresh_image_tower"):
        tiny_config(tmp_path / "bad", fresh_image_tower=True).validate()


def test_resume_is_bitwise_exact(tmp_path):
    full = train_clip(tiny_config(tmp_path / "full", export=False), progress=False)
    half = tiny_config(tmp_path / "half", export=False, max_steps=2)
    train_clip(half, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # max_steps may change on resume without a warning
        resumed = train_clip(half.replace(max_steps=4), resume=True, progress=False)
    assert resumed.step == full.step == 4
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "half" / "checkpoint.pt")
    assert a["data"] == b["data"]
    for key, value in a["modules"]["clip"].items():
        assert torch.equal(value, b["modules"]["clip"][key]), key
    assert resumed.last == full.last


def test_refuses_a_folder_with_another_tokenizer(tmp_path):
    train_clip_bpe(["a red circle", "a blue square"], vocab_size=600).save(tmp_path / "tokenizer")
    with pytest.raises(TrainConfigError, match="holds a tokenizer other"):
        CLIPTrainer(tiny_config(tmp_path))


def test_length_sorted_text_encoding_matches(tmp_path):
    from latentdiff.eval.zero_shot import encode_text_by_length

    trainer = CLIPTrainer(tiny_config(tmp_path))
    texts = ["a red circle", "a large blue square in the top left and a small red circle on a black background",
             "a small green triangle", "a purple square on a white background", "a red circle at the top"]
    ids = trainer.tokenizer(texts)
    with torch.no_grad():
        torch.testing.assert_close(encode_text_by_length(trainer.model, ids, chunk=2),
                                   trainer.model.encode_text(ids), rtol=1e-5, atol=1e-5)
