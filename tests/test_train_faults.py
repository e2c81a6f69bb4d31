"""Crash-proof training in real processes: a checkpoint write refused by the OS (the file-size limit
standing in for a full disk) and kill -9 at several moments, each followed by --resume, ending
bitwise equal to an uninterrupted run."""

from __future__ import annotations

import csv
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train_trainers import synthetic_source, tiny_pipeline, write_image_folder

from latentdiff.train.checkpoint import load_checkpoint

STEPS = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    tiny_pipeline().save(root / "pipe")
    write_image_folder(root / "data", synthetic_source())
    (root / "unet.toml").write_text(
        f'pretrained = "{root / "pipe"}"\ndata = "{root / "data"}"\nresolution = 16\nmax_steps = {STEPS}\n'
        'batch_size = 2\ngrad_accum = 2\nlr = 1e-3\nwarmup_steps = 2\nema_decay = 0.9\nsample_every = 0\n'
        'checkpoint_every = 1\nsample_steps = 2\nnum_sample_images = 1\nnoise_offset = 0.05\nexport = false\n'
    )
    return root


def command(root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "latentdiff.cli", "train", "unet", "--config", str(root / "unet.toml"),
            "--out", str(out), *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def logged_steps(out: Path) -> int:
    try:
        with (out / "log.csv").open() as f:
            return len(list(csv.DictReader(f)))
    except (FileNotFoundError, ValueError):
        return 0


def comparable(state: dict) -> dict:
    """A checkpoint without what legitimately differs between processes: timing, the run folder and
    the global RNGs, which each process starts from its own entropy (the trainers never draw from them)."""
    kept = {k: v for k, v in state.items() if k not in ("seconds", "config", "rng")}
    return {**kept, "generators": state["rng"]["generators"]}


def assert_equal_states(a, b, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_equal_states(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_states(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_kill_9_at_three_moments_then_resume_is_bitwise_exact(setup: Path) -> None:
    straight = setup / "straight"
    subprocess.run(command(setup, straight), env=ENV, check=True, capture_output=True, timeout=300)
    killed = setup / "killed"
    for after in (2, 5, 9):  # kill -9 as soon as this many steps are logged (mid-step or mid-write)
        process = subprocess.Popen(command(setup, killed, "--resume"), env=ENV, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while logged_steps(killed) < after and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        assert load_checkpoint(killed / "checkpoint.pt")["step"] < STEPS  # it was really cut short
    subprocess.run(command(setup, killed, "--resume"), env=ENV, check=True, capture_output=True, timeout=300)
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(killed / "checkpoint.pt")
    assert a["step"] == b["step"] == STEPS
    assert_equal_states(comparable(a), comparable(b))
    with (straight / "log.csv").open() as f, (killed / "log.csv").open() as g:
        assert [r["loss"] for r in csv.DictReader(f)] == [r["loss"] for r in csv.DictReader(g)]


def test_a_refused_checkpoint_write_stops_the_run_and_keeps_the_last_one(setup: Path) -> None:
    """Resumed under a file-size limit smaller than a checkpoint, the OS refuses the next write
    mid-file (EFBIG, as a full disk refuses with ENOSPC): the run exits 2 saying why, the old
    checkpoint still loads, no temporary file is left, and a later --resume finishes normally."""
    out = setup / "full"
    subprocess.run(command(setup, out, "--steps", "3"), env=ENV, check=True, capture_output=True, timeout=300)
    before = load_checkpoint(out / "checkpoint.pt")
    limit = (out / "checkpoint.pt").stat().st_size // 2

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write() instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run(command(setup, out, "--resume"), env=ENV, capture_output=True, text=True, timeout=300,
                          preexec_fn=limited)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "stopped at step 4: writing its checkpoint failed (File too large)" in done.stderr
    assert "the checkpoint of step 3" in done.stderr and "--resume" in done.stderr
    assert "Traceback" not in done.stderr
    assert_equal_states(comparable(before), comparable(load_checkpoint(out / "checkpoint.pt")))
    assert not list(out.glob(".checkpoint.pt.*"))
    subprocess.run(command(setup, out, "--resume"), env=ENV, check=True, capture_output=True, timeout=300)
    assert load_checkpoint(out / "checkpoint.pt")["step"] == STEPS
