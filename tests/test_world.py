"""Shapes World: renderer, captions, judge, dataset agree with each other and with the spec."""

from __future__ import annotations

import hashlib
import itertools
from collections import deque

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff import world as W
from latentdiff.world.judge import classify_pixels, label_components
from latentdiff.world.spec import (
    MIN_OBJECT_AREA,
    SQUARE_MIN_FILL,
    TRIANGLE_MAX_FILL,
    allowed_jitter,
    cell_centre,
)

HELD_OUT_DIGEST = "4c6763c60f80eb3a4e40a83e0a8ceb1500eb53161c59de2c77864f71d7d0c0cc"


def obj(colour="red", shape="circle", size="large", cell=(1, 1), jitter=(0, 0)) -> W.WorldObject:
    return W.WorldObject(colour, shape, size, cell, jitter)


def spec_fields(spec: W.CaptionSpec) -> list:
    return [getattr(o, f) for o in spec.objects for f in ("colour", "shape", "size", "cell")] + [spec.background]


# ------------------------------------------------------------------------------ spec, render


def test_constants_match_spec():
    assert W.CANVAS == 64 and len(W.OBJECT_COLOURS) == 6 and len(W.BACKGROUND_COLOURS) == 3
    assert W.SIZES == {"small": 10, "large": 20}
    assert [cell_centre((k, k)) for k in range(3)] == [(11, 11), (32, 32), (53, 53)]
    assert W.CELL_PHRASES[(1, 1)] == "in the center" and W.CELL_PHRASES[(2, 1)] == "at the bottom"
    assert allowed_jitter("small", (0, 0)) == (range(-2, 3), range(-2, 3))
    assert allowed_jitter("large", (0, 2)) == (range(-2, 2), range(-1, 3))


def test_render_pixels():
    scene = W.Scene((obj("blue", "square", "small", (2, 0), (1, -2)),), "gray")
    image = W.render(scene)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    x0, y0, x1, y1 = scene.objects[0].box
    assert (x0, y0, x1, y1) == (11 + 1 - 5, 53 - 2 - 5, 11 + 1 + 5, 53 - 2 + 5)
    assert (image[y0:y1, x0:x1] == W.PALETTE["blue"]).all()
    assert (image == W.PALETTE["blue"]).all(axis=2).sum() == 100
    assert (image == W.PALETTE["gray"]).all(axis=2).sum() == 64 * 64 - 100
    # Only palette colours, no anti-aliasing.
    rng = np.random.default_rng(5)
    palette = {tuple(c) for c in W.PALETTE.values()}
    for _ in range(20):
        colours = {tuple(c) for c in W.render(W.sample_scene(rng)).reshape(-1, 3)}
        assert colours <= palette


def test_shape_masks_geometry():
    tri = W.shape_mask("triangle", 10)
    assert tri.sum(axis=1).tolist() == [2, 2, 4, 4, 6, 6, 8, 8, 10, 10]
    assert (tri == tri[:, ::-1]).all()
    disc = W.shape_mask("circle", 20)
    assert disc.any(axis=0).all() and disc.any(axis=1).all()  # touches all four box sides
    assert (disc == disc.T).all() and (disc == disc[::-1]).all()
    with pytest.raises(ValueError, match="shape"):
        W.shape_mask("hexagon", 10)


@pytest.mark.parametrize("shape", W.SHAPES)
@pytest.mark.parametrize("size", list(W.SIZES))
def test_fill_ratio_bands_every_cell_and_jitter(shape, size):
    for cell in W.CELLS:
        xs, ys = allowed_jitter(size, cell)
        for jitter in itertools.product(xs, ys):
            o = obj("orange", shape, size, cell, jitter)
            found = W.read_objects(W.render(W.Scene((o,), "black")))
            assert len(found) == 1
            d = found[0]
            assert d.bbox == o.box, (o, d)
            if shape == "square":
                assert d.fill > SQUARE_MIN_FILL
            elif shape == "circle":
                assert TRIANGLE_MAX_FILL <= d.fill <= SQUARE_MIN_FILL
            else:
                assert d.fill < TRIANGLE_MAX_FILL
            assert (d.colour, d.shape, d.size, d.cell) == ("orange", shape, size, cell)
    fills = {("circle", "small"): 0.80, ("circle", "large"): 0.79, ("square", "small"): 1.0,
             ("square", "large"): 1.0, ("triangle", "small"): 0.60, ("triangle", "large"): 0.55}
    assert W.shape_mask(shape, W.SIZES[size]).mean() == pytest.approx(fills[shape, size])


def test_scene_validation():
    with pytest.raises(ValueError, match="colour"):
        obj(colour="pink")
    with pytest.raises(ValueError, match="shape"):
        obj(shape="star")
    with pytest.raises(ValueError, match="size"):
        obj(size="huge")
    with pytest.raises(ValueError, match="cell"):
        obj(cell=(3, 0))
    with pytest.raises(ValueError, match="jitter"):
        obj(jitter=(3, 0))
    with pytest.raises(ValueError, match="jitter"):
        obj(size="large", cell=(0, 0), jitter=(-2, 0))  # box would leave the canvas
    obj(size="large", cell=(0, 0), jitter=(-1, -1))
    with pytest.raises(ValueError, match="1 to 2 objects"):
        W.Scene((), "white")
    with pytest.raises(ValueError, match="1 to 2 objects"):
        W.Scene((obj(cell=(0, 0)), obj("blue", cell=(0, 1)), obj("green", cell=(0, 2))), "white")
    with pytest.raises(ValueError, match="background"):
        W.Scene((obj(),), "red")
    with pytest.raises(ValueError, match="share cell"):
        W.Scene((obj(), obj("blue")), "white")
    with pytest.raises(ValueError, match="both red circles"):
        W.Scene((obj(cell=(0, 0)), obj(cell=(2, 2))), "white")
    with pytest.raises(ValueError, match="touch or overlap"):
        W.Scene((obj(cell=(1, 0), jitter=(2, 0)), obj("blue", cell=(1, 1), jitter=(-2, 0))), "white")
    W.Scene((obj(cell=(1, 0)), obj("blue", cell=(1, 1))), "white")  # one pixel apart: fine
    with pytest.raises(TypeError):
        W.render("a red circle")


# --------------------------------------------------------------------------------- captions


def test_caption_examples_from_spec():
    scene = W.Scene((obj("red", "circle", "large", (0, 0)),), "white")
    assert W.caption(scene) == "a large red circle in the top left on a white background"
    two = W.Scene((obj("blue", "square", "small", (1, 1)), obj("yellow", "triangle", "large", (2, 1))), "black")
    assert W.caption(two) == (
        "a small blue square in the center and a large yellow triangle at the bottom on a black background"
    )
    assert W.caption(two, show_size=False, show_position=[True, False], show_background=False) == (
        "a blue square in the center and a yellow triangle"
    )
    assert W.caption(W.Scene((obj("orange"),), "gray"), False, False, False) == "a orange circle"


def test_parse_round_trips_every_flag_combination():
    rng = np.random.default_rng(1)
    for _ in range(150):
        scene = W.sample_scene(rng)
        n = len(scene.objects)
        for flags in itertools.product([True, False], repeat=2 * n + 1):
            spec = W.caption_spec(scene, list(flags[0:2 * n:2]), list(flags[1:2 * n:2]), flags[-1])
            parsed = W.parse_caption(spec.text)
            assert parsed == spec and parsed.text == spec.text
            assert parsed.describes(scene)
            assert parsed.is_full == all(flags)


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    (" a red circle", "single spaces"),
    ("a red  circle", "single spaces"),
    ("a red circle ", "single spaces"),
    ("A red circle", "lower case"),
    ("an orange circle", "always uses 'a'"),
    ("the red circle", "'a' at word 1"),
    ("a huge red circle", "size or an object colour"),
    ("a white circle", "object colour"),
    ("a red", "shape"),
    ("a red circles", "shape"),
    ("a red circle in the top", "position phrase"),
    ("a red circle on the left on the right", "'and a'"),
    ("a red circle and", "'a' at word 5"),
    ("a red circle and a blue square and a green triangle", "at most 2 objects"),
    ("a red circle and a red circle", "both red circles"),
    ("a red circle on the left and a blue square on the left", "never shares a cell"),
    ("a red circle on a red background", "background colour"),
    ("a red circle on a white", "'background'"),
    ("a red circle on a white background now", "end of the caption"),
    ("a red circle, on a white background", "shape"),
])
def test_parse_rejects_with_reason(text, message):
    with pytest.raises(ValueError, match=message):
        W.parse_caption(text)


def test_parse_rejects_non_strings():
    with pytest.raises(TypeError):
        W.parse_caption(None)


def test_sample_caption_mix():
    rng = np.random.default_rng(2)
    full = 0
    for _ in range(2000):
        scene = W.sample_scene(rng)
        spec = W.parse_caption(W.sample_caption(scene, rng))
        assert spec.describes(scene)
        full += spec.is_full
    assert 0.45 < full / 2000 < 0.55


def test_sample_scene_covers_the_world():
    rng = np.random.default_rng(3)
    scenes = [W.sample_scene(rng) for _ in range(3000)]
    counts = [len(s.objects) for s in scenes]
    assert 0.45 < counts.count(1) / len(counts) < 0.55
    objects = [o for s in scenes for o in s.objects]
    assert {o.colour for o in objects} == set(W.OBJECT_COLOURS)
    assert {o.shape for o in objects} == set(W.SHAPES) and {o.size for o in objects} == set(W.SIZES)
    assert {o.cell for o in objects} == set(W.CELLS) and {s.background for s in scenes} == set(W.BACKGROUND_COLOURS)
    assert {o.jitter for o in objects} == set(itertools.product(range(-2, 3), repeat=2))


def test_scene_from_caption_fills_unnamed_attributes():
    rng = np.random.default_rng(4)
    texts = W.held_out_prompts(40) + ["a red circle", "a blue square at the top and a large green circle",
                                      "a small red circle and a red square on a gray background"]
    for text in texts:
        for _ in range(5):
            scene = W.scene_from_caption(text, rng)
            spec = W.parse_caption(text)
            assert spec.describes(scene)
            assert W.judge(W.render(scene), spec).correct
    sizes = {W.scene_from_caption("a red circle", rng).objects[0].size for _ in range(50)}
    assert sizes == set(W.SIZES)


# ------------------------------------------------------------------------------------ judge


def test_every_rendered_caption_is_judged_correct():
    rng = np.random.default_rng(0)
    judgements = []
    for _ in range(1500):
        scene = W.sample_scene(rng)
        image = W.render(scene)
        for text in (W.caption(scene), W.sample_caption(scene, rng)):
            j = W.judge(image, text)
            assert j.correct, (text, scene, j)
            assert all(v in (True, None) for v in j.attributes().values())
            judgements.append(j)
    report = W.accuracy_report(judgements)
    assert report["caption"] == 1.0 and report["n"] == 3000
    assert all(report[a] == 1.0 for a in W.ATTRIBUTES)
    assert report["n_colour"] == 3000 and 1500 < report["n_size"] < 3000


BASE = W.Scene((obj("red", "circle", "large", (1, 0)), obj("blue", "square", "small", (0, 2))), "white")
BASE_TEXT = W.caption(BASE)


@pytest.mark.parametrize("wrong, scene", [
    ("colour", W.Scene((obj("green", "circle", "large", (1, 0)), BASE.objects[1]), "white")),
    ("shape", W.Scene((BASE.objects[0], obj("blue", "triangle", "small", (0, 2))), "white")),
    ("size", W.Scene((obj("red", "circle", "small", (1, 0)), BASE.objects[1]), "white")),
    ("position", W.Scene((obj("red", "circle", "large", (2, 1)), BASE.objects[1]), "white")),
    ("background", W.Scene(BASE.objects, "black")),
    ("count", BASE),
])
def test_one_wrong_attribute(wrong, scene):
    if wrong == "count":  # a third object: draw it onto the image directly (a Scene holds at most 2)
        image = W.render(scene)
        extra = W.render(W.Scene((obj("yellow", "triangle", "small", (2, 2)),), "white"))
        third = (extra != W.PALETTE["white"]).any(axis=2)
        image[third] = extra[third]
    else:
        image = W.render(scene)
    j = W.judge(image, BASE_TEXT)
    assert not j.correct
    for attribute, verdict in j.attributes().items():
        assert verdict == (attribute != wrong), (attribute, j)


def test_missing_object_fails_count_and_its_attributes():
    image = W.render(W.Scene(BASE.objects[:1], "white"))
    j = W.judge(image, BASE_TEXT)
    assert (j.count, j.colour, j.shape, j.size, j.position, j.background) == (False, False, False, False, False, True)
    assert not j.correct
    # The same image with a caption naming one object is right.
    assert W.judge(image, W.caption(W.Scene(BASE.objects[:1], "white"))).correct


def test_swapped_objects_are_matched_by_colour_and_shape():
    image = W.render(BASE)
    other_order = "a small blue square in the top right and a large red circle on the left on a white background"
    assert W.judge(image, other_order).correct
    swapped = W.render(W.Scene((obj("blue", "circle", "large", (1, 0)), obj("red", "square", "small", (0, 2))), "white"))
    j = W.judge(swapped, BASE_TEXT)
    assert not j.correct and j.count and j.background
    assert j.colour is False or j.shape is False


def test_unnamed_attributes_are_none():
    image = W.render(BASE)
    j = W.judge(image, "a red circle and a blue square")
    assert j.correct and (j.size, j.position, j.background) == (None, None, None)
    j = W.judge(image, "a small red circle and a blue square on the left")
    assert (j.size, j.position, j.correct) == (False, False, False)


def test_read_objects_and_noise():
    image = W.render(BASE)
    found = W.read_objects(image)
    assert [(d.colour, d.shape, d.size, d.cell) for d in found] == [
        ("blue", "square", "small", (0, 2)), ("red", "circle", "large", (1, 0))]  # raster order
    assert found[0].area == 100 and found[0].bbox == BASE.objects[1].box
    # Specks under 25 px are ignored; a colour that fills the canvas is background, not an object.
    noisy = image.copy()
    noisy[60:64, 0:6] = W.PALETTE["green"]  # 24 px
    assert W.read_objects(noisy) == found
    noisy[59, 0] = W.PALETTE["green"]  # 25 px: now an object
    assert len(W.read_objects(noisy)) == 3
    red = np.zeros((64, 64, 3), np.uint8) + np.array(W.PALETTE["red"], np.uint8)
    assert W.read_image(red).background == "red" and W.read_objects(red) == []
    assert not W.judge(red, "a large red square in the center").correct
    # Near-palette colours classify to the nearest one.
    shifted = np.clip(image.astype(int) + 12, 0, 255).astype(np.uint8)
    assert W.judge(shifted, BASE_TEXT).correct
    assert MIN_OBJECT_AREA == 25


def _bfs_components(classes: np.ndarray, fg: np.ndarray) -> np.ndarray:
    h, w = classes.shape
    out = np.full((h, w), -1)
    for start in range(h * w):
        y, x = divmod(start, w)
        if not fg[y, x] or out[y, x] >= 0:
            continue
        out[y, x] = start
        queue = deque([(y, x)])
        while queue:
            cy, cx = queue.popleft()
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < h and 0 <= nx < w and fg[ny, nx] and out[ny, nx] < 0 and classes[ny, nx] == classes[cy, cx]:
                    out[ny, nx] = start
                    queue.append((ny, nx))
    return out


def test_label_components_matches_bfs():
    rng = np.random.default_rng(6)
    for k in range(30):
        classes = rng.integers(0, 2 + k % 4, size=(24, 24))
        fg = rng.random((24, 24)) < 0.8
        np.testing.assert_array_equal(label_components(classes, fg), _bfs_components(classes, fg))
    spiral = np.zeros((21, 21), bool)  # long snake: many hook/compress rounds
    spiral[::2, :] = True
    spiral[1::4, -1] = True
    spiral[3::4, 0] = True
    classes = np.zeros((21, 21), int)
    np.testing.assert_array_equal(label_components(classes, spiral), _bfs_components(classes, spiral))


def test_judge_inputs():
    image = W.render(BASE)
    assert W.judge(Image.fromarray(image), BASE_TEXT).correct
    assert W.judge(image, W.parse_caption(BASE_TEXT)).correct
    with pytest.raises(ValueError, match="32x32"):
        W.judge(image[:32, :32], BASE_TEXT)
    with pytest.raises(ValueError, match="128x64"):
        W.judge(Image.new("RGB", (128, 64)), BASE_TEXT)
    with pytest.raises(ValueError, match="dtype"):
        W.judge(image.astype(np.float32), BASE_TEXT)
    with pytest.raises(ValueError, match="shape"):
        W.judge(image[:, :, 0], BASE_TEXT)
    with pytest.raises(ValueError, match="shape"):
        W.judge(image, "a red shape")
    with pytest.raises(TypeError):
        W.judge(image.tolist(), BASE_TEXT)
    rgba = Image.fromarray(image).convert("RGBA")
    assert W.judge(rgba, BASE_TEXT).correct
    assert (classify_pixels(image) < len(W.PALETTE)).all()


def test_accuracy_report():
    image = W.render(BASE)
    js = [W.judge(image, BASE_TEXT), W.judge(image, "a red circle and a blue square on a black background"),
          W.judge(image, "a red circle")]
    r = W.accuracy_report(js)
    assert r["n"] == 3 and r["caption"] == pytest.approx(1 / 3)
    assert r["background"] == 0.5 and r["n_background"] == 2
    assert r["count"] == pytest.approx(2 / 3) and r["size"] == 1.0 and r["n_size"] == 1
    empty = W.accuracy_report([])
    assert empty["n"] == 0 and empty["caption"] is None and empty["colour"] is None


# ---------------------------------------------------------------------------------- dataset


def test_dataset_deterministic():
    a, b = W.WorldDataset(7, 50), W.WorldDataset(7, 1000)
    for i in (0, 3, 49):
        x, y = a[i], b[i]
        assert x.caption == y.caption and x.scene == y.scene and np.array_equal(x.image, y.image)
    assert a[-1].caption == a[49].caption
    c = W.WorldDataset(8, 50)
    assert [a[i].caption for i in range(50)] != [c[i].caption for i in range(50)]
    assert len({a[i].caption for i in range(50)}) > 40
    full = W.WorldDataset(7, 50, partial_captions=False)
    assert all(W.parse_caption(full[i].caption).is_full for i in range(50))
    for i in range(50):
        assert W.parse_caption(a[i].caption).describes(a[i].scene)
        assert np.array_equal(a[i].image, W.render(a[i].scene))
    with pytest.raises(IndexError):
        a[50]
    with pytest.raises(ValueError):
        W.WorldDataset(-1, 10)


def test_dataset_tensors():
    ds = W.WorldDataset(0, 8, as_tensor=True)
    item = ds[2]
    assert item.image.shape == (3, 64, 64) and item.image.dtype == torch.float32
    assert item.image.min() >= -1 and item.image.max() <= 1
    assert np.array_equal(W.tensor_to_image(item.image), ds.sample(2).image)
    images, captions = ds.batch([0, 1, 2])
    assert images.shape == (3, 3, 64, 64) and captions == [ds[i].caption for i in range(3)]
    loader = torch.utils.data.DataLoader(W.WorldDataset(0, 8), batch_size=4, collate_fn=W.collate)
    first, texts = next(iter(loader))
    assert torch.equal(first, ds.batch(range(4))[0]) and len(texts) == 4
    assert W.judge(W.tensor_to_image(item.image), item.caption).correct


def test_held_out_prompts_fixed_and_full():
    prompts = W.held_out_prompts()
    assert hashlib.sha256("\n".join(prompts).encode()).hexdigest() == HELD_OUT_DIGEST
    singles, doubles = W.held_out_prompts(num_objects=1), W.held_out_prompts(num_objects=2)
    assert len(singles) == 200 and len(doubles) == 200 and len(set(prompts)) == 400
    assert prompts[:4] == [singles[0], doubles[0], singles[1], doubles[1]]
    assert W.held_out_prompts(10) == prompts[:10]
    specs = [W.parse_caption(p) for p in prompts]
    assert all(s.is_full for s in specs)
    assert all(len(s.objects) == 1 for s in map(W.parse_caption, singles))
    assert all(len(s.objects) == 2 for s in map(W.parse_caption, doubles))
    keys = {(frozenset((o.colour, o.shape, o.size, o.cell) for o in s.objects), s.background) for s in specs}
    assert len(keys) == 400  # no prompt is another with its objects swapped
    with pytest.raises(ValueError):
        W.held_out_prompts(num_objects=3)
    with pytest.raises(ValueError):
        W.held_out_prompts(401)


def test_training_never_shows_held_out_prompts():
    held = set(W.held_out_prompts())
    ds = W.WorldDataset(123, 20_000)
    partial = 0
    for i in range(len(ds)):
        scene, text = ds.scene_and_caption(i)
        assert text not in held
        assert not W.is_held_out(scene)
        assert W.caption(W.Scene(scene.objects[::-1], scene.background)) not in held
        partial += text != W.caption(scene)
    assert partial > 5000
    # The sampler does meet held-out scenes and redraws them.
    rng = np.random.default_rng(0)
    assert any(W.is_held_out(W.sample_scene(rng)) for _ in range(5000))


def test_zero_shot_candidates():
    prompts = W.held_out_prompts()
    for text in prompts[:100] + ["a large red circle", "a red circle on the left and a blue square on a gray background"]:
        cands = W.zero_shot_candidates(text)
        assert len(cands) == 9 and cands[0] == text and len(set(cands)) == 9
        assert cands == W.zero_shot_candidates(text)
        base = spec_fields(W.parse_caption(text))
        for variant in cands[1:]:
            fields = spec_fields(W.parse_caption(variant))
            assert len(fields) == len(base)
            assert sum(a != b for a, b in zip(fields, base)) == 1, (text, variant)
    base = spec_fields(W.parse_caption(prompts[0]))  # one object: colour, shape, size, cell, background
    kinds = set()
    for variant in W.zero_shot_candidates(prompts[0])[1:]:
        kinds |= {i for i, (a, b) in enumerate(zip(spec_fields(W.parse_caption(variant)), base)) if a != b}
    assert kinds == {0, 1, 2, 3, 4}  # every attribute kind is represented
    with pytest.raises(ValueError, match="too few attributes"):
        W.zero_shot_candidates("a red circle")
    with pytest.raises(ValueError):
        W.zero_shot_candidates("a red blob")
