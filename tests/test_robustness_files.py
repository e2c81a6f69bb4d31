"""Bad files are refused with one-line errors that name them: weights, configs, images, output paths."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

import latentdiff
from latentdiff.checkpoints.errors import CheckpointError
from latentdiff.checkpoints.io import read_state_dict, write_safetensors
from latentdiff.errors import BadFile, BadModel
from latentdiff.images import check_output_path, open_image
from latentdiff.loading import load_component
from latentdiff.models.clip import CLIPTextConfig
from latentdiff.models.config import ConfigError
from latentdiff.models.unet import UNetConfig
from latentdiff.models.vae import VAEConfig
from latentdiff.png import save_png

UNET_FILE = "diffusion_pytorch_model.safetensors"


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


@pytest.fixture()
def unet_folder(diffusers_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny pipeline's unet/ folder, to break."""
    return Path(shutil.copytree(diffusers_dir / "unet", tmp_path / "unet"))


def edit_weights(path: Path, key: str, change) -> None:
    tensors = read_state_dict(path)
    tensors[key] = change(tensors[key])
    write_safetensors(tensors, path)


# ---- weights: dtypes and values ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_tensor_in_diffusers_folder(unet_folder: Path, dtype: torch.dtype) -> None:
    edit_weights(unet_folder / UNET_FILE, "conv_in.weight", lambda t: t.to(dtype))
    with pytest.raises(CheckpointError) as err:
        load_component(unet_folder)
    message = one_line(err)
    assert str(unet_folder / UNET_FILE) in message and "'conv_in.weight'" in message
    assert str(dtype).removeprefix("torch.") in message and "floating-point" in message


@pytest.mark.parametrize(("value", "word"), [(math.nan, "NaN"), (math.inf, "inf"), (-math.inf, "inf")])
def test_nonfinite_weights_in_diffusers_folder(unet_folder: Path, value: float, word: str) -> None:
    def poison(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[3] = value
        return t

    edit_weights(unet_folder / UNET_FILE, "conv_out.bias", poison)
    with pytest.raises(CheckpointError) as err:
        load_component(unet_folder)
    message = one_line(err)
    assert str(unet_folder / UNET_FILE) in message and "'conv_out.bias'" in message
    assert f"1 {word}" in message and "finite" in message


def test_weights_that_overflow_the_requested_dtype(unet_folder: Path) -> None:
    edit_weights(unet_folder / UNET_FILE, "conv_out.bias", lambda t: t + 1e6)
    with pytest.raises(CheckpointError, match=r"'conv_out.bias'.*overflow float16") as err:
        load_component(unet_folder, dtype=torch.float16)
    one_line(err)
    assert isinstance(load_component(unet_folder, dtype=torch.float32), torch.nn.Module)


def test_first_bad_tensor_is_named(unet_folder: Path) -> None:
    tensors = read_state_dict(unet_folder / UNET_FILE)
    first, second = list(tensors)[:2]
    tensors[first] = torch.full_like(tensors[first], math.nan)
    tensors[second] = torch.full_like(tensors[second], math.inf)
    write_safetensors(tensors, unet_folder / UNET_FILE)
    bad = next(k for k in read_state_dict(unet_folder / UNET_FILE) if k in (first, second))  # in loading order
    with pytest.raises(CheckpointError, match=re.escape(repr(bad))):
        load_component(unet_folder)


@pytest.fixture(scope="module")
def single_file(diffusers_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("single") / "sd-tiny.safetensors"
    latentdiff.load(diffusers_dir).save(path)
    return path


@pytest.mark.parametrize(
    ("key", "change", "words"),
    [
        ("model.diffusion_model.out.2.weight", lambda t: t.to(torch.int64), ["int64", "floating-point"]),
        ("first_stage_model.decoder.conv_out.bias", lambda t: t.to(torch.bool), ["bool", "floating-point"]),
        ("cond_stage_model.transformer.text_model.final_layer_norm.weight",
         lambda t: torch.full_like(t, math.nan), ["NaN", "finite"]),
        ("first_stage_model.decoder.mid.attn_1.q.weight",  # reshaped on conversion: traced through the view
         lambda t: torch.full_like(t, math.inf), ["inf", "finite"]),
    ],
)
def test_bad_tensor_in_single_file(single_file: Path, diffusers_dir: Path, tmp_path: Path, key, change, words) -> None:
    path = tmp_path / single_file.name
    shutil.copy(single_file, path)
    edit_weights(path, key, change)
    with pytest.raises(CheckpointError) as err:
        latentdiff.load(path, tokenizer=diffusers_dir / "tokenizer")
    message = one_line(err)
    assert path.name in message and repr(key) in message, message
    assert all(word in message for word in words), message


def test_bad_tensor_in_lone_vae_file(single_file: Path, tmp_path: Path) -> None:
    vae = {k: v for k, v in read_state_dict(single_file).items() if k.startswith("first_stage_model.")}
    vae["first_stage_model.encoder.conv_in.weight"] = vae["first_stage_model.encoder.conv_in.weight"].to(torch.int32)
    write_safetensors(vae, tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match=r"vae.safetensors.*'first_stage_model.encoder.conv_in.weight'.*int32"):
        load_component(tmp_path / "vae.safetensors")


# ---- configs: field types ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "field", "value", "expected"),
    [
        (UNetConfig, "block_out_channels", "abc", "list of integers"),
        (UNetConfig, "block_out_channels", [32, "64"], "list of integers"),
        (UNetConfig, "in_channels", "4", "an integer"),
        (UNetConfig, "in_channels", 4.0, "an integer"),
        (UNetConfig, "in_channels", True, "an integer"),
        (UNetConfig, "in_channels", -4, "positive"),
        (UNetConfig, "layers_per_block", None, "an integer"),
        (UNetConfig, "norm_eps", "tiny", "number"),
        (UNetConfig, "sample_size", [8, 8, 8], "a list of 2 integers"),
        (UNetConfig, "use_linear_projection", 1, "true or false"),
        (VAEConfig, "latent_channels", 4.5, "an integer"),
        (VAEConfig, "block_out_channels", [32, -64], "positive"),
        (VAEConfig, "scaling_factor", "0.18", "number"),
        (CLIPTextConfig, "hidden_size", [128], "an integer"),
        (CLIPTextConfig, "hidden_act", 3, "a string"),
        (CLIPTextConfig, "num_hidden_layers", 0, "positive"),
    ],
)
def test_bad_config_field_names_field_and_file(tmp_path: Path, cls, field, value, expected) -> None:
    data = cls.tiny().to_dict()
    data[field] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as err:
        cls.load(path)
    message = one_line(err)
    assert str(path) in message and field in message and expected in message, message
    assert isinstance(err.value, BadModel)


def test_bad_config_in_component_folder_names_the_file(unet_folder: Path) -> None:
    config = json.loads((unet_folder / "config.json").read_text())
    config["block_out_channels"] = "abc"
    (unet_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=re.escape(f"{unet_folder / 'config.json'}: UNetConfig.block_out_channels")):
        load_component(unet_folder)


@pytest.mark.parametrize(
    ("text", "words"),
    [("[1, 2]", "not hold a JSON object"), ("[" * 100_000, "corrupt JSON"),
     ('{"in_channels": ' + "9" * 5000 + "}", "corrupt JSON"), (b"\xff\xfe{}", "not UTF-8")],
)
def test_unreadable_config_json(tmp_path: Path, text, words: str) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=words) as err:
        UNetConfig.load(path)
    assert str(path) in one_line(err)
    with pytest.raises(ConfigError, match="folder"):
        UNetConfig.load(tmp_path)


# ---- image files ---------------------------------------------------------------------------------------------


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming ``width`` x ``height`` RGB, one tiny IDAT, IEND: ~70 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(("width", "height"), [(20000, 20000), (5000, 5000)])
def test_oversize_png_refused_before_decoding(tmp_path: Path, width: int, height: int) -> None:
    path = tmp_path / "huge.png"
    path.write_bytes(png_header_only(width, height))
    assert path.stat().st_size < 200
    Image.new("RGB", (1, 1)).save(tmp_path / "warm.png")
    open_image(tmp_path / "warm.png", max_pixels=1)  # PIL imports its plugins once: not part of the measure
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(BadFile) as err:
            open_image(path, what="init image", max_pixels=4096 * 4096)
    finally:
        took = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    message = one_line(err)
    assert str(path) in message and "init image" in message
    assert str(width * height) in message and str(4096 * 4096) in message, message
    assert took < 1.0 and peak < 1 << 20, (took, peak)  # a decoded 5000x5000 RGB image would be 75 MB


def test_decompression_bomb_refused_even_within_the_budget(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(10000, 10000))  # over PIL's own warning limit (~89 M pixels)
    with pytest.raises(BadFile, match="decompression bomb") as err:
        open_image(path, max_pixels=10**12)
    assert str(path) in one_line(err)
    path.write_bytes(png_header_only(20000, 20000))  # over PIL's error limit
    with pytest.raises(BadFile, match="decompression bomb"):
        open_image(path, max_pixels=10**12)


def test_truncated_png(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3)).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BadFile, match="truncated or corrupt") as err:
        open_image(path, max_pixels=1 << 20)
    assert str(path) in one_line(err)


def test_not_an_image_missing_and_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(BadFile, match=r"notes.png is not an image"):
        open_image(tmp_path / "notes.png", max_pixels=1 << 20)
    with pytest.raises(BadFile, match=r"nowhere.png does not exist"):
        open_image(tmp_path / "nowhere.png", max_pixels=1 << 20)
    with pytest.raises(BadFile, match="is a directory") as err:
        open_image(tmp_path, what="mask", max_pixels=1 << 20)
    assert f"mask {tmp_path}" in one_line(err)


@pytest.mark.parametrize(
    ("mode", "expected"), [("RGB", "RGB"), ("L", "L"), ("RGBA", "RGB"), ("P", "RGB"), ("LA", "L"), ("I;16", "L")]
)
def test_images_come_back_loaded_as_rgb_or_l(tmp_path: Path, mode: str, expected: str) -> None:
    path = tmp_path / "in.png"
    Image.new(mode, (6, 4)).save(path)
    image = open_image(path, max_pixels=24)
    assert image.mode == expected and image.size == (6, 4)
    path.unlink()  # fully loaded: the file is no longer needed
    image.tobytes()


def test_sixteen_bit_grey_is_scaled(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    Image.new("I;16", (2, 2), 65535).save(path)
    assert open_image(path, max_pixels=4).getpixel((0, 0)) == 255


# ---- output paths and file modes -----------------------------------------------------------------------------


def test_output_path_checks(tmp_path: Path) -> None:
    assert check_output_path(tmp_path / "out.png") == tmp_path / "out.png"
    (tmp_path / "old.png").write_bytes(b"x")
    assert check_output_path(tmp_path / "old.png") == tmp_path / "old.png"
    with pytest.raises(BadFile, match="is a directory") as err:
        check_output_path(tmp_path)
    assert str(tmp_path) in one_line(err)
    with pytest.raises(BadFile, match="does not exist") as err:
        check_output_path(tmp_path / "missing" / "out.png")
    assert "missing" in one_line(err)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(BadFile, match="is not a folder"):
        check_output_path(tmp_path / "file" / "out.png")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_output_path_refuses_special_files() -> None:
    with pytest.raises(BadFile, match="not a regular file") as err:
        check_output_path("/dev/full")
    assert "/dev/full" in one_line(err)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_output_path_refuses_unwritable_folder(tmp_path: Path) -> None:
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(BadFile, match="not writable") as err:
            check_output_path(folder / "out.png")
        assert str(folder) in one_line(err)
    finally:
        folder.chmod(stat.S_IRWXU)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        write_safetensors({"x": torch.zeros(2)}, tmp_path / "w.safetensors")
        save_png(Image.new("RGB", (2, 2)), tmp_path / "out.png", parameters="a cat")
        UNetConfig.tiny().save(tmp_path / "config.json")
    finally:
        os.umask(old)
    for name in ("w.safetensors", "out.png", "config.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary file left behind"

