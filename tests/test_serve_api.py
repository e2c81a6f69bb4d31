"""``latentdiff serve`` driven as users drive it: the webuiapi client (txt2img, img2img, inpainting,
model switch, progress, interrupt), the queue (FIFO, bounded, 50 concurrent requests, a client
that leaves, a failed job), the safety checks, and a corpus of bad input (each a 4xx with a
detail, the server still up)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

pytest.importorskip("fastapi")
webuiapi = pytest.importorskip("webuiapi")

import latentdiff  # noqa: E402
from latentdiff.serve.config import ServeConfig  # noqa: E402
from serve_helpers import live_server  # noqa: E402

PROMPT = "a large red circle in the center on a white background"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, diffusers_dir) -> Path:
    folder = tmp_path_factory.mktemp("models")
    shutil.copytree(diffusers_dir, folder / "tiny-sd")
    return folder


@pytest.fixture(scope="module")
def served(models_dir):
    with live_server(models_dir=models_dir, queue_size=8) as (url, app):
        yield url, app


@pytest.fixture()
def api(served):
    url, app = served
    port = int(url.rsplit(":", 1)[1])
    return webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler", steps=8)


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


# ----------------------------------------------------------------------------- webuiapi
def test_txt2img_through_webuiapi_equals_the_library(api, served) -> None:
    _, app = served
    result = api.txt2img(prompt=PROMPT, negative_prompt="blurry", seed=11, steps=8, cfg_scale=7.5,
                         width=64, height=64, batch_size=2)
    assert [im.size for im in result.images] == [(64, 64), (64, 64)]
    info = result.info
    assert info["all_seeds"] == [11, 12] and info["sd_model_name"] == "shapes-v2"
    assert info["infotexts"][0].startswith(PROMPT + "\nNegative prompt: blurry\nSteps: 8, Sampler: Euler")
    assert result.images[0].info["parameters"] == info["infotexts"][0]  # the PNG carries its infotext
    assert result.parameters["seed"] == 11 and result.parameters["steps"] == 8
    expected = app.server.pipe.txt2img(PROMPT, negative_prompt="blurry", seed=11, steps=8, guidance_scale=7.5,
                                       sampler="Euler", images_per_prompt=2)
    assert all(same_pixels(a, b) for a, b in zip(result.images, expected))


def test_seed_minus_one_is_random_and_recorded(api) -> None:
    result = api.txt2img(prompt=PROMPT, seed=-1, width=64, height=64, steps=2, n_iter=2)
    seeds = result.info["all_seeds"]
    assert len(seeds) == 2 and seeds[1] == seeds[0] + 1 and f"Seed: {seeds[0]}" in result.info["infotexts"][0]


def test_img2img_and_inpainting_through_webuiapi(api, served) -> None:
    _, app = served
    init = api.txt2img(prompt=PROMPT, seed=1, width=64, height=64).images[0]
    out = api.img2img(images=[init], prompt="a large blue circle in the center on a white background",
                      denoising_strength=0.6, seed=2, width=64, height=64)
    expected = app.server.pipe.img2img("a large blue circle in the center on a white background", init.convert("RGB"),
                                       strength=0.6, seed=2, steps=8, guidance_scale=7.0, sampler="Euler")
    assert same_pixels(out.images[0], expected[0])
    assert "Denoising strength: 0.6" in out.info["infotexts"][0]

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    whole = api.img2img(images=[init], mask_image=mask, prompt="a large green square in the center on a white background",
                        denoising_strength=1.0, seed=3, width=64, height=64, inpaint_full_res=False, mask_blur=0,
                        inpainting_fill=1)
    expected = app.server.pipe.inpaint("a large green square in the center on a white background", init.convert("RGB"),
                                       mask, strength=1.0, seed=3, steps=8, guidance_scale=7.0, sampler="Euler")
    assert same_pixels(whole.images[0], expected[0])
    outside = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(whole.images[0])[outside], np.asarray(init.convert("RGB"))[outside])
    # "only masked": the crop is inpainted at full size and pasted back; the rest stays exactly
    cropped = api.img2img(images=[init], mask_image=mask, prompt="a small yellow triangle", denoising_strength=1.0,
                          seed=3, width=64, height=64, inpaint_full_res=True, inpaint_full_res_padding=0, mask_blur=0)
    assert np.array_equal(np.asarray(cropped.images[0])[outside], np.asarray(init.convert("RGB"))[outside])
    assert not same_pixels(cropped.images[0], init)


def test_model_list_and_switch(api) -> None:
    models = api.get_sd_models()
    titles = [m["title"] for m in models]
    assert len(titles) == 2 and titles[0].startswith("shapes-v2 [") and titles[1].startswith("tiny-sd [")
    assert all(len(m["hash"]) == 10 and m["sha256"].startswith(m["hash"]) for m in models)
    assert api.util_get_current_model() == titles[0]
    api.util_set_model(titles[1])
    try:
        assert api.util_get_current_model() == titles[1]
        out = api.txt2img(prompt="a cat", width=16, height=16, steps=2, seed=0)
        assert out.images[0].size == (16, 16) and out.info["sd_model_name"] == "tiny-sd"
    finally:
        api.util_set_model(titles[0])
    assert api.util_get_current_model() == titles[0]
    with pytest.raises(RuntimeError, match="not a known model"):
        api.txt2img(prompt="x", override_settings={"sd_model_checkpoint": "no-such-model"})


def test_progress_preview_and_interrupt(api, served) -> None:
    url, _ = served
    done: dict = {}
    worker = threading.Thread(target=lambda: done.update(r=api.txt2img(prompt=PROMPT, steps=150, seed=4, width=64,
                                                                        height=64, sampler_name="DDIM", cfg_scale=7.5)))
    worker.start()
    state = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = api.get_progress()
        if state["state"]["sampling_step"] >= 3 and state["current_image"]:
            break
        time.sleep(0.05)
    assert state["state"]["sampling_steps"] == 150 and 0 < state["progress"] < 1 and state["state"]["job_count"] == 1
    preview = Image.open(io.BytesIO(base64.b64decode(state["current_image"])))
    assert preview.size == (64, 64)
    assert api.interrupt() == {}
    worker.join(30)
    result = done["r"]
    assert len(result.images) == 1 and result.images[0].size == (64, 64)  # what it had when interrupted
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None
    assert requests.post(f"{url}/sdapi/v1/skip").json() == {}


def test_progress_decodes_each_steps_preview_once(served, monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients poll /progress several times a second; the VAE decodes a step's x0 once."""
    from latentdiff.serve.jobs import Job

    server = served[1].server
    decoded = []
    real = server.pipe.preview
    monkeypatch.setattr(server.pipe, "preview", lambda x0: decoded.append(x0) or real(x0))
    job = Job(lambda progress: None)
    monkeypatch.setattr(server.queue, "current", job)
    channels = server.pipe.unet.config.in_channels
    job.progress.callback(0, 10, torch.zeros(1, channels, 8, 8))
    first = server.current_image()
    assert server.current_image() == first and len(decoded) == 1
    job.progress.callback(1, 10, torch.ones(1, channels, 8, 8))
    assert server.current_image() != first and len(decoded) == 2


def test_options_samplers_schedulers_png_info_and_lists(api, served) -> None:
    url, _ = served
    options = api.get_options()
    assert options["sd_model_checkpoint"].startswith("shapes-v2") and options["latentdiff_native_size"] == 64
    body = {"prompt": PROMPT, "seed": 9, "width": 64, "height": 64, "steps": 2}
    assert api.set_options({"CLIP_stop_at_last_layers": 2})["CLIP_stop_at_last_layers"] == 2
    try:
        skipped = requests.post(f"{url}/sdapi/v1/txt2img", json=body).json()
        assert "Clip skip: 2" in json.loads(skipped["info"])["infotexts"][0]
    finally:
        api.set_options({"CLIP_stop_at_last_layers": 1})
    names = {s["name"] for s in api.get_samplers()}
    assert {"Euler", "Euler a", "DDIM", "DPM++ 2M", "LCM"} <= names
    assert [s["name"] for s in api.get_schedulers()][:2] == ["automatic", "karras"]
    image = api.txt2img(prompt=PROMPT, seed=9, width=64, height=64, steps=2).images[0]
    info = api.png_info(image).info
    assert info.startswith(PROMPT) and "Seed: 9" in info
    assert api.get_loras() == [] and api.get_embeddings() == {"loaded": {}, "skipped": {}}
    ram = api.get_memory()["ram"]  # "used" is this (in-process) server's resident memory, as A1111's
    # read independently of budget.process_memory (statm): the kernel's VmRSS line, in KiB
    rss = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    # the same process read moments apart: within 5% (the whole system's used memory is not)
    assert abs(ram["used"] - rss) <= 0.05 * rss and rss < ram["total"] and 0 < ram["free"] < ram["total"]
    assert requests.post(f"{url}/sdapi/v1/refresh-checkpoints").status_code == 200


# ----------------------------------------------------------------------------- the queue
def test_fifo_bounded_queue_under_50_concurrent_requests(served) -> None:
    url, app = served
    queue = app.server.queue
    start = len(queue.history)
    body = {"prompt": PROMPT, "steps": 4, "width": 64, "height": 64}

    def call(i: int) -> int:
        return requests.post(f"{url}/sdapi/v1/txt2img", json={**body, "seed": i}, timeout=120).status_code

    with ThreadPoolExecutor(50) as pool:
        statuses = list(pool.map(call, range(50)))
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 9  # the running one + 8 waiting at least
    ran = list(queue.history)[start:]
    assert len(ran) == statuses.count(200)  # every accepted request ran, none lost
    assert ran == sorted(ran)  # first in, first out
    assert requests.get(f"{url}/sdapi/v1/progress").json()["state"]["job_count"] == 0


def test_a_full_queue_answers_503_with_a_detail(served) -> None:
    url, app = served
    queue = app.server.queue
    gate = threading.Event()
    from latentdiff.serve.jobs import Job, QueueFull

    blocker = queue.submit(Job(lambda _p: gate.wait(30)))
    while queue.current is not blocker:
        time.sleep(0.01)
    fillers = []
    try:
        while True:
            try:
                fillers.append(queue.submit(Job(lambda _p: None)))
            except QueueFull:
                break
        r = requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64, "steps": 1})
        assert r.status_code == 503 and r.json()["error"] == "QueueFull" and "full" in r.json()["detail"]
    finally:
        gate.set()
        blocker.done.wait(10)
        for job in fillers:
            job.done.wait(10)


def test_a_client_that_leaves_cancels_its_job(served) -> None:
    from latentdiff.serve.jobs import CancelledJob

    url, app = served
    queue = app.server.queue
    outcome: list = []

    def leave_early() -> None:
        try:
            requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 150, "width": 64, "height": 64,
                                                           "batch_size": 8, "sampler_name": "DDIM"}, timeout=1.0)
        except requests.exceptions.ReadTimeout as err:
            outcome.append(err)

    client = threading.Thread(target=leave_early)
    client.start()
    job = None
    while job is None and client.is_alive():
        job = queue.current
        time.sleep(0.01)
    client.join(10)
    assert outcome and job is not None
    assert job.done.wait(10)
    assert isinstance(job.error, CancelledJob) and job.progress.step < 150  # stopped, not run to the end
    assert queue.job_count == 0


def test_a_failed_job_answers_an_error_and_the_next_runs(served) -> None:
    url, app = served
    pipe = app.server.pipe
    pipe.memory_budget = "1M"
    try:
        r = requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2, "width": 64, "height": 64})
        assert r.status_code == 507 and r.json()["error"] == "OutOfBudget"
    finally:
        pipe.memory_budget = None
    from latentdiff.serve.jobs import Job

    boom = app.server.queue.submit(Job(lambda _p: (_ for _ in ()).throw(MemoryError("simulated"))))
    boom.done.wait(10)
    r = requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2, "width": 64, "height": 64})
    assert r.status_code == 200 and len(r.json()["images"]) == 1


# ----------------------------------------------------------------------------- safety
def test_listen_needs_auth() -> None:
    from latentdiff.errors import BadArgument

    with pytest.raises(BadArgument, match="--api-auth"):
        ServeConfig(listen=True).validate()
    ServeConfig(listen=True, insecure=True).validate()


def test_auth_host_origin_and_body_cap() -> None:
    with live_server(api_auth=[("ann", "s3cret")], max_body_bytes=4096) as (url, _):
        assert requests.get(f"{url}/sdapi/v1/options").status_code == 401
        assert requests.get(f"{url}/sdapi/v1/options", auth=("ann", "wrong")).status_code == 401
        assert requests.get(f"{url}/sdapi/v1/options", auth=("ann", "s3cret")).status_code == 200
        assert requests.get(f"{url}/", auth=("ann", "s3cret")).status_code == 200
        r = requests.get(f"{url}/sdapi/v1/options", auth=("ann", "s3cret"), headers={"Host": "evil.example:7860"})
        assert r.status_code == 403 and r.json()["error"] == "ForbiddenHost"
        r = requests.post(f"{url}/sdapi/v1/interrupt", auth=("ann", "s3cret"), headers={"Origin": "https://evil.example"})
        assert r.status_code == 403 and r.json()["error"] == "ForbiddenOrigin"
        same = url.removeprefix("http://")
        assert requests.post(f"{url}/sdapi/v1/interrupt", auth=("ann", "s3cret"),
                             headers={"Origin": f"http://{same}"}).status_code == 200
        r = requests.post(f"{url}/sdapi/v1/txt2img", auth=("ann", "s3cret"), data=b"x" * 5000,
                          headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"] == "PayloadTooLarge"

        def chunks():
            for _ in range(10):
                yield b" " * 1000

        r = requests.post(f"{url}/sdapi/v1/txt2img", auth=("ann", "s3cret"), data=chunks(),
                          headers={"content-type": "application/json"})
        assert r.status_code == 413


PNG = b64(Image.new("RGB", (64, 64), (255, 0, 0)))


def huge_header_png(side: int = 60000) -> str:
    """A small valid PNG whose header claims side x side pixels (a decompression bomb)."""
    import zlib

    raw = base64.b64decode(PNG)
    ihdr = b"IHDR" + side.to_bytes(4, "big") * 2 + raw[24:29]
    patched = raw[:12] + ihdr + zlib.crc32(ihdr).to_bytes(4, "big") + raw[33:]
    return base64.b64encode(patched).decode()


HUGE_HEADER = huge_header_png()
BAD_INPUTS = [
    ("txt2img", {"prompt": 5}, "prompt"),
    ("txt2img", {"width": "wide"}, "width"),
    ("txt2img", {"width": 100000}, "width"),
    ("txt2img", {"width": 63}, "width"),
    ("txt2img", {"height": 0}, "height"),
    ("txt2img", {"steps": 0}, "steps"),
    ("txt2img", {"steps": 10**9}, "steps"),
    ("txt2img", {"batch_size": 1000}, "batch_size"),
    ("txt2img", {"n_iter": 1000}, "n_iter"),
    ("txt2img", {"cfg_scale": "nan"}, "guidance_scale"),
    ("txt2img", {"cfg_scale": 1e300}, "guidance_scale"),
    ("txt2img", {"sampler_name": "Nonexistent"}, "Nonexistent"),
    ("txt2img", {"scheduler": "Polyexponential"}, "Polyexponential"),
    ("txt2img", {"seed": 2**40}, "seed"),
    ("txt2img", {"subseed_strength": 2}, "subseed_strength"),
    ("txt2img", {"enable_hr": True, "hr_upscaler": "ESRGAN_4x"}, "hr_upscaler"),
    ("txt2img", {"enable_hr": True, "hr_scale": 100}, "hr_scale"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "../../etc/passwd"}}, "sd_model_checkpoint"),
    ("txt2img", {"override_settings": {"CLIP_stop_at_last_layers": 99}}, "clip_skip"),
    ("txt2img", {"prompt": "<lora:missing:1> a cat"}, "lora"),
    ("img2img", {}, "init_images"),
    ("img2img", {"init_images": ["not base64!"]}, "base64"),
    ("img2img", {"init_images": [base64.b64encode(b"hello").decode()]}, "not an image"),
    ("img2img", {"init_images": ["http://example.com/a.png"]}, "URL"),
    ("img2img", {"init_images": ["data:image/png,abc"]}, "base64"),
    ("img2img", {"init_images": [HUGE_HEADER]}, "pixels"),
    ("img2img", {"init_images": [PNG], "denoising_strength": 3}, "strength"),
    ("img2img", {"init_images": [PNG], "mask": "zzz"}, "mask"),
    ("img2img", {"init_images": [PNG], "mask": PNG, "inpainting_fill": 9}, "inpainting_fill"),
    ("img2img", {"init_images": [PNG], "mask": PNG, "mask_blur": 1000}, "mask_blur"),
    ("img2img", {"init_images": PNG}, "init_images"),
    ("png-info", {"image": "???"}, "base64"),
    ("options", ["not", "a", "dict"], "JSON object"),
    ("options", {"sd_model_checkpoint": "nope"}, "nope"),
]


@pytest.mark.parametrize(("route", "payload", "named"), BAD_INPUTS, ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(BAD_INPUTS)])
def test_bad_input_is_a_4xx_naming_the_problem(served, route, payload, named) -> None:
    url, _ = served
    body = {"prompt": PROMPT, "width": 64, "height": 64, "steps": 2, **payload} if isinstance(payload, dict) \
        and route in ("txt2img", "img2img") else payload
    r = requests.post(f"{url}/sdapi/v1/{route}", data=json.dumps(body), headers={"content-type": "application/json"},
                      timeout=60)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    answer = r.json()
    assert set(answer) == {"error", "detail"} and named.lower() in answer["detail"].lower(), answer
    assert requests.get(f"{url}/sdapi/v1/progress", timeout=10).status_code == 200  # still up


def test_malformed_bodies(served) -> None:
    url, _ = served
    for data in (b"{", b"\xff\xfe", b"[]", b"null", b'"text"'):
        r = requests.post(f"{url}/sdapi/v1/txt2img", data=data, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500 and "detail" in r.json(), (data, r.status_code, r.text)
    assert requests.get(f"{url}/sdapi/v1/no-such-route").status_code == 404
    assert requests.get(f"{url}/static/../../../etc/passwd").status_code == 404


def test_unknown_a1111_fields_are_accepted(api) -> None:
    out = api.txt2img(prompt=PROMPT, width=64, height=64, steps=2, eta=0.5, s_churn=1.0, sampler_index="Euler",
                      script_args=[1, 2], alwayson_scripts={"Something": {"args": []}}, restore_faces=True,
                      styles=["style"], tiling=True)
    assert len(out.images) == 1


def test_hires_fields(api) -> None:
    out = api.txt2img(prompt=PROMPT, width=64, height=64, steps=4, enable_hr=True, hr_scale=2, hr_second_pass_steps=2,
                      denoising_strength=0.5, hr_upscaler="Latent")
    assert out.images[0].size == (128, 128) and "Hires upscale: 2" in out.info["infotexts"][0]



def test_loras_and_embeddings_are_served(tmp_path) -> None:
    from safetensors.torch import save_file

    from test_lora import kohya_file, random_lora

    loras, embeddings = tmp_path / "Lora", tmp_path / "embeddings"
    (loras / "styles").mkdir(parents=True)
    embeddings.mkdir()
    kohya_file(random_lora(latentdiff.load(dtype="float32"), seed=3), loras / "styles" / "ink.safetensors")
    save_file({"emb_params": torch.randn(2, 128, generator=torch.Generator().manual_seed(0))},
              str(embeddings / "zqxstyle.safetensors"))
    with live_server(lora_dirs=[loras], embeddings_dir=embeddings) as (url, app):
        listed = requests.get(f"{url}/sdapi/v1/loras").json()
        assert listed == [{"name": "ink", "alias": "ink", "path": "styles/ink.safetensors", "metadata": {}}]
        loaded = requests.get(f"{url}/sdapi/v1/embeddings").json()["loaded"]
        assert loaded["zqxstyle"]["vectors"] == 2 and loaded["zqxstyle"]["shape"] == 128
        prompt = "<lora:ink:0.8> a large red circle zqxstyle"
        body = {"prompt": prompt, "seed": 5, "steps": 4, "width": 64, "height": 64, "sampler_name": "Euler"}
        answer = requests.post(f"{url}/sdapi/v1/txt2img", json=body).json()
        image = Image.open(io.BytesIO(base64.b64decode(answer["images"][0])))
        infotext = json.loads(answer["info"])["infotexts"][0]
        assert "Lora hashes" in infotext and "TI hashes" in infotext
        expected = app.server.pipe.txt2img(prompt, seed=5, steps=4, guidance_scale=7.0, sampler="Euler")[0]
        plain = app.server.pipe.txt2img("a large red circle zqxstyle", seed=5, steps=4, guidance_scale=7.0,
                                        sampler="Euler")[0]
        assert same_pixels(image, expected) and not same_pixels(image, plain)


def test_resize_modes() -> None:
    """0 stretches; 1 fills the size and crops the centre; 2 fits inside and stretches the edge pixels outward."""
    from latentdiff.serve.a1111 import resize_to

    wide = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8))  # 64x32
    assert resize_to(wide, (48, 48), 0).size == (48, 48)
    cropped = np.asarray(resize_to(wide, (48, 48), 1))
    expected = np.asarray(wide.resize((96, 48), Image.LANCZOS))[:, 24:72]
    assert np.array_equal(cropped, expected)
    padded = np.asarray(resize_to(wide, (64, 64), 2))
    inner = np.asarray(wide)  # already 64 wide: placed at rows 16..48
    assert np.array_equal(padded[16:48], inner)
    assert (padded[:16] == inner[0]).all() and (padded[48:] == inner[-1]).all()
