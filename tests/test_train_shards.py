"""WebDataset-style tar shards: brace patterns, key grouping, captions, skips, errors, lazy per-process handles."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.train.data import TrainDataError, to_image_tensor
from latentdiff.train.shards import TarShardSource, expand_braces, is_shard_spec


def _png_bytes(seed: int, size: tuple[int, int] = (6, 4)) -> bytes:
    """A small PNG of random pixels (distinct per seed), so exact pixel comparisons mean something."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _expected(png: bytes) -> torch.Tensor:
    return to_image_tensor(Image.open(io.BytesIO(png)))


def _write_tar(path, members: list[tuple[str, bytes | str]], mode: str = "w"):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            raw = data.encode("utf-8") if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def _no_warnings():
    return warnings.catch_warnings(action="error")


# ---------------------------------------------------------------------------- braces
@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("shard.tar", ["shard.tar"]),
        ("shard-{000..003}.tar", ["shard-000.tar", "shard-001.tar", "shard-002.tar", "shard-003.tar"]),
        ("s{8..11}.tar", ["s8.tar", "s9.tar", "s10.tar", "s11.tar"]),
        ("s{08..10}.tar", ["s08.tar", "s09.tar", "s10.tar"]),
        ("{5..5}", ["5"]),
        ("{a,b}/x.tar", ["a/x.tar", "b/x.tar"]),
        ("{a,b}-{0..1}.tar", ["a-0.tar", "a-1.tar", "b-0.tar", "b-1.tar"]),
        ("d/{train,val{1..2}}.tar", ["d/train.tar", "d/val1.tar", "d/val2.tar"]),
        ("{x,}.tar", ["x.tar", ".tar"]),
    ],
)
def test_expand_braces(pattern, expected) -> None:
    assert expand_braces(pattern) == expected


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("shard-{000..009.tar", "never closed"),
        ("shard-000..009}.tar", "without a"),
        ("shard-{009..000}.tar", "reversed"),
        ("shard-{a..f}.tar", "not a range"),
        ("shard-{abc}.tar", "neither a range"),
    ],
)
def test_expand_braces_malformed_names_the_pattern(pattern, why) -> None:
    with pytest.raises(TrainDataError, match=why) as info:
        expand_braces(pattern)
    assert pattern in str(info.value)


def test_is_shard_spec(tmp_path) -> None:
    assert is_shard_spec("data/shard-000.tar")
    assert is_shard_spec("data/shard-{000..009}.tar")
    assert is_shard_spec("data/{train-0.tar,train-1.tar}")
    assert is_shard_spec("data/shards.tar.gz")  # routed to shards, which refuse it with a clear message
    assert not is_shard_spec("world")
    assert not is_shard_spec("data/{a,b}")
    assert not is_shard_spec(str(tmp_path / "nothing-here"))
    tars = tmp_path / "tars"
    _write_tar(tars / "a.tar", [("0.png", _png_bytes(0)), ("0.txt", "x")])
    assert is_shard_spec(str(tars))
    (tars / "sub").mkdir()
    (tars / "sub" / "cover.jpg").write_bytes(_png_bytes(1))  # an image anywhere below: an image folder
    assert not is_shard_spec(str(tars))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not is_shard_spec(str(empty))


# ---------------------------------------------------------------------------- reading
def test_two_shards_in_order_with_exact_pixels(tmp_path) -> None:
    pngs = [_png_bytes(i) for i in range(5)]
    _write_tar(tmp_path / "shard-000.tar", [
        ("b.png", pngs[0]), ("b.txt", "first\n"),
        ("a.png", pngs[1]), ("a.txt", "second"),  # tar order, not name order
        ("dir/a.png", pngs[2]), ("dir/a.txt", "third"),  # same stem in a folder: another key
    ])
    _write_tar(tmp_path / "shard-001.tar", [
        ("0001.txt", "fourth"), ("0001.png", pngs[3]),  # caption before image is fine
        ("0002.png", pngs[4]), ("0002.txt", "fifth"),
    ])
    with _no_warnings():
        source = TarShardSource(str(tmp_path / "shard-{000..001}.tar"))
    assert len(source) == 5 and source.skipped == 0
    assert [source[i][1] for i in range(5)] == ["first", "second", "third", "fourth", "fifth"]
    for i, png in enumerate(pngs):
        image, _ = source[i]
        assert image.dtype == torch.float32 and image.shape == (3, 4, 6)
        assert torch.equal(image, _expected(png)), i
    assert torch.equal(source[-1][0], _expected(pngs[4]))
    with pytest.raises(IndexError):
        source[5]

    reversed_order = TarShardSource([tmp_path / "shard-001.tar", str(tmp_path / "shard-000.tar")])
    assert [reversed_order[i][1] for i in range(5)] == ["fourth", "fifth", "first", "second", "third"]
    folder = TarShardSource(str(tmp_path))  # a folder: its .tar files sorted by name
    assert [folder[i][1] for i in range(5)] == ["first", "second", "third", "fourth", "fifth"]


def test_key_is_up_to_the_first_dot_of_the_basename(tmp_path) -> None:
    png = _png_bytes(7)
    shard = _write_tar(tmp_path / "s.tar", [
        ("v1.2/x.y.png", png), ("v1.2/x.y.txt", "not this key"),  # key "v1.2/x", extension "y.png": no image
        ("v1.2/x.jpg", png), ("v1.2/x.txt", "dotted folder"),
    ])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = TarShardSource(str(shard))
    assert len(source) == 1 and source[0][1] == "dotted folder"
    assert source.samples[0].member == "v1.2/x.jpg"


def test_json_captions_and_txt_precedence(tmp_path) -> None:
    pngs = [_png_bytes(i) for i in range(3)]
    shard = _write_tar(tmp_path / "s.tar", [
        ("a.jpg", pngs[0]), ("a.json", json.dumps({"caption": "from caption", "text": "not text"})),
        ("b.webp", pngs[1]), ("b.json", json.dumps({"text": "from text", "width": 6})),
        ("c.png", pngs[2]), ("c.json", json.dumps({"caption": "json loses"})), ("c.txt", "txt wins"),
    ])
    with _no_warnings():
        source = TarShardSource(str(shard))
    assert [source[i][1] for i in range(3)] == ["from caption", "from text", "txt wins"]
    assert torch.equal(source[0][0], _expected(pngs[0]))  # PIL sniffs the format, whatever the extension


def test_incomplete_samples_are_skipped_counted_and_warned_once(tmp_path) -> None:
    png = _png_bytes(3)
    _write_tar(tmp_path / "a.tar", [
        ("keep.png", png), ("keep.txt", "kept"),
        ("lonely.png", png),  # no caption
        ("orphan.txt", "no image"),  # caption without image
        ("meta.png", png), ("meta.json", json.dumps({"width": 6})),  # json without a caption
    ])
    _write_tar(tmp_path / "b.tar", [("bad.png", png), ("bad.json", "{not json")])
    with pytest.warns(UserWarning) as record:
        source = TarShardSource([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")])
    assert len(record) == 1
    message = str(record[0].message)
    assert "skipped 4" in message and "1 with no image" in message and "2 with no caption" in message
    assert "1 with unreadable caption" in message
    assert source.skipped == 4
    assert source.skipped_reasons == {"no image": 1, "no caption": 2, "unreadable caption": 1}
    assert len(source) == 1 and source[0][1] == "kept"


def test_shards_with_nothing_usable_are_an_error(tmp_path) -> None:
    shard = _write_tar(tmp_path / "s.tar", [("a.txt", "caption only")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TrainDataError, match="no captioned images"):
            TarShardSource(str(shard))


def test_missing_shard_is_named(tmp_path) -> None:
    _write_tar(tmp_path / "shard-0.tar", [("a.png", _png_bytes(0)), ("a.txt", "x")])
    with pytest.raises(TrainDataError, match=r"no such tar shard: .*shard-1\.tar"):
        TarShardSource(str(tmp_path / "shard-{0..1}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainDataError, match=r"empty holds no \.tar files"):
        TarShardSource(str(tmp_path / "empty"))


def test_corrupt_image_names_shard_and_member(tmp_path) -> None:
    good = _png_bytes(1)
    shard = _write_tar(tmp_path / "s.tar", [
        ("ok.png", good), ("ok.txt", "fine"),
        ("broken.png", good[: len(good) // 3]), ("broken.txt", "truncated png"),
    ])
    source = TarShardSource(str(shard))
    assert len(source) == 2  # not skipped at indexing: the caller decides
    assert torch.equal(source[0][0], _expected(good))
    with pytest.raises(TrainDataError) as info:
        source[1]
    assert "broken.png" in str(info.value) and str(shard) in str(info.value)
    assert torch.equal(source[0][0], _expected(good))  # the handle still works afterwards


def test_resolution_resizes_and_crops(tmp_path) -> None:
    shard = _write_tar(tmp_path / "s.tar", [("a.png", _png_bytes(2, size=(12, 8))), ("a.txt", "wide")])
    image, caption = TarShardSource(str(shard), resolution=4)[0]
    assert image.shape == (3, 4, 4) and caption == "wide"
    assert TarShardSource(str(shard))[0][0].shape == (3, 8, 12)


def test_nothing_is_extracted(tmp_path, monkeypatch) -> None:
    shards = tmp_path / "shards"
    _write_tar(shards / "s.tar", [("a.png", _png_bytes(0)), ("a.txt", "x"), ("b.png", _png_bytes(1)), ("b.txt", "y")])
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # a relative extraction would land here
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    source = TarShardSource(str(shards))
    for i in range(len(source)):
        source[i]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_handles_are_reopened_in_a_new_process(tmp_path, monkeypatch) -> None:
    png = _png_bytes(4)
    shard = _write_tar(tmp_path / "s.tar", [("a.png", png), ("a.txt", "x")])
    source = TarShardSource(str(shard))
    source[0]
    parent_file = source._files[0]
    assert source[0] is not None and source._files[0] is parent_file  # one handle per shard, kept

    import latentdiff.train.shards as shards_module

    monkeypatch.setattr(shards_module.os, "getpid", lambda: source._pid + 1)  # as in a forked worker
    image, _ = source[0]
    assert torch.equal(image, _expected(png))
    assert source._files[0] is not parent_file and parent_file.closed

    copy = pickle.loads(pickle.dumps(source))  # e.g. a spawned DataLoader worker
    assert copy._files == {}
    assert torch.equal(copy[0][0], _expected(png)) and copy[0][1] == "x"
    source.close()


@pytest.mark.parametrize("name", ["s.tar.gz", "disguised.tar"])
def test_compressed_shards_are_refused(tmp_path, name) -> None:
    shard = _write_tar(tmp_path / name, [("a.png", _png_bytes(0)), ("a.txt", "x")], mode="w:gz")
    with pytest.raises(TrainDataError, match=r"use uncompressed \.tar shards") as info:
        TarShardSource(str(shard))
    assert name in str(info.value)
