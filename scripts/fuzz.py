#!/usr/bin/env python3
"""A longer fuzz run of the parsers tests/test_fuzz.py checks: prompts, safetensors, pickles, configs, images.

    .venv/bin/python scripts/fuzz.py --seconds 60 --seed 1

Inputs come from a seeded random mutator (valid inputs with a few edits, truncations,
junk); each execution is one ``check_*`` function from tests/test_fuzz.py, so the
properties are exactly the tests'. A failure (an exception other than latentdiff's clean
error, a broken property, or an execution slower than ``--slow`` seconds) is printed with
the seed and execution number that reproduce it; the run goes on. At the end one line
per target gives executions, outcomes and failures; the exit status is 1 if anything failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import string
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

ROOT = Path(__file__).resolve().parent.parent


def _load_checks() -> Any:
    """tests/test_fuzz.py as a module (the tests folder is not a package)."""
    spec = importlib.util.spec_from_file_location("latentdiff_test_fuzz", ROOT / "tests" / "test_fuzz.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


checks = _load_checks()

# ---- generators: one input from a random.Random ---------------------------------------------------------------

PROMPT_ALPHABET = "()[]\\:.0123456789+- \tab,é东🌃"
HUGE = [0, 1, 7, 8, 2**31, 2**32 + 1, 2**63 - 1, 2**63, 2**64 - 1, 10**30, -1]


def _junk(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value (nested a little)."""
    roll = rng.randrange(8 if depth < 3 else 5)
    if roll == 0:
        return None
    if roll == 1:
        return rng.random() < 0.5
    if roll == 2:
        return rng.choice(HUGE + [rng.randint(-(2**70), 2**70), rng.randint(-3, 130)])
    if roll == 3:
        return rng.choice([rng.uniform(-1e3, 1e3), float("nan"), float("inf"), 1e308, -0.0, 2.0])
    if roll == 4:
        return "".join(rng.choice(string.printable) for _ in range(rng.randrange(8)))
    if roll in (5, 6):
        return [_junk(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {_junk_key(rng): _junk(rng, depth + 1) for _ in range(rng.randrange(4))}


def _junk_key(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_letters + "_") for _ in range(rng.randrange(1, 7)))


def gen_prompt(rng: random.Random) -> str:
    roll = rng.randrange(4)
    if roll == 0:  # arbitrary unicode
        return "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(200)))
    if roll == 1:  # long weights, nested
        depth = rng.randrange(1, 4)
        return "(" * depth + "a" + "".join(f":{'9' * rng.randrange(1, 400)})" for _ in range(depth))
    return "".join(rng.choice(PROMPT_ALPHABET) for _ in range(rng.randrange(120)))


def _tensors(rng: random.Random) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(rng.randrange(5)):
        shape = [rng.randrange(5) for _ in range(rng.randrange(4))]
        n = 1
        for d in shape:
            n *= d
        out[f"t{i}"] = torch.arange(n).reshape(shape).to(rng.choice(checks.DTYPES))
    return out


def gen_safetensors(rng: random.Random) -> bytes:
    raw = safetensors.torch.save(_tensors(rng), metadata=rng.choice([None, {"format": "pt"}]))
    header, data = checks.split_file(raw)
    names = [k for k in header if k != "__metadata__"]
    roll = rng.randrange(13)
    if roll == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(300)))
    if roll == 1:
        return raw
    if roll == 2:
        return raw[: rng.randrange(len(raw))]
    if roll == 3:
        return checks.join_file(header, data, length=rng.choice(HUGE + [rng.randrange(len(raw) + 1)]))
    if roll == 4:
        blob = bytearray(json.dumps(header).encode())
        for _ in range(rng.randrange(1, 4)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        return checks.join_file(None, data, blob=bytes(blob))
    if roll == 5:
        depth = rng.randrange(1, 200_000)
        return checks.join_file(None, data, blob=b'{"a":' + b"[" * depth + b"]" * depth + b"}")
    if roll == 12:  # an extra zero-size tensor whose other dimensions are huge
        dims = [0] + [rng.choice(HUGE + [rng.randrange(10)]) for _ in range(rng.randrange(4))]
        rng.shuffle(dims)
        header["empty"] = {"dtype": rng.choice(["F32", "I64", "U8"]), "shape": dims, "data_offsets": [0, 0]}
    elif roll == 6:
        header["__metadata__"] = _junk(rng)
    elif roll == 7 or not names:
        header[_junk_key(rng)] = _junk(rng)
    else:
        name = rng.choice(names)
        field = rng.choice(["data_offsets", "dtype", "shape", "overlap", "drop"])
        if field == "overlap":
            other = rng.choice(names)
            header[name] = dict(header[other])
        elif field == "drop":
            header[name].pop(rng.choice(["data_offsets", "dtype", "shape"]))
        elif field == "dtype":
            header[name]["dtype"] = rng.choice(["F32", "I64", "BOOL", "F4", "F8_E4M3", "X", "f32", "", _junk(rng)])
        else:
            header[name][field] = rng.choice([[rng.choice(HUGE) for _ in range(rng.randrange(4))], _junk(rng)])
    return checks.join_file(header, data)


def gen_config(rng: random.Random) -> tuple[type, dict[str, Any]]:
    cls = rng.choice(checks.CONFIGS)
    data = cls.tiny().to_dict()
    keys = sorted(data) + (sorted(checks._FIXED_KEYS) if cls is checks.UNetConfig else [])
    for _ in range(rng.randrange(4)):
        data[rng.choice(keys)] = rng.choice([
            _junk(rng), rng.randint(-3, 130), [rng.randint(-1, 130) for _ in range(rng.randrange(5))],
            rng.choice(["silu", "gelu", "quick_gelu", "DownBlock2D", "CrossAttnDownBlock2D", "UpBlock2D",
                        "DownEncoderBlock2D", "UpDecoderBlock2D", "UNetMidBlock2DCrossAttn", "default"]),
        ])
    return cls, data


def gen_image(rng: random.Random) -> bytes:
    return _mutate(rng, checks.SEED_IMAGES[rng.choice(sorted(checks.SEED_IMAGES))])


def gen_pickle(rng: random.Random) -> bytes:
    return _mutate(rng, rng.choice(checks.SEED_PICKLES))


def _mutate(rng: random.Random, seed: bytes) -> bytes:
    """A few byte edits (set, insert, delete) and maybe a truncation."""
    data = bytearray(seed)
    for _ in range(rng.randrange(8)):
        at = rng.randrange(max(1, len(data)))
        op = rng.randrange(3)
        if op == 0 and data:
            data[at] = rng.randrange(256)
        elif op == 1:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        elif data:
            del data[at : at + rng.randrange(1, 17)]
    if rng.random() < 0.3:
        data = data[: rng.randrange(len(data) + 1)]
    return bytes(data)


TARGETS: dict[str, tuple[Callable[[random.Random], Any], Callable[[Any], str]]] = {
    "prompt": (gen_prompt, checks.check_prompt),
    "safetensors": (gen_safetensors, checks.check_safetensors),
    "pickle": (gen_pickle, checks.check_pickle),
    "config": (gen_config, lambda case: checks.check_config(*case)),
    "image": (gen_image, checks.check_image),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="total time, shared among the targets")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (a run is reproducible)")
    parser.add_argument("--targets", nargs="+", choices=sorted(TARGETS), default=list(TARGETS))
    parser.add_argument("--slow", type=float, default=5.0, help="an execution slower than this many seconds fails")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)  # PIL and torch note the damage they skip over
    if args.seconds <= 0:
        parser.error("--seconds must be positive")

    executions: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    outcomes: dict[str, Counter[str]] = {name: Counter() for name in args.targets}
    rng = random.Random(args.seed)
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        for name in args.targets:
            generate, check = TARGETS[name]
            number = executions[name]
            value = generate(rng)
            executions[name] += 1
            start = time.monotonic()
            try:
                outcomes[name][check(value)] += 1
            except Exception:  # noqa: BLE001 - every escape is a finding
                failures[name] += 1
                print(f"FAIL {name} #{number} (seed {args.seed}): input {value!r:.300}", file=sys.stderr)
                traceback.print_exc(limit=6)
                continue
            took = time.monotonic() - start
            if took > args.slow:
                failures[name] += 1
                print(f"SLOW {name} #{number} (seed {args.seed}): {took:.1f} s for input {value!r:.300}", file=sys.stderr)
    for name in args.targets:
        seen = ", ".join(f"{k} {v}" for k, v in sorted(outcomes[name].items()))
        print(f"{name:12s} executions {executions[name]:7d}  failures {failures[name]:4d}  ({seen})")
    return 1 if sum(failures.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
