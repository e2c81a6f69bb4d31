"""The default dtype: detected from the hardware, overridable, recorded on the pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import latentdiff
from latentdiff.cli import main
from latentdiff.speed import dtype as speed_dtype


@pytest.fixture()
def auto(monkeypatch):
    monkeypatch.delenv("LATENTDIFF_DTYPE", raising=False)
    return monkeypatch


@pytest.mark.parametrize(("feature", "expected"), [("AVX512-BF16", torch.bfloat16), ("AMX-BF16", torch.bfloat16),
                                                   (None, torch.float32)])
def test_cpu_choice_follows_native_bf16(auto, feature, expected) -> None:
    auto.setattr(speed_dtype, "native_bf16", lambda: feature)
    choice = speed_dtype.choose_dtype("cpu")
    assert choice.dtype == expected
    assert (feature or "no native bfloat16") in choice.reason


def test_cuda_gets_float16_and_env_overrides(auto) -> None:
    assert speed_dtype.choose_dtype("cuda").dtype == torch.float16
    auto.setenv("LATENTDIFF_DTYPE", "float16")
    assert speed_dtype.choose_dtype("cpu").dtype == torch.float16
    auto.setenv("LATENTDIFF_DTYPE", "double")
    with pytest.raises(latentdiff.BadArgument, match="LATENTDIFF_DTYPE='double'"):
        speed_dtype.choose_dtype("cpu")


def test_detection_matches_the_cpu_flags() -> None:
    """The probe agrees with the kernel's CPU flags (where there are some to read)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo")
    flags = set(next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "").split())
    assert (speed_dtype.native_bf16() is not None) == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_load_uses_the_choice_and_records_it(auto, diffusers_dir: Path) -> None:
    auto.setattr(speed_dtype, "native_bf16", lambda: "AVX512-BF16")
    pipe = latentdiff.load(diffusers_dir)
    assert pipe.dtype == torch.bfloat16 and pipe.dtype_reason == "bfloat16 (the CPU runs it natively: AVX512-BF16)"
    assert latentdiff.load(diffusers_dir, dtype="float32").dtype == torch.float32
    assert latentdiff.load(diffusers_dir, dtype=torch.float16).dtype_reason == "float16 (asked for)"


def test_cli_prints_the_choice_once(auto, diffusers_dir: Path, tmp_path: Path, capsys) -> None:
    auto.setattr(speed_dtype, "native_bf16", lambda: None)
    assert main(["generate", "a cat", "--model", str(diffusers_dir), "--steps", "1", "--out", str(tmp_path / "a.png")]) == 0
    err = capsys.readouterr().err
    assert err.count("networks in float32 (the CPU has no native bfloat16)") == 1
    assert main(["generate", "a cat", "--model", str(diffusers_dir), "--steps", "1", "--dtype", "float32",
                 "--out", str(tmp_path / "b.png")]) == 0
    assert "networks in" not in capsys.readouterr().err
