"""The FastAPI app: A1111's ``/sdapi/v1`` routes, the page at ``/``, JSON errors.

    app = create_app(ServeConfig(model=None))   # the built-in model
    uvicorn.run(app, host="127.0.0.1", port=7860)

Every generation and every model switch is a job on one :class:`~.jobs.JobQueue`, so the
pipeline runs one call at a time while ``/progress``, ``/interrupt`` and the rest answer at
once. Errors are JSON ``{"error", "detail"}``: 4xx for the client's faults (422 for a bad
field, named), 503 when the queue is full or the machine is out of memory.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException
from torch import Tensor

from .. import budget
from ..checkpoints.errors import CheckpointError
from ..errors import BadArgument, OutOfBudget, UserError
from ..images import image_from_bytes
from ..models.taesd import preview
from ..samplers import SAMPLERS, SamplingCancelled
from ..schedule import SIGMA_SCHEDULES
from . import a1111
from .config import ServeConfig
from .jobs import CancelledJob, Job, JobQueue, Progress, QueueFull
from .models import Catalogue, Checkpoint
from .security import Guard

STATIC = Path(__file__).parent / "static"


class ClientError(Exception):
    """An error answered with ``status`` and ``{error, detail}``."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


class Server:
    """The loaded model, the catalogue, the queue and the options A1111 clients read and set."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.catalogue = Catalogue(config.model, config.models_dir, list(config.lora_dirs),
                                   config.embeddings_dir, config.tokenizer)
        self.queue = JobQueue(config.queue_size)
        self.options: dict[str, Any] = {"CLIP_stop_at_last_layers": 1, "samples_format": "png"}
        self.checkpoint: Checkpoint = self.catalogue.checkpoints[0]
        self.pipe = self._load(self.checkpoint)
        self._preview_lock = threading.Lock()
        self._preview: tuple[Tensor | None, str | None] = (None, None)  # (x0, its PNG) last shown

    def _load(self, checkpoint: Checkpoint):
        import latentdiff

        pipe = latentdiff.load(checkpoint.path, dtype=self.config.dtype, tokenizer=self.config.tokenizer,
                               lora_dirs=self.config.lora_dirs)
        for path in self.catalogue.embedding_files():
            pipe.load_textual_inversion(path)
        return pipe

    def switch(self, checkpoint: Checkpoint) -> None:
        """Load ``checkpoint`` (run inside a job: never while another generates)."""
        if checkpoint.path.resolve() != self.checkpoint.path.resolve():
            self.pipe = self._load(checkpoint)
            self.checkpoint = checkpoint

    def options_view(self) -> dict[str, Any]:
        return {**self.options, "sd_model_checkpoint": self.checkpoint.title,
                "sd_checkpoint_hash": self.checkpoint.sha256,
                "latentdiff_native_size": self.pipe.native_size, "latentdiff_vae_factor": self.pipe.vae_factor}

    # ---- generation --------------------------------------------------------------------
    def generate(self, req: a1111.GenerationRequest, progress: Progress, plan: a1111.Plan,
                 image: Image.Image | None, mask: Image.Image | None) -> dict[str, Any]:
        """Run one request's n_iter batches (in the queue's worker)."""
        if plan.checkpoint is not None:
            self.switch(self.catalogue.find(plan.checkpoint))
        pipe = self.pipe
        images: list[Image.Image] = []
        settings_list, seeds, subseeds = [], [], []
        for k in range(plan.n_iter):
            progress.job_no = k
            options = plan.batch_options(k)
            settings = pipe.settings(plan.prompt, options, size=image.size if image is not None else None)
            try:  # the pipeline checks the memory budget itself (OutOfBudget: the job's error)
                out = self._run_one(pipe, plan.prompt, options, image, mask, progress, req)
            except SamplingCancelled:
                if progress.cancelled:
                    raise CancelledJob("the client went away") from None
                out = self._partial(pipe, settings, progress)
            images += out
            settings_list.append(settings)
            seeds += list(settings.seeds)
            subseeds += list(settings.subseeds or [plan.subseed + i for i in range(settings.batch)])
            if progress.interrupted:
                break
            progress.skipped = False
        return {"images": images, "settings": settings_list, "seeds": seeds, "subseeds": subseeds}

    def _run_one(self, pipe, prompt, options, image, mask, progress: Progress, req) -> list[Image.Image]:
        if image is None:
            return pipe.txt2img(prompt, options, callback=progress.callback)
        if mask is None:
            return pipe.img2img(prompt, image, options, callback=progress.callback)
        box = a1111.full_res_box(mask, req.inpaint_full_res_padding, image.size) if req.inpaint_full_res else None
        if box is None or box == (0, 0, *image.size):
            return pipe.inpaint(prompt, image, mask, options, callback=progress.callback)
        crop_size = (box[2] - box[0], box[3] - box[1])
        target = image.size  # the crop is inpainted at the request's size, then pasted back
        out = pipe.inpaint(prompt, image.crop(box).resize(target, Image.LANCZOS),
                           mask.crop(box).resize(target, Image.LANCZOS), options, callback=progress.callback)
        results = []
        for piece in out:
            whole = image.convert("RGB").copy()
            whole.paste(piece.resize(crop_size, Image.LANCZOS), box[:2], mask.crop(box))
            whole.info["parameters"] = piece.info.get("parameters", "")
            results.append(whole)
        return results

    @staticmethod
    def _partial(pipe, settings, progress: Progress) -> list[Image.Image]:
        """An interrupted or skipped batch: its last x0 prediction, decoded by the model's VAE."""
        if progress.x0 is None:
            return []
        images = preview(pipe.vae, progress.x0)
        for i, im in enumerate(images):
            im.info["parameters"] = settings.infotext(i)
        return images

    def current_image(self) -> str | None:
        """The running job's latest x0 prediction as a base64 PNG, decoded once per sampling step
        however often clients poll (the web page and A1111 clients poll several times a second)."""
        job = self.queue.current
        if job is None or job.progress.x0 is None:
            return None
        x0 = job.progress.x0
        with self._preview_lock:
            if self._preview[0] is not x0:  # the step callback hands over a new tensor each step
                with torch.no_grad():
                    shown = self.pipe.preview(x0[:1])[0]
                self._preview = (x0, a1111.encode_png(shown))
            return self._preview[1]


def create_app(config: ServeConfig) -> Guard:
    """The ASGI app for ``config`` (validated; the model is loaded now): FastAPI behind the
    :class:`~.security.Guard`; ``app.server`` is the :class:`Server`."""
    config.validate()
    server = Server(config)
    app = FastAPI(title="latentdiff", docs_url="/docs", redoc_url=None)
    app.state.server = server

    # ---- errors as JSON {error, detail} ------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, err: RequestValidationError) -> JSONResponse:
        problems = []
        for item in err.errors():
            where = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "body"
            problems.append(f"{where}: {item.get('msg', 'invalid')}")
        return JSONResponse({"error": "ValidationError", "detail": "; ".join(problems)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": "HTTPError", "detail": str(err.detail)}, status_code=err.status_code)

    @app.exception_handler(ClientError)
    async def _client(_request: Request, err: ClientError) -> JSONResponse:
        return JSONResponse({"error": err.error, "detail": err.detail}, status_code=err.status)

    def answer_error(err: BaseException) -> ClientError:
        if isinstance(err, QueueFull):
            return ClientError(503, "QueueFull", str(err))
        if isinstance(err, OutOfBudget):
            return ClientError(507, "OutOfBudget", str(err))
        if isinstance(err, (BadArgument, UserError, CheckpointError, ValueError)):
            return ClientError(422, "BadRequest", str(err))
        if isinstance(err, MemoryError) or "out of memory" in str(err).lower():
            return ClientError(503, "OutOfMemory", f"the machine ran out of memory: {err}")
        return ClientError(500, type(err).__name__, str(err) or "internal error")

    async def run_job(request: Request, job: Job) -> Any:
        """Queue ``job`` and wait for it; a client that disconnects cancels it."""
        try:
            server.queue.submit(job)
        except QueueFull as err:
            raise answer_error(err) from None
        while not job.done.is_set():
            await asyncio.to_thread(job.done.wait, 0.2)
            if not job.done.is_set() and await request.is_disconnected():
                server.queue.cancel(job)
                await asyncio.to_thread(job.done.wait)
        if job.error is not None:
            raise answer_error(job.error)
        return job.result

    def max_pixels() -> int:
        return budget.max_image_pixels(budget.memory_budget(server.pipe.memory_budget))

    async def generate(request: Request, req: a1111.GenerationRequest, plan: a1111.Plan,
                       image: Image.Image | None, mask: Image.Image | None, label: str) -> dict:
        """Check ``plan`` against the current model (a fast 4xx for bad input), queue it, answer."""
        try:
            if plan.checkpoint is not None:
                server.catalogue.find(plan.checkpoint)  # another model: checked when it is loaded
            else:
                settings = server.pipe.settings(plan.prompt, plan.options, size=image.size if image else None)
                budget.check(server.pipe, settings.hires_settings() if settings.hires_size else settings)
        except UserError as err:
            raise answer_error(err) from None
        job = Job(lambda progress: server.generate(req, progress, plan, image, mask), n_iter=plan.n_iter, label=label)
        result = await run_job(request, job)
        images = result["images"]
        return {
            "images": [a1111.encode_png(im) for im in images] if req.send_images else [],
            "parameters": a1111.parameters_of(req, plan),
            "info": a1111.info_json(plan, result["settings"], images, result["seeds"], result["subseeds"],
                                    server.checkpoint, req, job.timestamp),
        }

    # ---- generation routes ---------------------------------------------------------------
    @app.post("/sdapi/v1/txt2img")
    async def txt2img(req: a1111.Txt2ImgRequest, request: Request) -> dict:
        try:
            plan = a1111.plan_request(req, config, clip_skip=server.options["CLIP_stop_at_last_layers"])
        except UserError as err:
            raise answer_error(err) from None
        return await generate(request, req, plan, None, None, "txt2img")

    @app.post("/sdapi/v1/img2img")
    async def img2img(req: a1111.Img2ImgRequest, request: Request) -> dict:
        try:
            if not req.init_images:
                raise BadArgument("init_images must hold one base64 image")
            image = a1111.decode_image(req.init_images[0], "init_images[0]", max_pixels()).convert("RGB")
            size = (req.width or image.width, req.height or image.height)
            image = a1111.resize_to(image, size, req.resize_mode)
            mask = None
            if req.mask:
                mask = a1111.prepare_mask(a1111.decode_image(req.mask, "mask", max_pixels()), size, req)
            plan = a1111.plan_request(req, config, strength=req.denoising_strength, default_size=size,
                                      clip_skip=server.options["CLIP_stop_at_last_layers"])
            if mask is not None:
                image = a1111.fill_masked(image, mask, req.inpainting_fill, plan.seed)
        except UserError as err:
            raise answer_error(err) from None
        return await generate(request, req, plan, image, mask, "img2img")

    # ---- state -----------------------------------------------------------------------------
    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False) -> dict:
        job = server.queue.current
        p = job.progress if job is not None else None
        fraction = p.fraction(job.n_iter) if p is not None else 0.0
        elapsed = time.monotonic() - p.started if p is not None else 0.0
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        image = None if skip_current_image else await asyncio.to_thread(server.current_image)
        return {
            "progress": fraction, "eta_relative": eta,
            "state": {"skipped": bool(p and p.skipped), "interrupted": bool(p and p.interrupted),
                      "job": f"job {job.id}" if job else "", "job_count": server.queue.job_count,
                      "job_timestamp": job.timestamp if job else "0", "job_no": p.job_no if p else 0,
                      "sampling_step": p.step if p else 0, "sampling_steps": p.total if p else 0},
            "current_image": image, "textinfo": job.label if job else None, "current_task": None,
        }

    @app.post("/sdapi/v1/interrupt")
    async def interrupt() -> dict:
        server.queue.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip() -> dict:
        server.queue.skip()
        return {}

    @app.get("/sdapi/v1/options")
    async def get_options() -> dict:
        return server.options_view()

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise ClientError(422, "BadRequest", "the body must be a JSON object of options") from None
        if not isinstance(body, dict):
            raise ClientError(422, "BadRequest", "the body must be a JSON object of options")
        body = dict(body)
        wanted = body.pop("sd_model_checkpoint", None)
        if "CLIP_stop_at_last_layers" in body and (not isinstance(body["CLIP_stop_at_last_layers"], int)
                                                   or isinstance(body["CLIP_stop_at_last_layers"], bool)):
            raise ClientError(422, "BadRequest", "CLIP_stop_at_last_layers must be an integer")
        if wanted is not None:
            try:
                checkpoint = server.catalogue.find(wanted)
            except UserError as err:
                raise answer_error(err) from None
            await run_job(request, Job(lambda _p: server.switch(checkpoint), label="load model"))
        server.options.update(body)
        return server.options_view()

    @app.get("/sdapi/v1/sd-models")
    async def sd_models() -> list:
        return [c.as_a1111() for c in server.catalogue.checkpoints]

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints() -> dict:
        await asyncio.to_thread(server.catalogue.refresh)
        return {}

    @app.post("/sdapi/v1/refresh-loras")
    async def refresh_loras() -> dict:
        return {}

    @app.get("/sdapi/v1/samplers")
    async def samplers() -> list:
        return [{"name": s.name, "aliases": [s.id], "options": {"scheduler": ",".join(s.schedules)}}
                for s in SAMPLERS.values()]

    @app.get("/sdapi/v1/schedulers")
    async def schedulers() -> list:
        rows = [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False}]
        rows += [{"name": key, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
                 for key, label in SIGMA_SCHEDULES.items()]
        return rows

    @app.get("/sdapi/v1/loras")
    async def loras() -> list:
        return server.catalogue.loras()

    @app.get("/sdapi/v1/embeddings")
    async def embeddings() -> dict:
        loaded = {name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                         "shape": int(vectors.shape[-1]), "vectors": int(vectors.shape[0])}
                  for name, vectors in server.pipe.embeddings.items()}
        return {"loaded": loaded, "skipped": {}}

    @app.get("/sdapi/v1/scripts")
    async def scripts() -> dict:
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/memory")
    async def memory() -> dict:
        # A1111's "used" is the server process' resident memory; "free" here is what it could still
        # allocate (the smaller of the system's available memory and the cgroup's headroom).
        ram = {"free": budget.available_memory(), "used": budget.process_memory(), "total": budget.total_memory()}
        cuda = ({"system": {"free": torch.cuda.mem_get_info()[0], "total": torch.cuda.mem_get_info()[1]}}
                if torch.cuda.is_available() else {"error": "no CUDA device"})
        return {"ram": ram, "cuda": cuda}

    @app.post("/sdapi/v1/png-info")
    async def png_info(req: a1111.PngInfoRequest) -> dict:
        try:
            data = a1111.decode_base64(req.image, "image")
            image = image_from_bytes(data, what="image", max_pixels=max_pixels())
        except UserError as err:
            raise answer_error(err) from None
        items = await asyncio.to_thread(_png_text, data)
        text = items.get("parameters", "")
        return {"info": text, "items": items, "parameters": a1111.parse_infotext(text) if text else {},
                "size": list(image.size)}

    # ---- the page ----------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    guarded = Guard(app, config)
    guarded.server = server  # type: ignore[attr-defined]
    return guarded  # type: ignore[return-value]


def _png_text(data: bytes) -> dict[str, str]:
    """The text chunks of an image file's bytes (already checked by image_from_bytes)."""
    with Image.open(io.BytesIO(data)) as image:
        return {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
