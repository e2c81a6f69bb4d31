"""``latentdiff train ...``: argument parsing only; the work is done by the library.

    latentdiff train vae  --config vae.toml  [--resume] [--out DIR] [--steps N]
    latentdiff train unet --config unet.toml [--resume] [--out DIR] [--steps N]
    latentdiff train clip --config clip.toml [--resume] [--out DIR] [--steps N]
    latentdiff train lora --config lora.toml [--resume] [--out DIR] [--steps N]
    latentdiff train embedding --config ti.toml [--resume] [--out DIR] [--steps N]
    latentdiff train lcm  --config lcm.toml  [--resume] [--out DIR] [--steps N]
    latentdiff train taesd --config taesd.toml [--resume] [--out DIR] [--steps N]
    torchrun --standalone --nproc_per_node 2 -m latentdiff.cli train unet --config unet.toml   (data parallel)
    latentdiff train builtin [--out runs/builtin] [--stage clip|vae|unet|decoder|sharpen|anneal|vision|lcm|assemble] [--target DIR] [--jobs N] [--times]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from ..checkpoints.errors import CheckpointError
from ..errors import UserError
from .checkpoint import TrainCheckpointError
from .clip import CLIPTrainConfig
from .config import TrainConfig, TrainConfigError, UNetTrainConfig, VAETrainConfig
from .data import TrainDataError
from .distributed import dist_info, leave_world
from .embedding import EmbeddingTrainConfig
from .lcm import LCMTrainConfig
from .lora import LoRATrainConfig
from .taesd import TAESDTrainConfig


def _run_vae(config: TrainConfig, resume: bool) -> Any:
    from .vae import train_vae

    return train_vae(config, resume=resume)  # type: ignore[arg-type]


def _run_clip(config: TrainConfig, resume: bool) -> Any:
    from .clip import train_clip

    return train_clip(config, resume=resume)  # type: ignore[arg-type]


def _run_unet(config: TrainConfig, resume: bool) -> Any:
    from .unet import train_unet

    return train_unet(config, resume=resume)  # type: ignore[arg-type]


def _run_lora(config: TrainConfig, resume: bool) -> Any:
    from .lora import train_lora

    return train_lora(config, resume=resume)  # type: ignore[arg-type]


def _run_embedding(config: TrainConfig, resume: bool) -> Any:
    from .embedding import train_embedding

    return train_embedding(config, resume=resume)  # type: ignore[arg-type]


def _run_lcm(config: TrainConfig, resume: bool) -> Any:
    from .lcm import train_lcm

    return train_lcm(config, resume=resume)  # type: ignore[arg-type]


def _run_taesd(config: TrainConfig, resume: bool) -> Any:
    from .taesd import train_taesd

    return train_taesd(config, resume=resume)  # type: ignore[arg-type]


# subcommand -> (config class, runner, help).
TRAINERS: dict[str, tuple[type[TrainConfig], Callable[[TrainConfig, bool], Any], str]] = {
    "vae": (VAETrainConfig, _run_vae, "train or fine-tune the autoencoder (L1 + KL + PatchGAN [+ LPIPS])"),
    "clip": (CLIPTrainConfig, _run_clip, "train a small CLIP (text + image towers) contrastively on the built-in world"),
    "unet": (UNetTrainConfig, _run_unet, "train or fine-tune the UNet on VAE latents with a frozen text encoder"),
    "lora": (LoRATrainConfig, _run_lora, "train a LoRA (UNet attention, optionally LoCon and the text encoder) in kohya's format"),
    "embedding": (EmbeddingTrainConfig, _run_embedding, "learn a textual-inversion embedding (A1111 .pt and .safetensors)"),
    "lcm": (LCMTrainConfig, _run_lcm, "distill a pipeline's UNet into an LCM-LoRA (4-step sampling with sampler lcm)"),
    "taesd": (TAESDTrainConfig, _run_taesd, "distill a model's VAE into a tiny autoencoder (TAESD) for fast decodes and previews"),
}


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``train <what> --config FILE [--resume] [--out DIR] [--steps N]`` to a CLI."""
    train = subparsers.add_parser(
        "train", help="train a model component",
        description="Train a model component from a config file (TOML or JSON). A run folder gets "
        "log.csv, samples/, checkpoint.pt and the exported model; --resume continues a run exactly.",
    )
    which = train.add_subparsers(dest="train_what", metavar="{" + ",".join(TRAINERS) + "}", required=True)
    for name, (config_cls, _, text) in TRAINERS.items():
        p = which.add_parser(name, help=text, description=text)
        p.add_argument("--config", required=True, help=f"TOML or JSON file of {config_cls.__name__} settings")
        p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt exactly")
        p.add_argument("--out", metavar="DIR", help="run folder (overrides out_dir)")
        p.add_argument("--steps", type=int, metavar="N", help="total optimizer steps (overrides max_steps)")
        p.set_defaults(func=run_train_command)
    builtin = which.add_parser("builtin", help="reproduce the built-in Shapes World model from nothing, stage by stage")
    builtin.add_argument("--out", default="runs/builtin", help="run folder of all stages (default runs/builtin)")
    builtin.add_argument("--stage", action="append", help="run only this stage (repeatable): clip, vae, unet, decoder, sharpen, anneal, vision, lcm, assemble")
    builtin.add_argument("--target", help="where the assembled model goes (default OUT/model)")
    builtin.add_argument("--jobs", type=int, default=1, metavar="N",
                         help="stages run at once, each in its own process with cores / N threads, as soon as "
                              "the stages they read are done (default 1: one after another)")
    builtin.add_argument("--times", action="store_true",
                         help="only print each stage's minutes and the recipe's wall time, from OUT/stages.csv")
    builtin.set_defaults(func=run_builtin_command)
    return train


def run_builtin_command(args: argparse.Namespace) -> int:
    """``train builtin``: every stage in order, each resuming its own checkpoint."""
    from pathlib import Path

    from .builtin import STAGES, times_table, train_builtin
    from .stages import StageFailed

    stages = tuple(args.stage) if args.stage else STAGES
    try:
        if args.times:
            print(times_table(Path(args.out)))
            return 0
        print(f"built-in model: {train_builtin(args.out, stages, args.target, jobs=args.jobs)}")
        if (Path(args.out) / "stages.csv").is_file():
            print(times_table(Path(args.out)))
    except (StageFailed, ValueError, TrainConfigError, CheckpointError) as err:
        where = f" (each stage's output is in {args.out}/STAGE/console.log)" if isinstance(err, StageFailed) else ""
        print(f"latentdiff train builtin: {err}{where}", file=sys.stderr)
        return 2
    finally:
        leave_world()
    return 0


def run_train_command(args: argparse.Namespace) -> int:
    """Run the subcommand parsed by :func:`add_train_parser`; returns an exit status."""
    config_cls, runner, _ = TRAINERS[args.train_what]
    try:
        config = config_cls.from_file(args.config)
        changes: dict[str, Any] = {}
        if args.out:
            changes["out_dir"] = args.out
        if args.steps is not None:
            changes["max_steps"] = args.steps
        if changes:
            config = config.replace(**changes)
        result = runner(config, args.resume)
    except (TrainConfigError, TrainDataError, TrainCheckpointError, CheckpointError, UserError, FileExistsError) as err:
        print(f"latentdiff train {args.train_what}: {err}", file=sys.stderr)
        return 2
    finally:
        leave_world()
    if not dist_info().is_main:
        return 0  # rank 0 reports for the job
    print(f"trained {args.train_what} for {result.step} steps in {result.out_dir}")
    if result.exported is not None:
        print(f"model: {result.exported}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m latentdiff.train.cli train vae --config ...``)."""
    parser = argparse.ArgumentParser(prog="latentdiff")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
