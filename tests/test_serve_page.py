"""The web page of ``latentdiff serve`` in a real browser (headless Chromium via Playwright):
txt2img with live progress, the gallery, inpainting with a painted mask, and PNG info.

Skipped when Playwright or the system Chromium is missing. With LATENTDIFF_SCREENSHOT set it
writes docs/serve-page.png (the page after the inpaint).
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "serve-page.png"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_url():
    uvicorn = pytest.importorskip("uvicorn")
    from latentdiff.serve.app import create_app
    from latentdiff.serve.config import ServeConfig

    app = create_app(ServeConfig(model=None, dtype="float32"))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _png_with_parameters(text: str) -> bytes:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def test_page_generates_inpaints_and_reads_png_info(base_url, browser):
    from PIL import Image

    page = browser.new_page(viewport={"width": 1100, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.set_default_timeout(30_000)
    page.goto(base_url + "/")

    # the selects are filled from the API, the size from the model's native size
    page.wait_for_function("document.querySelectorAll('#sampler option').length > 0")
    page.wait_for_function("document.querySelectorAll('#scheduler option').length > 0")
    assert page.input_value("#width") == "64" and page.input_value("#height") == "64"
    assert page.is_hidden("#extras")  # no LoRAs or embeddings on the built-in model

    # ---- txt2img, watching the live preview --------------------------------------------------
    page.fill("#prompt", "a large red circle in the center on a white background")
    page.select_option("#sampler", "DDIM")
    page.fill("#steps", "60")
    page.fill("#seed", "7")
    page.evaluate("""() => {
        window.__previews = [];
        const img = document.getElementById('preview');
        new MutationObserver(() => window.__previews.push({
            src: img.src.slice(0, 22), results: document.querySelectorAll('#gallery img').length,
            progress: document.getElementById('progress-bar').value,
        })).observe(img, {attributes: true, attributeFilter: ['src']});
    }""")
    with page.expect_request(lambda r: r.url.endswith("/sdapi/v1/txt2img")) as txt_req:
        page.click("#generate")
    body = json.loads(txt_req.value.post_data)
    assert body["sampler_name"] == "DDIM" and body["steps"] == 60 and body["width"] == 64

    page.wait_for_function("document.querySelectorAll('#gallery img').length === 1")
    previews = page.evaluate("window.__previews")
    during = [p for p in previews if p["src"] == "data:image/png;base64," and p["results"] == 0]
    assert during, f"the preview never showed an image while sampling: {previews}"
    caption = page.inner_text("#gallery figure figcaption")
    assert "Steps: 60" in caption and "Sampler: DDIM" in caption and "Seed: 7" in caption
    assert page.is_hidden("#error")

    # ---- inpaint: use the result as input, paint a stroke across the middle ------------------
    page.click("#gallery .use-as-input")
    page.wait_for_function("document.getElementById('mask-canvas').width === 64")
    box = page.locator("#mask-canvas").bounding_box()
    assert box["width"] > 200  # shown scaled up
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - box["width"] * 0.2, cy)
    page.mouse.down()
    for k in range(1, 9):
        page.mouse.move(cx - box["width"] * 0.2 + k * box["width"] * 0.05, cy, steps=2)
    page.mouse.up()
    page.fill("#prompt", "a large blue square in the center on a white background")
    page.fill("#steps", "20")
    page.locator("#strength").fill("1")
    with page.expect_request(lambda r: r.url.endswith("/sdapi/v1/img2img")) as img_req:
        page.click("#img2img-button")
    body = json.loads(img_req.value.post_data)
    assert body["denoising_strength"] == 1.0
    assert body["init_images"][0].startswith("data:image/png;base64,")
    assert body["mask"].startswith("data:image/png;base64,")
    assert body["inpaint_full_res"] is False and body["mask_blur"] == 0
    assert (body["width"], body["height"]) == (64, 64)
    mask = Image.open(io.BytesIO(base64.b64decode(body["mask"].partition(",")[2]))).convert("L")
    assert mask.size == (64, 64)
    # the stroke ran across the middle (x 19..45 at y 32, brush 8 px): white there, black in the corners
    assert mask.getpixel((32, 32)) == 255 and mask.getpixel((22, 32)) == 255
    assert mask.getpixel((2, 2)) == 0 and mask.getpixel((32, 5)) == 0 and mask.getpixel((60, 60)) == 0

    page.wait_for_function("document.querySelectorAll('#gallery img').length === 2")
    caption = page.inner_text("#gallery figure figcaption")  # the newest comes first
    assert "a large blue square" in caption and "Steps: 20" in caption
    assert page.is_hidden("#error")
    page.wait_for_function("document.getElementById('progress-text').textContent === 'done'")
    if os.environ.get("LATENTDIFF_SCREENSHOT"):
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=False)

    # ---- PNG info from a file ---------------------------------------------------------------
    text = "a small green triangle\nNegative prompt: blurry\nSteps: 12, Sampler: Euler, CFG scale: 5, Seed: 42, Size: 64x64"
    page.set_input_files("#pnginfo-file", files=[{"name": "p.png", "mimeType": "image/png",
                                                 "buffer": _png_with_parameters(text)}])
    page.wait_for_function("!document.getElementById('pnginfo-text').hidden")
    assert page.inner_text("#pnginfo-text") == text
    page.click("#pnginfo-apply")
    assert page.input_value("#prompt") == "a small green triangle"
    assert page.input_value("#steps") == "12" and page.input_value("#seed") == "42"

    # ---- a 512 px upload: shown at the same width, the mask still at the image's pixels ------
    buf = io.BytesIO()
    Image.new("RGB", (512, 512), (255, 255, 255)).save(buf, format="PNG")
    page.set_input_files("#input-file", files=[{"name": "big.png", "mimeType": "image/png", "buffer": buf.getvalue()}])
    page.wait_for_function("document.getElementById('mask-canvas').width === 512")
    box = page.locator("#mask-canvas").bounding_box()
    assert box["width"] < 400
    page.mouse.click(box["x"] + box["width"] * 0.75, box["y"] + box["height"] * 0.25)
    big = page.evaluate("maskDataURL()")
    mask = Image.open(io.BytesIO(base64.b64decode(big.partition(",")[2]))).convert("L")
    assert mask.size == (512, 512)
    assert mask.getpixel((384, 128)) == 255 and mask.getpixel((128, 384)) == 0 and mask.getpixel((384, 200)) == 0

    # ---- errors are shown -------------------------------------------------------------------
    page.fill("#steps", "100000")
    page.click("#generate")
    page.wait_for_function("!document.getElementById('error').hidden")
    assert "steps" in page.inner_text("#error")

    assert not errors, errors
    page.close()
