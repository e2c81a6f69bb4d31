"""Property tests: parsers of user input raise only latentdiff's clean errors, whatever the input.

Targets: the A1111 prompt parser, the safetensors header reader (and the whole
``read_state_dict`` behind it), pickle checkpoints, model configs and image files. Each ``check_*`` function
is one execution of a target; ``scripts/fuzz.py`` runs the same checks for longer.
Budgets are small (the whole file runs in seconds); ``deadline=None`` because the
machine may be shared.
"""

from __future__ import annotations

import io
import json
import math
import re
import struct
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from latentdiff.checkpoints.errors import CheckpointError
from latentdiff.checkpoints.io import read_safetensors_header, read_state_dict
from latentdiff.errors import BadFile, UserError
from latentdiff.images import open_image
from latentdiff.models.clip import CLIPTextConfig
from latentdiff.models.clip_model import CLIPConfig, CLIPVisionConfig
from latentdiff.models.config import ConfigError, ModelConfig
from latentdiff.models.unet import _FIXED_KEYS, UNetConfig
from latentdiff.models.vae import VAEConfig
from latentdiff.prompts import parse_weighted_prompt

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PER_KIND = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SYNTAX = re.compile(r"([()\[\]\\])")


# ---- prompt parser -------------------------------------------------------------------------------------------


def check_prompt(text: str) -> str:
    """One execution: the parser returns finite (text, weight) fragments or raises a UserError."""
    try:
        fragments = parse_weighted_prompt(text)
    except UserError as err:
        assert "\n" not in str(err)
        return "refused"
    assert fragments, "at least one fragment, even for an empty prompt"
    for fragment, weight in fragments:
        assert isinstance(fragment, str) and isinstance(weight, float)
        assert math.isfinite(weight), (fragment, weight)
    return "parsed"


def check_plain_prompt(text: str) -> None:
    """Text with its brackets and backslashes escaped parses back to itself, at weight 1."""
    fragments = parse_weighted_prompt(SYNTAX.sub(r"\\\1", text))
    assert "".join(t for t, _ in fragments) == text
    assert all(w == 1.0 for _, w in fragments)
    if not SYNTAX.search(text):
        assert parse_weighted_prompt(text) == [(text, 1.0)]


PROMPT_CHARS = st.sampled_from(list("()[]\\:.0123456789+- \tab,é"))
prompt_syntax = st.text(alphabet=PROMPT_CHARS, max_size=80)
long_weights = st.builds(  # weights written with hundreds of digits, nested: products overflow
    lambda digits, depth, inner: "(" * depth + inner + "".join(f":{'9' * digits})" for _ in range(depth)),
    st.integers(1, 400), st.integers(1, 3), st.text(max_size=5),
)


@FAST
@given(st.one_of(st.text(max_size=200), prompt_syntax, long_weights))
def test_prompt_parser_raises_only_clean_errors(text: str) -> None:
    check_prompt(text)


@FAST
@given(st.text(max_size=200))
def test_plain_prompt_round_trips(text: str) -> None:
    check_plain_prompt(text)


def test_overflowing_prompt_weight_is_a_clean_error() -> None:
    from latentdiff.errors import BadArgument

    with pytest.raises(BadArgument, match="weight"):
        parse_weighted_prompt("a (cat:" + "9" * 400 + ")")
    with pytest.raises(BadArgument, match="weight"):
        parse_weighted_prompt("((cat:0):" + "9" * 400 + ")")


# ---- safetensors header ----------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool, torch.float64]


@st.composite
def tensor_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    """A few small tensors of assorted dtypes and shapes (scalars and empty tensors too)."""
    tensors = {}
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        tensors[f"t{i}"] = torch.arange(math.prod(shape)).reshape(shape).to(dtype)
    return tensors


json_junk = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
huge_ints = st.sampled_from([0, 1, 7, 8, 2**31, 2**32 + 1, 2**63 - 1, 2**63, 2**64 - 1, 10**30, -1])


def split_file(raw: bytes) -> tuple[dict[str, Any], bytes]:
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def join_file(header: Any, data: bytes, length: int | None = None, blob: bytes | None = None) -> bytes:
    blob = json.dumps(header).encode() if blob is None else blob
    size = len(blob) if length is None else length
    return struct.pack("<Q", size % 2**64) + blob + data


SAFETENSORS_KINDS = ["bytes", "valid", "truncated", "length", "offsets", "dtype", "shape", "empty",
                     "overlap", "junk", "metadata", "not-json", "deep", "padding"]


@st.composite
def safetensors_files(draw: st.DrawFn, kind: str) -> bytes:
    """Arbitrary bytes, valid files, truncated files and valid files with one header mutation (``kind``)."""
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    raw = safetensors.torch.save(draw(tensor_dicts()), metadata=draw(st.none() | st.just({"format": "pt"})))
    header, data = split_file(raw)
    names = [k for k in header if k != "__metadata__"]
    name = draw(st.sampled_from(names)) if names else None
    if kind == "valid":
        return raw
    if kind == "truncated":
        return raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    if kind == "length":
        return join_file(header, data, length=draw(huge_ints | st.integers(0, len(raw))))
    if kind == "padding":  # the format allows trailing spaces in the header; other padding is not
        return join_file(header, data, blob=json.dumps(header).encode() + draw(st.sampled_from([b" " * 5, b"\x00", b"\n"])))
    if kind == "not-json":
        return join_file(None, data, blob=draw(st.binary(max_size=60)))
    if kind == "deep":
        depth = draw(st.integers(1, 100_000))
        return join_file(None, data, blob=b"{\"a\":" + b"[" * depth + b"]" * depth + b"}")
    if kind == "empty":  # an extra zero-size tensor whose other dimensions are huge
        dims = draw(st.permutations([0, *draw(st.lists(huge_ints | st.integers(0, 9), max_size=3))]))
        header["empty"] = {"dtype": draw(st.sampled_from(["F32", "I64", "U8"])), "shape": dims, "data_offsets": [0, 0]}
        return join_file(header, data)
    if kind == "metadata":
        header["__metadata__"] = draw(json_junk)
        return join_file(header, data)
    if kind == "junk" or name is None:
        header[draw(st.text(max_size=6))] = draw(json_junk)
        return join_file(header, data)
    if kind == "offsets":
        header[name]["data_offsets"] = draw(st.lists(huge_ints, min_size=0, max_size=3) | json_junk)
    elif kind == "dtype":
        header[name]["dtype"] = draw(st.sampled_from(["F32", "I64", "BOOL", "F4", "F8_E4M3", "X", "f32", ""]) | json_junk)
    elif kind == "shape":
        header[name]["shape"] = draw(st.lists(huge_ints, max_size=3) | json_junk)
    elif kind == "overlap":
        other = draw(st.sampled_from(names))
        header[name]["data_offsets"] = list(header[other]["data_offsets"])
        header[name]["shape"], header[name]["dtype"] = header[other]["shape"], header[other]["dtype"]
    return join_file(header, data)


def _reference_load(path: Path) -> dict[str, torch.Tensor] | None:
    """The safetensors library's verdict (None: refused), to catch valid files we would refuse."""
    try:
        return safetensors.torch.load_file(str(path))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # noqa: BLE001 - includes pyo3's PanicException
        return None


def check_safetensors(data: bytes) -> str:
    """One execution: read_safetensors_header / read_state_dict raise only CheckpointError, allocate
    no more than the file's size (beyond a small constant), and refuse nothing the library reads."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.safetensors"
        path.write_bytes(data)
        tracemalloc.start()
        try:
            header = read_safetensors_header(path)
        except CheckpointError as err:
            header = None
            assert "\n" not in str(err) and str(path) in str(err)
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert peak <= (1 << 20) + 64 * len(data), f"header reader allocated {peak} bytes for a {len(data)}-byte file"
        reference = _reference_load(path)
        try:
            tensors = read_state_dict(path)
        except CheckpointError:
            # Stricter than the library on purpose only for empty tensors whose strides overflow 64 bits.
            assert reference is None or any(math.prod(max(d, 1) for d in t.shape) >= 2**63 for t in reference.values()), (
                "a file the safetensors library reads was refused"
            )
            return "refused"
        assert header is not None
        assert set(tensors) == set(header.tensors)
        assert sum(t.numel() * t.element_size() for t in tensors.values()) <= len(data)
        assert reference is not None and set(reference) == set(tensors)
        return "read"


@pytest.mark.parametrize("kind", SAFETENSORS_KINDS)
def test_safetensors_reader_raises_only_checkpoint_errors(kind: str) -> None:
    @PER_KIND
    @given(safetensors_files(kind))
    def run(data: bytes) -> None:
        check_safetensors(data)

    run()


def test_huge_header_length_is_refused_without_reading(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(CheckpointError, match=r"huge.safetensors.*header length"):
        read_safetensors_header(path)


# ---- pickle checkpoints (.ckpt / .pt / .bin, read with weights_only=True) --------------------------------------


def _seed_pickles() -> list[bytes]:
    """A training-style .ckpt (zip format) and a legacy-format one."""
    out = []
    for zip_format in (True, False):
        buffer = io.BytesIO()
        state = {"state_dict": {"a": torch.zeros(3), "b": torch.ones(2, 2, dtype=torch.int64)}, "global_step": 3}
        torch.save(state, buffer, _use_new_zipfile_serialization=zip_format)
        out.append(buffer.getvalue())
    return out


SEED_PICKLES = _seed_pickles()


def mutate(rng_draw: st.DrawFn, data: bytes, edits: int = 6) -> bytes:
    """A few byte edits (set, insert, delete) and maybe a truncation."""
    out = bytearray(data)
    for _ in range(rng_draw(st.integers(0, edits))):
        op = rng_draw(st.sampled_from(["set", "insert", "delete"]))
        at = rng_draw(st.integers(0, max(0, len(out) - 1)))
        if op == "set" and out:
            out[at] = rng_draw(st.integers(0, 255))
        elif op == "insert":
            out[at:at] = rng_draw(st.binary(min_size=1, max_size=8))
        elif out:
            del out[at : at + rng_draw(st.integers(1, 16))]
    if rng_draw(st.booleans()):
        out = out[: rng_draw(st.integers(0, len(out)))]
    return bytes(out)


@st.composite
def pickle_files(draw: st.DrawFn) -> bytes:
    return mutate(draw, draw(st.sampled_from(SEED_PICKLES)))


def check_pickle(data: bytes) -> str:
    """One execution: read_state_dict on a damaged .ckpt returns tensors or raises CheckpointError."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.ckpt"
        path.write_bytes(data)
        try:
            tensors = read_state_dict(path)
        except CheckpointError as err:
            assert "\n" not in str(err) and str(path) in str(err), str(err)
            return "refused"
        assert all(isinstance(t, torch.Tensor) for t in tensors.values())
        return "read"


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch notes the odd pickle protocols it is shown
@SLOW
@given(pickle_files())
def test_pickle_reader_raises_only_checkpoint_errors(data: bytes) -> None:
    check_pickle(data)


# ---- model configs ---------------------------------------------------------------------------------------------

CONFIGS: list[type[ModelConfig]] = [UNetConfig, VAEConfig, CLIPTextConfig, CLIPVisionConfig, CLIPConfig]
config_values = st.one_of(
    json_junk, st.integers(-3, 130), st.lists(st.integers(-1, 130), max_size=5),
    st.sampled_from(["silu", "gelu", "quick_gelu", "DownBlock2D", "CrossAttnDownBlock2D", "UpBlock2D",
                     "DownEncoderBlock2D", "UpDecoderBlock2D", "UNetMidBlock2DCrossAttn", "default"]),
)


@st.composite
def config_dicts(draw: st.DrawFn) -> tuple[type[ModelConfig], dict[str, Any]]:
    cls = draw(st.sampled_from(CONFIGS))
    data = cls.tiny().to_dict()  # type: ignore[attr-defined]
    keys = sorted(data) + (sorted(_FIXED_KEYS) if cls is UNetConfig else [])
    for key in draw(st.lists(st.sampled_from(keys), max_size=3)):
        data[key] = draw(config_values)
    return cls, data


def check_config(cls: type[ModelConfig], data: dict[str, Any]) -> str:
    """One execution: from_dict builds a config that round-trips, or raises a ConfigError naming the source."""
    try:
        config = cls.from_dict(data, source="fuzz/config.json")
    except ConfigError as err:
        assert "\n" not in str(err) and "fuzz/config.json" in str(err), str(err)
        return "refused"
    assert cls.from_dict(config.to_dict()) == config
    return "built"


@SLOW
@given(config_dicts())
def test_config_from_dict_raises_only_config_errors(case: tuple[type[ModelConfig], dict[str, Any]]) -> None:
    check_config(*case)


# ---- image files -----------------------------------------------------------------------------------------------


def _seed_images() -> dict[str, bytes]:
    """Tiny images in the formats people pass, as bytes."""
    rgb = Image.new("RGB", (8, 6), (200, 30, 60))
    out = {}
    for fmt, image in (("PNG", rgb), ("JPEG", rgb), ("GIF", rgb.convert("P")), ("BMP", rgb), ("TIFF", rgb),
                       ("WEBP", rgb), ("PNG", Image.new("RGBA", (5, 5))), ("PNG", Image.new("I;16", (4, 4)))):
        buffer = io.BytesIO()
        try:
            image.save(buffer, format=fmt)
        except (KeyError, OSError):  # a format this PIL was built without
            continue
        out[f"{fmt}-{image.mode}"] = buffer.getvalue()
    return out


SEED_IMAGES = _seed_images()
MAX_PIXELS = 4096


@st.composite
def image_files(draw: st.DrawFn) -> bytes:
    return mutate(draw, SEED_IMAGES[draw(st.sampled_from(sorted(SEED_IMAGES)))])


def check_image(data: bytes) -> str:
    """One execution: open_image returns a loaded RGB/L image within the budget, or raises BadFile."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.img"
        path.write_bytes(data)
        try:
            image = open_image(path, what="init image", max_pixels=MAX_PIXELS)
        except BadFile as err:
            assert "\n" not in str(err) and str(path) in str(err), str(err)
            return "refused"
        assert image.mode in ("RGB", "L")
        assert image.width * image.height <= MAX_PIXELS
        image.tobytes()  # fully loaded: no file access left
        return "opened"


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about the corrupt EXIF/TIFF tags it skips
@SLOW
@given(image_files())
def test_open_image_raises_only_bad_file(data: bytes) -> None:
    check_image(data)
