// latentdiff's page: a small client of the server's A1111 API (/sdapi/v1). No build step.
"use strict";

const $ = (id) => document.getElementById(id);
const API = "/sdapi/v1";
const POLL_MS = 150;

const state = {
  busy: false,
  lastSeed: null,
  input: null,        // {src: dataURL, width, height} of the img2img input
  maskPainted: false,
  lastParams: null,   // png-info "parameters" of the last dropped file
};

// ---------------------------------------------------------------------------- helpers
async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
  };
  let response;
  try {
    response = await fetch(API + path, init);
  } catch (err) {
    throw new Error(`the server cannot be reached (${err.message})`);
  }
  let data = null;
  try { data = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    const error = data && (data.error || data.detail) ? `${data.error || "Error"}: ${data.detail || ""}`
      : `HTTP ${response.status} ${response.statusText}`;
    throw new Error(error);
  }
  return data;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const im = new Image();
    im.onload = () => resolve(im);
    im.onerror = () => reject(new Error("the file is not an image this browser can read"));
    im.src = src;
  });
}

const num = (id, fallback) => {
  const v = Number($(id).value);
  return Number.isFinite(v) && $(id).value !== "" ? v : fallback;
};

function appendToPrompt(text) {
  const box = $("prompt");
  const current = box.value.replace(/\s+$/, "");
  box.value = current ? `${current}, ${text}` : text;
  box.focus();
}

// ---------------------------------------------------------------------------- setup
async function init() {
  const [samplers, schedulers, options, loras, embeddings] = await Promise.all([
    api("/samplers").catch(() => []), api("/schedulers").catch(() => []), api("/options").catch(() => ({})),
    api("/loras").catch(() => []), api("/embeddings").catch(() => ({loaded: {}})),
  ]);
  fillSelect($("sampler"), samplers.map((s) => [s.name, s.name]), "Euler");
  fillSelect($("scheduler"), schedulers.map((s) => [s.name, s.label || s.name]), "automatic");
  const native = options.latentdiff_native_size;
  if (native) {
    $("width").value = native;
    $("height").value = native;
  }
  const factor = options.latentdiff_vae_factor;
  if (factor) for (const id of ["width", "height"]) $(id).step = factor;
  if (options.sd_model_checkpoint) $("model-name").textContent = options.sd_model_checkpoint;

  const loraNames = (loras || []).map((l) => l.name).filter(Boolean);
  const embNames = Object.keys((embeddings && embeddings.loaded) || {});
  fillChips($("lora-list"), loraNames, (n) => appendToPrompt(`<lora:${n}:1>`));
  fillChips($("embedding-list"), embNames, (n) => appendToPrompt(n));
  $("lora-box").hidden = loraNames.length === 0;
  $("embedding-box").hidden = embNames.length === 0;
  $("extras").hidden = loraNames.length === 0 && embNames.length === 0;
}

function fillSelect(select, rows, preferred) {
  select.replaceChildren();
  for (const [value, label] of rows) {
    const opt = document.createElement("option");
    opt.value = value;
    opt.textContent = label;
    select.append(opt);
  }
  if (rows.some(([v]) => v === preferred)) select.value = preferred;
}

function fillChips(box, names, onPick) {
  box.replaceChildren();
  for (const name of names) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "chip";
    b.textContent = name;
    b.addEventListener("click", () => onPick(name));
    box.append(b);
  }
}

// ---------------------------------------------------------------------------- generation
function baseRequest() {
  return {
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    sampler_name: $("sampler").value || undefined,
    scheduler: $("scheduler").value || undefined,
    steps: Math.round(num("steps", 30)),
    cfg_scale: num("cfg", 7),
    seed: Math.round(num("seed", -1)),
    width: Math.round(num("width", 64)),
    height: Math.round(num("height", 64)),
    batch_size: Math.round(num("batch", 1)),
  };
}

function setBusy(busy) {
  state.busy = busy;
  $("generate").disabled = busy;
  $("interrupt").disabled = !busy;
  $("img2img-button").disabled = busy || !state.input;
  document.body.classList.toggle("busy", busy);
}

async function run(path, body) {
  if (state.busy) return;
  showError("");
  setBusy(true);
  const poller = startPolling();
  try {
    const data = await api(path, body);
    addResults(data);
  } catch (err) {
    showError(err.message);
  } finally {
    poller.stop();
    setBusy(false);
  }
}

function generate() {
  run("/txt2img", baseRequest());
}

function img2img() {
  if (!state.input) return;
  const body = {
    ...baseRequest(),
    init_images: [state.input.src],
    denoising_strength: num("strength", 0.75),
    width: state.input.width,
    height: state.input.height,
  };
  if (state.maskPainted) {
    body.mask = maskDataURL();
    body.inpaint_full_res = false;
    body.mask_blur = 0;
  }
  run("/img2img", body);
}

// ---------------------------------------------------------------------------- progress
function startPolling() {
  let stopped = false;
  let timer = null;
  const bar = $("progress-bar");
  const text = $("progress-text");
  bar.value = 0;
  text.textContent = "queued…";

  async function tick() {
    if (stopped) return;
    try {
      const p = await api("/progress");
      if (stopped) return;
      const s = p.state || {};
      bar.value = Math.max(0, Math.min(1, p.progress || 0));
      if (s.sampling_steps) {
        const eta = p.eta_relative > 0 ? `, ${p.eta_relative.toFixed(1)} s left` : "";
        const jobs = s.job_count > 1 ? ` (${s.job_count} jobs)` : "";
        text.textContent = `step ${s.sampling_step}/${s.sampling_steps}${eta}${jobs}`;
      }
      if (p.current_image) {
        const img = $("preview");
        img.src = `data:image/png;base64,${p.current_image}`;
        img.hidden = false;
        $("preview-empty").hidden = true;
      }
    } catch (_) { /* a missed poll is harmless */ }
    if (!stopped) timer = setTimeout(tick, POLL_MS);
  }
  timer = setTimeout(tick, POLL_MS);
  return {
    stop() {
      stopped = true;
      clearTimeout(timer);
      bar.value = 1;
      text.textContent = "done";
    },
  };
}

// ---------------------------------------------------------------------------- gallery
function addResults(data) {
  let info = {};
  try { info = JSON.parse(data.info || "{}"); } catch (_) { /* keep {} */ }
  const texts = info.infotexts || [];
  const seeds = info.all_seeds || [];
  const gallery = $("gallery");
  (data.images || []).forEach((b64, i) => {
    const src = `data:image/png;base64,${b64}`;
    const fig = document.createElement("figure");
    fig.className = "result";
    const img = document.createElement("img");
    img.src = src;
    img.alt = texts[i] ? texts[i].split("\n")[0] : "result";
    const cap = document.createElement("figcaption");
    cap.className = "infotext";
    cap.textContent = texts[i] || "";
    const row = document.createElement("div");
    row.className = "row";
    const use = document.createElement("button");
    use.type = "button";
    use.className = "small use-as-input";
    use.textContent = "use as input";
    use.addEventListener("click", () => setInput(src));
    const save = document.createElement("a");
    save.className = "small button";
    save.href = src;
    save.download = `latentdiff-${seeds[i] ?? Date.now()}.png`;
    save.textContent = "save";
    row.append(use, save);
    fig.append(img, cap, row);
    gallery.prepend(fig);
  });
  if (seeds.length) {
    state.lastSeed = seeds[0];
    $("seed-last").disabled = false;
  }
  const any = gallery.children.length > 0;
  $("gallery-empty").hidden = any;
  $("gallery-clear").disabled = !any;
}

// ---------------------------------------------------------------------------- input + mask
async function setInput(src) {
  let im;
  try {
    im = await loadImage(src);
  } catch (err) {
    showError(err.message);
    return;
  }
  state.input = {src, width: im.naturalWidth, height: im.naturalHeight};
  const img = $("input-image");
  img.src = src;
  const canvas = $("mask-canvas");
  canvas.width = im.naturalWidth;
  canvas.height = im.naturalHeight;
  // the stage is shown at a fixed width, height by the aspect ratio
  $("input-stage").style.aspectRatio = `${im.naturalWidth} / ${im.naturalHeight}`;
  clearMask();
  const brush = $("brush");
  brush.max = Math.max(8, Math.round(Math.max(im.naturalWidth, im.naturalHeight) / 2));
  brush.value = Math.max(1, Math.round(Math.max(im.naturalWidth, im.naturalHeight) / 8));
  $("brush-out").value = brush.value;
  $("input-stage").hidden = false;
  $("input-empty").hidden = true;
  $("input-clear").disabled = false;
  $("mask-clear").disabled = false;
  $("input-info").textContent = `${im.naturalWidth}×${im.naturalHeight}; img2img runs at this size`;
  setBusy(state.busy);
}

function removeInput() {
  state.input = null;
  $("input-image").removeAttribute("src");
  $("input-stage").hidden = true;
  $("input-empty").hidden = false;
  $("input-clear").disabled = true;
  $("mask-clear").disabled = true;
  $("input-info").textContent = "";
  state.maskPainted = false;
  setBusy(state.busy);
}

function clearMask() {
  const canvas = $("mask-canvas");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  state.maskPainted = false;
  updateMaskInfo();
}

function updateMaskInfo() {
  $("img2img-button").textContent = state.maskPainted ? "Run inpaint" : "Run img2img/inpaint";
}

// the mask: white where painted (alpha of the overlay), black elsewhere, at the image's size
function maskDataURL() {
  const src = $("mask-canvas");
  const out = document.createElement("canvas");
  out.width = src.width;
  out.height = src.height;
  const pixels = src.getContext("2d").getImageData(0, 0, src.width, src.height);
  const d = pixels.data;
  for (let i = 0; i < d.length; i += 4) {
    const v = d[i + 3] >= 64 ? 255 : 0;
    d[i] = d[i + 1] = d[i + 2] = v;
    d[i + 3] = 255;
  }
  out.getContext("2d").putImageData(pixels, 0, 0);
  return out.toDataURL("image/png");
}

function setupMaskPainting() {
  const canvas = $("mask-canvas");
  const ctx = canvas.getContext("2d");
  let last = null;

  // a pointer's position in image pixels (the canvas is shown scaled)
  function toImage(e) {
    const r = canvas.getBoundingClientRect();
    return {
      x: ((e.clientX - r.left) * canvas.width) / r.width,
      y: ((e.clientY - r.top) * canvas.height) / r.height,
    };
  }

  function stroke(a, b) {
    const size = Number($("brush").value) || 1;
    ctx.strokeStyle = ctx.fillStyle = "rgb(255, 40, 90)";
    ctx.lineWidth = size;
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    if (a.x === b.x && a.y === b.y) {
      ctx.arc(b.x, b.y, size / 2, 0, 2 * Math.PI);
      ctx.fill();
    } else {
      ctx.moveTo(a.x, a.y);
      ctx.lineTo(b.x, b.y);
      ctx.stroke();
    }
    if (!state.maskPainted) {
      state.maskPainted = true;
      updateMaskInfo();
    }
  }

  canvas.addEventListener("pointerdown", (e) => {
    if (e.button !== 0 || !state.input) return;
    e.preventDefault();
    canvas.setPointerCapture(e.pointerId);
    last = toImage(e);
    stroke(last, last);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!last) return;
    const p = toImage(e);
    stroke(last, p);
    last = p;
  });
  const end = (e) => {
    last = null;
    if (canvas.hasPointerCapture(e.pointerId)) canvas.releasePointerCapture(e.pointerId);
  };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
}

// ---------------------------------------------------------------------------- png info
async function pngInfo(file) {
  if (!file) return;
  showError("");
  try {
    const data = await api("/png-info", {image: await readFile(file)});
    const pre = $("pnginfo-text");
    pre.textContent = data.info || "(this image carries no generation parameters)";
    pre.hidden = false;
    state.lastParams = data.info ? data.parameters : null;
    $("pnginfo-apply").hidden = !state.lastParams;
  } catch (err) {
    showError(err.message);
  }
}

function applyParams() {
  const p = state.lastParams;
  if (!p) return;
  const set = (id, value) => { if (value !== undefined && value !== null && value !== "") $(id).value = value; };
  set("prompt", p.Prompt);
  $("negative").value = p["Negative prompt"] || "";
  set("steps", p.Steps);
  set("cfg", p["CFG scale"]);
  set("seed", p.Seed);
  if (p.Sampler && [...$("sampler").options].some((o) => o.value === p.Sampler)) $("sampler").value = p.Sampler;
  if (p["Schedule type"]) {
    const key = p["Schedule type"].toLowerCase().replace(/ /g, "_");
    if ([...$("scheduler").options].some((o) => o.value === key)) $("scheduler").value = key;
  }
  const size = /^(\d+)x(\d+)$/.exec(p.Size || "");
  if (size) { $("width").value = size[1]; $("height").value = size[2]; }
}

function setupDropZone() {
  const zone = $("pnginfo-drop");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    pngInfo(e.dataTransfer.files[0]);
  });
  $("pnginfo-file").addEventListener("change", (e) => { pngInfo(e.target.files[0]); e.target.value = ""; });
}

// ---------------------------------------------------------------------------- wiring
function wire() {
  $("generate").addEventListener("click", generate);
  $("img2img-button").addEventListener("click", img2img);
  $("interrupt").addEventListener("click", () => api("/interrupt", {}).catch((err) => showError(err.message)));
  $("seed-random").addEventListener("click", () => { $("seed").value = -1; });
  $("seed-last").addEventListener("click", () => { if (state.lastSeed !== null) $("seed").value = state.lastSeed; });
  $("strength").addEventListener("input", (e) => { $("strength-out").value = Number(e.target.value).toFixed(2); });
  $("brush").addEventListener("input", (e) => { $("brush-out").value = e.target.value; });
  $("mask-clear").addEventListener("click", clearMask);
  $("input-clear").addEventListener("click", removeInput);
  $("input-file").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    e.target.value = "";
    if (file) setInput(await readFile(file));
  });
  $("gallery-clear").addEventListener("click", () => {
    $("gallery").replaceChildren();
    $("gallery-empty").hidden = false;
    $("gallery-clear").disabled = true;
  });
  $("pnginfo-apply").addEventListener("click", applyParams);
  for (const id of ["prompt", "negative"]) {
    $(id).addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); generate(); }
    });
  }
  setupMaskPainting();
  setupDropZone();
}

wire();
init().catch((err) => showError(err.message));
