"""The ``latentdiff`` command: argument parsing only; the work is done by the library.

    latentdiff generate PROMPT [--model M] [--preset fast|full] [--negative N] [--steps N] [--guidance G]
                               [--sampler S] [--schedule S] [--seed 0] [--width W] [--height H] [--batch 1]
                               [--lora FILE[:W]] [--lora-dir D] [--embeddings-dir D] [--hires-scale S]
                               [--out out.png]
    latentdiff img2img  PROMPT --image IMG [--strength 0.75] ...
    latentdiff inpaint  PROMPT --image IMG --mask MASK [--strength 1.0] [--no-paste-back] ...
    latentdiff outpaint IMAGE [--prompt P] [--left PX] [--right PX] [--top PX] [--bottom PX]
                        [--fill edge|noise] [--feather 8] ...
    latentdiff samplers
    latentdiff vae      IMAGE [--model M] [--size 256] [--out FILE]
    latentdiff explain  PROMPT [--model M] [--steps 20] [--guidance 7.5] [--seed 0] [--out explain.png]
    latentdiff eval     --prompts FILE|builtin --guidance 1,3,7.5 [--samplers ddim:20,euler_a:20]
                        [--images-per-prompt N] [--n-prompts K] [--model M] [--reference DIR|STATS.npz]
                        [--features clip|inception:PATH] [--clip DIR] --out DIR
    latentdiff train    vae|clip|unet|lora|embedding|lcm|taesd|builtin ...

Bad input (a latentdiff.UserError: a bad argument, file or model, or work over the memory
budget) prints one line and exits with status 2; any other exception is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__


#: the settings each --preset fills in where the command line leaves them unset
PRESETS = {"fast": {"sampler": "lcm", "steps": 8, "guidance": 1.0},
           "full": {"sampler": "ddim", "steps": 20, "guidance": 7.5}}
FAST_LORA = "lcm_lora.safetensors"


def apply_preset(args: argparse.Namespace) -> Path | None:
    """Fill the unset sampler / steps / guidance from ``--preset`` (default: "fast" where the model
    folder ships an LCM-LoRA, else "full"); returns the LoRA file the fast preset merges."""
    from latentdiff.errors import BadArgument
    from latentdiff.loading import BUILTIN_MODEL

    folder = Path(args.model) if args.model else BUILTIN_MODEL
    lora = folder / FAST_LORA
    has_lora = folder.is_dir() and lora.is_file()
    preset = args.preset or ("fast" if has_lora else "full")
    if preset == "fast" and not has_lora:
        raise BadArgument(f"--preset fast needs an LCM-LoRA {FAST_LORA} in the model folder {folder} "
                          "(make one with `latentdiff train lcm`)")
    for key, value in PRESETS[preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return lora if preset == "fast" else None


def _add_generation_arguments(p: argparse.ArgumentParser, strength: float | None, *, outpaint: bool = False) -> None:
    if outpaint:
        p.add_argument("image", help="the image to extend")
        p.add_argument("--prompt", help="the text prompt (default: the prompt in the image's PNG parameters, else empty)")
    else:
        p.add_argument("prompt", help="the text prompt (A1111 weighting syntax allowed: (word:1.3), [word])")
    p.add_argument("--model", help="diffusers folder or single-file checkpoint (default: the built-in model)")
    p.add_argument("--tokenizer", help="tokenizer folder, needed with a single-file checkpoint")
    p.add_argument("--vae", help="a VAE folder or file to use instead of the model's own")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="merge a LoRA file (kohya / A1111 or diffusers / PEFT) at WEIGHT (default 1); repeatable")
    p.add_argument("--lora-dir", action="append", default=[], metavar="DIR",
                   help="where the prompt's <lora:NAME:WEIGHT> tags find NAME.safetensors (subfolders too); repeatable")
    p.add_argument("--embeddings-dir", metavar="DIR",
                   help="load every textual-inversion embedding in DIR (.pt, .safetensors, .bin), triggered by file name")
    p.add_argument("--negative", default=None if outpaint else "",
                   help="negative prompt" + (" (default: the image's, as for --prompt)" if outpaint else ""))
    p.add_argument("--preset", choices=list(PRESETS),
                   help="fast: the model's LCM-LoRA (a model folder's lcm_lora.safetensors, as the built-in model "
                        "has), LCM 8 steps, guidance 1 (the default where the file exists); full: the model as "
                        "trained, DDIM 20 steps, guidance 7.5 (the default elsewhere)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the preset's, 8 or 20)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the preset's, 1 or 7.5)")
    p.add_argument("--sampler", help="sampler id or A1111 name, see `latentdiff samplers` (default: the preset's, "
                                     "lcm or ddim)")
    p.add_argument("--schedule", help="schedule type for k-samplers: karras, exponential, sgm_uniform "
                                      "(default: the sampler's own)")
    p.add_argument("--seed", type=int, default=0, help="image i of the batch uses seed + i (default 0; -1: random)")
    p.add_argument("--subseed", type=int, help="A1111 variation seed (image i uses subseed + i; default: random)")
    p.add_argument("--subseed-strength", type=float, default=0.0, metavar="S",
                   help="how far toward the variation seed's noise, 0..1 (default 0: off)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the model's native size)")
    p.add_argument("--height", type=int, help="image height in pixels (default: the model's native size)")
    p.add_argument("--batch", type=int, default=1, help="number of images (default 1)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0: deterministic)")
    p.add_argument("--clip-skip", type=int, default=1, help="A1111 'Clip skip' (default 1: last layer)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="the networks' dtype (default auto: bfloat16 on a CPU with native bf16, float16 on CUDA, "
                        "else float32; latents stay float32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--memory-budget", metavar="SIZE",
                   help="refuse work needing more memory than this, e.g. 6G (default: 80%% of the free memory)")
    p.add_argument("--compile", action="store_true",
                   help="compile the UNet with torch.compile (the first image pays minutes of compile time)")
    p.add_argument("--cache-interval", type=int, default=1, metavar="N",
                   help="DeepCache: run the whole UNet once every N calls, reuse its deep features between (default 1: off)")
    p.add_argument("--tile-vae", action="store_true", help="encode/decode in overlapping tiles (large images)")
    p.add_argument("--preview", metavar="FILE",
                   help="live preview: write each step's predicted image (the batch side by side) to FILE, "
                        "overwritten as sampling goes; decoded by the model's tiny autoencoder when it has one")
    p.add_argument("--preview-every", type=int, default=1, metavar="N", help="preview every N steps (default 1)")
    p.add_argument("--preview-vae", metavar="PATH",
                   help="a tiny autoencoder (TAESD folder or taesd_decoder file) for the previews "
                        "(default: the model folder's taesd/, else the model's VAE)")
    p.add_argument("--out", default="out.png", help="output PNG; a batch writes NAME-0.png, NAME-1.png, ...")
    p.add_argument("--upscale", type=int, default=1, metavar="N",
                   help="also write an N-times larger nearest-neighbour copy for viewing (NAME.xN.png)")
    if strength is None:
        p.add_argument("--hires-scale", type=float, default=1.0, metavar="S",
                       help="hires fix: generate, upscale by S, refine at the large size (default 1: off)")
        p.add_argument("--hires-steps", type=int, metavar="N", help="steps of the hires pass (default: --steps)")
        p.add_argument("--hires-strength", type=float, default=0.7, help="denoising strength of the hires pass")
        p.add_argument("--hires-upscaler", default="latent", choices=["latent", "latent-nearest", "lanczos"])
    if strength is not None:
        if not outpaint:
            p.add_argument("--image", required=True, help="the input image")
        p.add_argument("--strength", type=float, default=strength,
                       help=f"how much to change the image, 0..1 (default {strength})")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``latentdiff: error: ...``, exit 2), like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"latentdiff: error: {self.prog.removeprefix('latentdiff ')}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="latentdiff", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"latentdiff {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    gen = commands.add_parser("generate", help="text to image")
    _add_generation_arguments(gen, None)
    gen.set_defaults(func=run_generate)
    i2i = commands.add_parser("img2img", help="image to image (SDEdit)")
    _add_generation_arguments(i2i, 0.75)
    i2i.set_defaults(func=run_generate)
    inp = commands.add_parser("inpaint", help="repaint the white part of a mask")
    _add_generation_arguments(inp, 1.0)
    inp.add_argument("--mask", required=True, help="mask image: white is repainted, black is kept")
    inp.add_argument("--no-paste-back", action="store_true", help="do not restore the kept pixels exactly")
    inp.set_defaults(func=run_generate)
    out = commands.add_parser("outpaint", help="extend an image's canvas and paint the new area")
    _add_generation_arguments(out, 1.0, outpaint=True)
    for side in ("left", "right", "top", "bottom"):
        out.add_argument(f"--{side}", type=int, default=0, metavar="PX", help=f"pixels to add on the {side}")
    out.add_argument("--fill", default="edge", choices=["edge", "noise"],
                     help="what the new area starts as: stretched border pixels (default) or noise")
    out.add_argument("--feather", type=int, default=8, metavar="PX",
                     help="how far the mask reaches into the old edge, blended (default 8; 0 keeps every old pixel)")
    out.set_defaults(func=run_generate)
    samplers = commands.add_parser("samplers", help="list the samplers")
    samplers.set_defaults(func=run_samplers)
    _add_vae_parser(commands)
    _add_explain_parser(commands)
    _add_eval_parser(commands)
    _add_serve_parser(commands)
    try:
        from .train.cli import add_train_parser
    except ImportError:  # training extras missing: the rest of the CLI still works
        pass
    else:
        add_train_parser(commands)
    return parser


def _add_serve_parser(commands) -> None:
    p = commands.add_parser("serve", help="serve AUTOMATIC1111's HTTP API and a web page (needs latentdiff[server])")
    p.add_argument("--model", help="model folder or file to start with (default: the built-in model)")
    p.add_argument("--port", type=int, default=7860, help="TCP port (default 7860)")
    p.add_argument("--listen", action="store_true", help="serve every network interface (needs --api-auth or --insecure)")
    p.add_argument("--insecure", action="store_true", help="allow --listen without --api-auth")
    p.add_argument("--api-auth", metavar="USER:PASS[,USER:PASS]", help="HTTP basic credentials (A1111's flag)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="another Host name clients may use (the DNS-rebinding guard allows loopback names only)")
    p.add_argument("--lora-dir", action="append", default=[], metavar="DIR", help="LoRAs for <lora:NAME:W> tags")
    p.add_argument("--embeddings-dir", metavar="DIR", help="textual-inversion embeddings to load")
    p.add_argument("--models-dir", metavar="DIR", help="more models (diffusers folders) clients may switch to")
    p.add_argument("--tokenizer", help="tokenizer folder for single-file checkpoints")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--queue", type=int, default=16, metavar="N", help="jobs that may wait (default 16; more: 503)")
    p.add_argument("--max-side", type=int, default=2048, metavar="PX", help="largest width / height a request may ask")
    p.add_argument("--max-steps", type=int, default=150, help="most steps a request may ask (default 150)")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from .errors import BadArgument

    try:
        import uvicorn

        from .serve.app import create_app
    except ImportError as err:
        raise BadArgument(f"latentdiff serve needs the server extra (pip install 'latentdiff[server]'): {err}") from None
    from .serve.config import ServeConfig, parse_api_auth

    config = ServeConfig(
        model=args.model, port=args.port, listen=args.listen, insecure=args.insecure,
        api_auth=parse_api_auth(args.api_auth) if args.api_auth else [], allowed_hosts=args.allowed_host,
        lora_dirs=[Path(d) for d in args.lora_dir], embeddings_dir=Path(args.embeddings_dir) if args.embeddings_dir else None,
        models_dir=Path(args.models_dir) if args.models_dir else None, tokenizer=args.tokenizer, dtype=args.dtype,
        queue_size=args.queue, max_side=args.max_side, max_steps=args.max_steps,
    )
    app = create_app(config)
    print(f"latentdiff serve: http://{'0.0.0.0' if args.listen else '127.0.0.1'}:{args.port}/ "
          f"({app.server.checkpoint.title}; A1111 API at /sdapi/v1)", file=sys.stderr)
    uvicorn.run(app, host=config.bind_host(), port=config.port, log_level="warning")
    return 0


def _add_vae_parser(commands) -> None:
    p = commands.add_parser("vae", help="encode and decode an image: original | reconstruction | |difference| x4")
    p.add_argument("image", help="the image (resized and centre-cropped to --size)")
    p.add_argument("--model", help="pipeline folder, VAE folder or file, or single-file checkpoint (default: built-in)")
    p.add_argument("--size", type=int, default=256, help="square side in pixels, a multiple of the VAE factor (default 256)")
    p.add_argument("--out", help="output PNG (default: IMAGE-vae.png beside the image)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.set_defaults(func=run_vae)


def _add_explain_parser(commands) -> None:
    p = commands.add_parser("explain", help="per-word cross-attention maps of a generation, and its x0 across the steps")
    p.add_argument("prompt")
    p.add_argument("--model", help="pipeline folder or single-file checkpoint (default: the built-in model)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--sampler", default="ddim", help="sampler (default ddim)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, help="image side (default: the model's native size)")
    p.add_argument("--out", default="explain.png", help="output PNG (default explain.png)")
    p.set_defaults(func=run_explain)


def run_explain(args: argparse.Namespace) -> int:
    import latentdiff

    pipe = latentdiff.load(args.model) if args.model else latentdiff.load()
    size = {"width": args.size, "height": args.size} if args.size else {}
    result = pipe.attention_maps(args.prompt, steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler,
                                 seed=args.seed, **size)
    path = result.save(args.out)
    for i, word in enumerate(result.words):
        x, y = result.peak(i)
        print(f"{word:>12}  peak at ({x}, {y})")
    print(path)
    return 0


def _add_eval_parser(commands) -> None:
    p = commands.add_parser("eval", help="FD / CLIP score (/ world judge) over guidance scales and samplers")
    p.add_argument("--prompts", default="builtin", help="'builtin' (Shapes World held-out prompts) or a text file, one prompt a line")
    p.add_argument("--guidance", default="1,3,7.5", help="comma-separated guidance scales (default 1,3,7.5)")
    p.add_argument("--samplers", default="ddim:20", help="comma-separated SAMPLER:STEPS (default ddim:20)")
    p.add_argument("--images-per-prompt", type=int, default=1, metavar="N", help="images per prompt (default 1)")
    p.add_argument("--n-prompts", type=int, metavar="K", help="use only the first K prompts")
    p.add_argument("--model", help="diffusers folder (default: the built-in model)")
    p.add_argument("--reference", help="real images for FD: a folder of images or a statistics .npz")
    p.add_argument("--reference-per-prompt", type=int, metavar="M",
                   help="built-in prompts: rendered reference scenes per prompt (default: images per prompt)")
    p.add_argument("--features", default="clip", help="FD features: clip (default) or inception:PATH (FID weights)")
    p.add_argument("--clip", help="CLIP model folder (transformers layout; default: the model's clip/)")
    p.add_argument("--seed", type=int, default=0, help="image g of every setting uses seed + g (default 0)")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--width", type=int, help="image width (default: the model's native size)")
    p.add_argument("--height", type=int, help="image height (default: the model's native size)")
    p.add_argument("--batch-size", type=int, default=8, help="images per generation batch (default 8)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu", help="torch device (default cpu; 'cuda' means cuda:LOCAL_RANK under torchrun)")
    p.add_argument("--cache-dir", help="where reference statistics are cached (default ~/.cache/latentdiff/reference)")
    p.add_argument("--grid-prompts", type=int, default=8, help="prompts (rows) in each grid (default 8)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run_eval)


def output_paths(out: str, count: int, upscale: int = 1) -> list[Path]:
    """``out.png`` for one image; ``out-0.png``, ``out-1.png``, ... for a batch (plus each one's
    ``.xN.png`` enlarged copy); every path checked as writable before any work starts."""
    from latentdiff.images import check_output_path

    path = check_output_path(out)
    if path.suffix.lower() != ".png":
        path = check_output_path(path.with_suffix(".png"))
    paths = [path] if count == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]
    if upscale > 1:
        paths += [p.with_name(f"{p.stem}.x{upscale}.png") for p in paths]
    return [check_output_path(p) for p in paths]


class _PreviewWriter:
    """``--preview FILE``: the step's x0 prediction, decoded by ``pipe.preview``, the batch side by
    side, written atomically every ``every`` steps and at the last one."""

    def __init__(self, pipe, path: Path, every: int) -> None:
        self.pipe, self.path, self.every = pipe, path, every

    def __call__(self, step: int, total: int, x0) -> None:
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo

        from latentdiff.checkpoints.io import atomic_path

        if (step + 1) % self.every and step + 1 != total:
            return
        images = self.pipe.preview(x0)
        strip = Image.new("RGB", (sum(i.width for i in images), images[0].height))
        for k, image in enumerate(images):
            strip.paste(image, (k * image.width, 0))
        info = PngInfo()
        info.add_text("preview", f"step {step + 1}/{total}")
        with atomic_path(self.path) as tmp:
            strip.save(tmp, format="PNG", pnginfo=info)


class _StepReport:
    """The progress bar of a generation, a one-line time estimate when the first step shows
    that the whole run will take more than about a minute, and the live preview if asked."""

    def __init__(self, command: str, note: str | None = None, preview: _PreviewWriter | None = None) -> None:
        self.command = command
        self.note = note  # printed at the first step, once every argument has proved good
        self.preview = preview
        self.bar = None
        self.start = 0.0
        self.step_seconds: float | None = None  # the second step's duration, once measured

    def __call__(self, step: int, total: int, x0) -> None:
        import time

        from tqdm import tqdm

        if self.bar is None:  # created at the first step, so that argument errors print one clean line
            if self.note:
                print(self.note, file=sys.stderr)
            self.bar = tqdm(total=total, desc=self.command, unit="step", leave=False)
            self.start = time.perf_counter()
        elif self.step_seconds is None:
            self.step_seconds = time.perf_counter() - self.start
            if self.step_seconds * total > LONG_RUN_SECONDS:
                print(f"latentdiff: this will take about {_duration(self.step_seconds * total)} "
                      f"({total} steps at {self.step_seconds:.1f} s each)", file=sys.stderr)
        if self.preview is not None:
            self.preview(step, total, x0)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


LONG_RUN_SECONDS = 60.0


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def generation_options(args: argparse.Namespace):
    """The :class:`~latentdiff.settings.GenerationOptions` of a generate/img2img/inpaint command line."""
    from latentdiff.settings import GenerationOptions

    return GenerationOptions(
        negative_prompt=args.negative, width=args.width, height=args.height, steps=args.steps,
        guidance_scale=args.guidance, sampler=args.sampler, schedule=args.schedule, seed=args.seed,
        subseed=args.subseed, subseed_strength=args.subseed_strength, images_per_prompt=args.batch, eta=args.eta,
        clip_skip=args.clip_skip, strength=getattr(args, "strength", None), vae_tiling=args.tile_vae,
        cache_interval=args.cache_interval,
        **({"hires_scale": args.hires_scale, "hires_steps": args.hires_steps, "hires_strength": args.hires_strength,
            "hires_upscaler": args.hires_upscaler} if args.command == "generate" else {}),
    )


def run_generate(args: argparse.Namespace) -> int:
    import torch

    import latentdiff
    from latentdiff import budget
    from latentdiff.errors import BadArgument
    from latentdiff.images import open_image
    from latentdiff.png import save_png
    from latentdiff.samplers import get_sampler

    fast_lora = apply_preset(args)
    try:  # an unknown sampler or schedule fails before the model loads
        get_sampler(args.sampler, args.schedule)
    except ValueError as err:
        raise BadArgument(str(err)) from None
    if not 1 <= args.upscale <= MAX_UPSCALE:
        raise BadArgument(f"--upscale must be in [1, {MAX_UPSCALE}], got {args.upscale}")
    limit = budget.memory_budget(args.memory_budget)
    max_pixels = budget.max_image_pixels(limit)
    image = open_image(args.image, what="image", max_pixels=max_pixels) if args.command != "generate" else None
    mask = open_image(args.mask, what="mask", max_pixels=max_pixels) if args.command == "inpaint" else None
    if mask is not None and mask.size != image.size:
        raise BadArgument(f"mask size {mask.size[0]}x{mask.size[1]} differs from image size "
                          f"{image.size[0]}x{image.size[1]}")
    size = image.size if image is not None else None
    if args.command == "outpaint":
        from latentdiff.outpaint import Extension, check_extension

        args.prompt, args.negative = outpaint_prompts(args.image, args.prompt, args.negative)
        if args.width is not None or args.height is not None:
            raise BadArgument("outpaint sets the size itself (the image plus --left/--right/--top/--bottom)")
        extension = Extension(args.left, args.right, args.top, args.bottom, args.fill, args.feather)
        size = check_extension(extension, image.size, 1).canvas_size(image.size)  # the VAE factor: once loaded
    options = generation_options(args)
    outputs = output_paths(args.out, args.batch, args.upscale)
    preview_path = output_paths(args.preview, 1)[0] if args.preview else None
    if args.preview_every < 1:
        raise BadArgument(f"--preview-every must be >= 1, got {args.preview_every}")
    check_lora_tags([args.prompt, args.negative], args.lora_dir)

    loras = [parse_lora_argument(text) for text in args.lora]
    pipe = latentdiff.load(args.model, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer, vae=args.vae,
                           lora_dirs=args.lora_dir, compile=args.compile, preview_vae=args.preview_vae)
    pipe.memory_budget = limit
    if fast_lora is not None:
        pipe.load_lora(fast_lora, name="lcm_lora")
    for path, weight in loras:
        pipe.load_lora(path, scale=weight)
    if args.embeddings_dir:
        load_embeddings_dir(pipe, args.embeddings_dir)
    if args.command == "outpaint":
        check_extension(extension, image.size, pipe.vae_factor)
    settings = pipe.settings(args.prompt, options, size=size)
    final = settings.hires_settings() if settings.hires_size else settings
    budget.check(pipe, final, extra_pixels=final.batch * final.width * final.height * args.upscale**2
                 if args.upscale > 1 else 0)
    note = None
    if args.dtype == "auto":
        hint = "" if pipe.dtype == torch.float32 else "; --dtype float32 for full precision"
        note = f"latentdiff: networks in {pipe.dtype_reason}{hint}"
    preview = _PreviewWriter(pipe, preview_path, args.preview_every) if preview_path else None
    report = _StepReport(args.command, note, preview)
    try:
        if args.command == "generate":
            images = pipe.txt2img(args.prompt, options, callback=report)
        elif args.command == "img2img":
            images = pipe.img2img(args.prompt, image, options, callback=report)
        elif args.command == "inpaint":
            images = pipe.inpaint(args.prompt, image, mask, options, callback=report, paste_back=not args.no_paste_back)
        else:
            images = pipe.outpaint(args.prompt, image, options, left=args.left, right=args.right, top=args.top,
                                   bottom=args.bottom, fill=args.fill, feather=args.feather, callback=report)
    finally:
        report.close()
    for image_out, path in zip(images, outputs):
        save_png(image_out, path)
        print(path)
    for image_out, big in zip(images, outputs[len(images):]):
        enlarged = image_out.resize((image_out.width * args.upscale, image_out.height * args.upscale), 0)
        save_png(enlarged, big, image_out.info.get("parameters"))
        print(big)
    return 0


MAX_UPSCALE = 64


def parse_lora_argument(text: str) -> tuple[Path, float]:
    """``FILE[:WEIGHT]`` -> (an existing file, weight); a trailing ``:number`` is the weight."""
    import math

    from latentdiff.errors import BadArgument, BadFile

    path, weight = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
            path = head
        except ValueError:
            pass  # a colon inside the path
    if not math.isfinite(weight):
        raise BadArgument(f"--lora {text}: the weight must be a finite number")
    if not Path(path).is_file():
        raise BadFile(f"--lora {text}: no such LoRA file {path}")
    return Path(path), weight


def outpaint_prompts(image: str, prompt: str | None, negative: str | None) -> tuple[str, str]:
    """The prompt and negative prompt of ``outpaint``: as given, else the image's own (from its
    A1111 ``parameters`` text), else empty."""
    from latentdiff.png import parse_parameters, read_parameters

    theirs_prompt, theirs_negative = "", ""
    if prompt is None or negative is None:
        try:
            theirs_prompt, theirs_negative = parse_parameters(read_parameters(image) or "")
        except OSError:  # not readable as an image: open_image has reported it already
            pass
    return (theirs_prompt if prompt is None else prompt), (theirs_negative if negative is None else negative)


def check_lora_tags(texts: list[str], folders: list[str]) -> None:
    """Refuse a malformed ``<lora:...>`` tag, or one naming no file, before the model loads."""
    from latentdiff.adapters.prompt_loras import find_lora, parse_tags

    for text in texts:
        for tag in parse_tags(text):
            find_lora(tag.name, [Path(f) for f in folders])


def load_embeddings_dir(pipe, folder: str) -> list[str]:
    """Load every embedding file in ``folder`` (sorted by name); returns the trigger names."""
    from latentdiff.errors import BadFile

    directory = Path(folder)
    if not directory.is_dir():
        raise BadFile(f"--embeddings-dir {folder} is not a folder")
    from latentdiff.adapters.embeddings import embedding_files

    return [pipe.load_textual_inversion(p) for p in embedding_files(directory)]


def run_samplers(args: argparse.Namespace) -> int:
    from latentdiff.samplers import SAMPLERS
    from latentdiff.schedule import SIGMA_SCHEDULES

    width = max(len(s.id) for s in SAMPLERS.values())
    for spec in SAMPLERS.values():
        reference = f"diffusers {spec.diffusers_class}" if spec.diffusers_class else "k-diffusion"
        schedules = ", ".join(spec.schedules) or "-"
        print(f"{spec.id:<{width}}  {spec.name:<14} schedules: {schedules:<34} ({reference})")
    print(f"schedule types (--schedule, or a name suffix as in 'DPM++ 2M Karras'): {', '.join(SIGMA_SCHEDULES)}")
    return 0


def run_vae(args: argparse.Namespace) -> int:
    from latentdiff.eval.vae_demo import run_vae_demo

    demo, path = run_vae_demo(args.image, model=args.model, size=args.size, out=args.out, device=args.device)
    print(demo.summary())
    print(path)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from latentdiff.eval.config import EvalConfig, parse_guidance, parse_samplers
    from latentdiff.eval.run import run_eval as evaluate

    config = EvalConfig(
        out=args.out, prompts=args.prompts, guidance=parse_guidance(args.guidance), samplers=parse_samplers(args.samplers),
        images_per_prompt=args.images_per_prompt, n_prompts=args.n_prompts, model=args.model, reference=args.reference,
        reference_per_prompt=args.reference_per_prompt, features=args.features, clip=args.clip, seed=args.seed,
        negative=args.negative, width=args.width, height=args.height, batch_size=args.batch_size, device=args.device,
        dtype=args.dtype, cache_dir=args.cache_dir, grid_prompts=args.grid_prompts,
    )
    metrics = evaluate(config)
    if metrics is not None:  # rank 0 (or a single process)
        name = metrics["fd_name"]
        for r in metrics["results"]:
            world = r.get("world")
            acc = f"  caption accuracy {100 * world['caption']:.1f}%" if world and world.get("caption") is not None else ""
            print(f"{r['setting']:<16} {name} {r['fd']:.3f}  CLIP score {r['clip_score']:.2f}{acc}")
        print(Path(args.out) / "report.md")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input, with one line on stderr)."""
    from .errors import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:  # bad input: one line; anything else is a bug and keeps its traceback
        print(f"latentdiff: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("latentdiff: interrupted", file=sys.stderr)
        return 130


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
