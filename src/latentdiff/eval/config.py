"""``latentdiff eval``'s inputs: the sweep's settings, the CLI flags as an :class:`EvalConfig`, and the
checks that fail with one line before anything loads."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadArgument


@dataclass(frozen=True)
class Setting:
    """One point of the sweep: a sampler with its step count, and a guidance scale."""

    sampler: str  # sampler id
    steps: int
    guidance: float

    @property
    def sampler_label(self) -> str:
        """``ddim:20``: the series this point belongs to in the plot."""
        return f"{self.sampler}:{self.steps}"

    @property
    def key(self) -> str:
        """File-name-safe name, e.g. ``ddim20_w7.5``."""
        return f"{self.sampler}{self.steps}_w{self.guidance:g}"


def parse_guidance(text: str) -> list[float]:
    """``"1,3,7.5"`` -> [1.0, 3.0, 7.5] (finite, non-negative, no repeats)."""
    values = []
    for item in str(text).split(","):
        item = item.strip()
        try:
            value = float(item)
        except ValueError:
            raise BadArgument(f"--guidance: {item!r} is not a number (use e.g. 1,3,7.5)") from None
        if not math.isfinite(value) or value < 0:
            raise BadArgument(f"--guidance: {item!r} must be a finite non-negative number")
        if value in values:
            raise BadArgument(f"--guidance: {item} is given twice")
        values.append(value)
    return values


def parse_samplers(text: str, default_steps: int = 20) -> list[tuple[str, int]]:
    """``"ddim:20,Euler a:30"`` -> [("ddim", 20), ("euler_a", 30)]; steps default to ``default_steps``."""
    from ..samplers import get_sampler

    out: list[tuple[str, int]] = []
    for item in str(text).split(","):
        item = item.strip()
        name, sep, steps_text = item.rpartition(":")
        if not sep:
            name, steps_text = item, str(default_steps)
        try:
            steps = int(steps_text)
        except ValueError:
            raise BadArgument(f"--samplers: {item!r} is not SAMPLER:STEPS (e.g. ddim:20)") from None
        if steps < 1:
            raise BadArgument(f"--samplers: {item!r} needs at least 1 step")
        spec = get_sampler(name)
        if (spec.id, steps) in out:
            raise BadArgument(f"--samplers: {spec.id}:{steps} is given twice")
        out.append((spec.id, steps))
    return out


@dataclass(frozen=True)
class FeatureSpec:
    """Which network gives the features for the Frechet distance: ``kind`` is "clip" or "inception"."""

    kind: str  # "clip" or "inception"
    path: str | None = None


def parse_features(text: str) -> FeatureSpec:
    """``clip`` (the CLIP model's image tower) or ``inception:PATH`` (the FID InceptionV3 weight file)."""
    text = str(text).strip()
    if text == "clip":
        return FeatureSpec("clip")
    kind, sep, path = text.partition(":")
    if kind == "inception":
        if not sep or not path:
            raise BadArgument("--features inception needs the weight file: inception:PATH "
                             "(pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")
        if not Path(path).is_file():
            raise BadArgument(f"--features: no such Inception weight file: {path}")
        return FeatureSpec("inception", path)
    raise BadArgument(f"unknown feature extractor {text!r}: use clip or inception:PATH")


def default_cache_dir() -> Path:
    """``$LATENTDIFF_CACHE``, else ``$XDG_CACHE_HOME/latentdiff``, else ``~/.cache/latentdiff``; then ``reference/``."""
    if os.environ.get("LATENTDIFF_CACHE"):
        return Path(os.environ["LATENTDIFF_CACHE"]) / "reference"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "latentdiff" / "reference"


@dataclass
class EvalConfig:
    """Everything ``latentdiff eval`` takes (the CLI flags, one to one)."""

    out: str
    prompts: str = "builtin"
    guidance: Sequence[float] = (1.0, 3.0, 7.5)
    samplers: Sequence[tuple[str, int]] = (("ddim", 20),)
    images_per_prompt: int = 1
    n_prompts: int | None = None
    model: str | None = None
    reference: str | None = None
    reference_per_prompt: int | None = None
    features: str = "clip"
    clip: str | None = None
    seed: int = 0
    negative: str = ""
    width: int | None = None
    height: int | None = None
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    cache_dir: str | None = None
    grid_prompts: int = 8
    grid_columns: int = 8
    progress: bool = True

    @property
    def settings(self) -> list[Setting]:
        """Samplers outermost, guidance innermost (a plot line is one sampler's sweep)."""
        return [Setting(s, n, float(w)) for s, n in self.samplers for w in self.guidance]


def read_prompts(spec: str, n: int | None) -> tuple[list[str], bool]:
    """(prompts, is_builtin): ``builtin`` = the Shapes World's held-out prompts, else a text file (one per line)."""
    if spec == "builtin":
        from ..world import held_out_prompts

        total = len(held_out_prompts())
        if n is not None and not 1 <= n <= total:
            raise BadArgument(f"--n-prompts must be in 1..{total} for the built-in prompts, got {n}")
        return held_out_prompts(n), True
    path = Path(spec)
    if not path.is_file():
        raise BadArgument(f"prompts file {spec} does not exist (or use --prompts builtin)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise BadArgument(f"cannot read prompts file {spec}: {err}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise BadArgument(f"prompts file {spec} holds no prompts")
    if n is not None:
        if n < 1:
            raise BadArgument(f"--n-prompts must be at least 1, got {n}")
        prompts = prompts[:n]
    return prompts, False


def resolve_clip_folder(clip: str | None, model: str | None) -> Path:
    """``--clip``, else the model folder's (or the built-in model's) ``clip/`` subfolder."""
    from ..loading import BUILTIN_MODEL

    if clip is not None:
        folder = Path(clip)
        if not (folder / "config.json").is_file():
            raise BadArgument(f"--clip {clip} is not a CLIP model folder (no config.json)")
        return folder
    base = Path(model) if model is not None else BUILTIN_MODEL
    if (base / "clip" / "config.json").is_file():
        return base / "clip"
    where = "the built-in model" if model is None else f"{model}"
    raise BadArgument(f"{where} has no clip/ folder: CLIP score (and --features clip) need --clip DIR")


def clip_display_name(folder: Path) -> str:
    """``clip-<name>``: the model folder's name for a ``clip/`` subfolder, else the folder's own."""
    folder = folder.resolve()
    return f"clip-{folder.parent.name if folder.name == 'clip' else folder.name}"


def check_inputs(config: EvalConfig) -> tuple[list[str], bool, FeatureSpec, Path]:
    """Every check that needs no network: fail with one line before anything loads."""
    prompts, builtin = read_prompts(config.prompts, config.n_prompts)
    features = parse_features(config.features)
    if not config.guidance:
        raise BadArgument("--guidance needs at least one value")
    if not config.samplers:
        raise BadArgument("--samplers needs at least one SAMPLER:STEPS")
    if config.images_per_prompt < 1:
        raise BadArgument(f"--images-per-prompt must be at least 1, got {config.images_per_prompt}")
    if len(prompts) * config.images_per_prompt < 2:
        raise BadArgument("FD needs at least 2 images per setting: raise --n-prompts or --images-per-prompt")
    if config.batch_size < 1:
        raise BadArgument(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.reference_per_prompt is not None and config.reference_per_prompt < 1:
        raise BadArgument(f"--reference-per-prompt must be at least 1, got {config.reference_per_prompt}")
    if config.reference is not None:
        ref = Path(config.reference)
        if not ref.exists():
            raise BadArgument(f"reference {config.reference} does not exist")
        if ref.is_file() and ref.suffix.lower() != ".npz":
            raise BadArgument(f"--reference {config.reference} must be a folder of images or a statistics .npz")
    elif not builtin:
        raise BadArgument("a prompts file needs --reference: a folder of real images or a statistics .npz")
    clip_folder = resolve_clip_folder(config.clip, config.model)
    return prompts, builtin, features, clip_folder
