// The avatar-compress browser player: plays avatar.onnx (inputs expression (1, E), world_mat (1, 3, 4),
// K (1, 3, 3) float32; output rgb (1, 3, S, S) in (0, 1)) over the codes in codes.json with ONNX
// Runtime Web's WASM backend, loaded from node_modules/ (installed by `make player`, never a CDN).
//
// Threads: 1 unless the page is cross-origin isolated (the server sends COOP/COEP, which
// `python -m http.server` does not); then up to 4 (SharedArrayBuffer needs the isolation).
//
// Player: index.html[?driver=NAME][&frame=N][&play=1] (the start state; the page's controls change it).
// Test mode (index.html?test=1[&runs=N][&report=/path]): renders frame 0 of the "test" driver, then
// times N more session.run calls over the test frames, and writes JSON {ok, shape, rgb (frame 0,
// channel-major floats), fps, mean_ms, median_ms, first_ms, runs, threads, isolated} into
// #test-result (POSTed to `report` too when given); {ok: false, error} on failure.
"use strict";

const ORT_DIST = "node_modules/onnxruntime-web/dist/";
const FPS_WINDOW = 30; // frames in the moving average of session.run's time

const params = new URLSearchParams(window.location.search);
const $ = (id) => document.getElementById(id);

function configureOrt() {
  ort.env.wasm.wasmPaths = new URL(ORT_DIST, window.location.href).href;
  ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.max(1, Math.min(4, navigator.hardwareConcurrency || 1)) : 1;
  ort.env.wasm.proxy = false;
  ort.env.logLevel = "error";
  return ort.env.wasm.numThreads;
}

// One driver's frames as ready ONNX Runtime feeds.
function driverFeeds(driver, expressionDim) {
  const feeds = [];
  for (let i = 0; i < driver.frames; i++) {
    feeds.push({
      expression: new ort.Tensor("float32", Float32Array.from(driver.expression[i]), [1, expressionDim]),
      world_mat: new ort.Tensor("float32", Float32Array.from(driver.world_mat[i].flat()), [1, 3, 4]),
      K: new ort.Tensor("float32", Float32Array.from(driver.K[i].flat()), [1, 3, 3]),
    });
  }
  return feeds;
}

function draw(ctx, image, rgb, size) {
  const plane = size * size;
  const px = image.data;
  for (let p = 0; p < plane; p++) {
    px[4 * p] = Math.round(Math.min(1, Math.max(0, rgb[p])) * 255);
    px[4 * p + 1] = Math.round(Math.min(1, Math.max(0, rgb[plane + p])) * 255);
    px[4 * p + 2] = Math.round(Math.min(1, Math.max(0, rgb[2 * plane + p])) * 255);
    px[4 * p + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
}

async function load() {
  if (typeof ort === "undefined") {
    throw new Error("onnxruntime-web is not installed next to this page: run `make player` (npm ci --prefix player)");
  }
  const threads = configureOrt();
  const codes = await (await fetch("codes.json")).json();
  const session = await ort.InferenceSession.create("avatar.onnx", {
    executionProviders: ["wasm"], graphOptimizationLevel: "all", logSeverityLevel: 3,
  });
  const feeds = {};
  for (const [name, driver] of Object.entries(codes.drivers)) feeds[name] = driverFeeds(driver, codes.expression_dim);
  return { codes, session, feeds, threads };
}

async function runTest(state) {
  const { session, feeds, codes } = state;
  const test = feeds.test;
  const size = codes.image_size;
  let t0 = performance.now();
  const out = (await session.run(test[0])).rgb;
  const firstMs = performance.now() - t0;
  const canvas = $("view");
  canvas.width = canvas.height = size;
  const ctx = canvas.getContext("2d");
  draw(ctx, ctx.createImageData(size, size), out.data, size);
  const runs = Math.max(1, parseInt(params.get("runs") || "30", 10));
  const times = [];
  for (let i = 0; i < runs; i++) {
    t0 = performance.now();
    await session.run(test[(i + 1) % test.length]);
    times.push(performance.now() - t0);
  }
  const mean = times.reduce((a, b) => a + b, 0) / times.length;
  const sorted = [...times].sort((a, b) => a - b);
  const median = sorted[Math.floor(sorted.length / 2)];
  return {
    ok: true, shape: out.dims, rgb: Array.from(out.data), fps: 1000 / mean, mean_ms: mean, median_ms: median,
    first_ms: firstMs, runs, threads: state.threads, isolated: !!self.crossOriginIsolated,
    user_agent: navigator.userAgent,
  };
}

async function report(result) {
  $("test-result").textContent = JSON.stringify(result);
  $("status").textContent = result.ok ? `test done: ${result.fps.toFixed(1)} frames/s` : `test failed: ${result.error}`;
  const target = params.get("report");
  if (target) await fetch(target, { method: "POST", body: JSON.stringify(result) });
}

function startPlayer(state) {
  const { codes, session, feeds } = state;
  const size = codes.image_size;
  const canvas = $("view");
  canvas.width = canvas.height = size;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(size, size);
  const select = $("driver"), slider = $("frame"), button = $("play");
  for (const [name, driver] of Object.entries(codes.drivers)) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = `${driver.label} (${driver.frames} frames)`;
    select.appendChild(option);
  }
  $("note").textContent = codes.drivers.reenact ? "" :
    "No reenactment driver in this build (built without --driver): the test frames only.";
  $("backend").textContent = `· ONNX Runtime Web ${ort.env.versions ? ort.env.versions.web || "" : ""} WASM, ` +
    `${state.threads} thread${state.threads > 1 ? "s" : ""}` +
    (self.crossOriginIsolated ? "" : " (not cross-origin isolated)");

  // the wanted (driver, frame); pump() renders it, one session.run at a time
  let driver = select.value, frame = 0, playing = false, busy = false, dirty = false, lastShown = 0;
  const times = [];

  async function renderFrame(name, index) {
    const t0 = performance.now();
    const out = (await session.run(feeds[name][index])).rgb;
    times.push(performance.now() - t0);
    if (times.length > FPS_WINDOW) times.shift();
    draw(ctx, image, out.data, size);
    const mean = times.reduce((a, b) => a + b, 0) / times.length;
    $("fps").textContent = mean > 0 ? `${(1000 / mean).toFixed(1)} frames/s (session.run ${mean.toFixed(1)} ms, ` +
      `mean of the last ${times.length})` : "- frames/s";
    $("frame-label").textContent = `frame ${index + 1} / ${feeds[name].length}`;
  }

  async function pump() {
    if (busy) { dirty = true; return; }
    busy = true;
    try {
      do { dirty = false; await renderFrame(driver, frame); } while (dirty);
    } catch (err) {
      playing = false;
      $("status").textContent = `error: ${err}`;
    }
    busy = false;
  }

  function setDriver(name, start = 0) {
    driver = name;
    frame = Math.max(0, Math.min(start, feeds[driver].length - 1));
    slider.max = feeds[driver].length - 1;
    slider.value = frame;
    return pump();
  }

  async function loop(now) {
    if (!playing) return;
    const rate = codes.drivers[driver].fps;
    if (!busy && (!rate || now - lastShown >= 1000 / rate - 1)) {
      lastShown = now;
      frame = (frame + 1) % feeds[driver].length;
      slider.value = frame;
      await pump();
    }
    requestAnimationFrame(loop);
  }

  button.onclick = () => {
    playing = !playing;
    button.textContent = playing ? "Pause" : "Play";
    if (playing) requestAnimationFrame(loop);
  };
  slider.oninput = () => {
    frame = parseInt(slider.value, 10);
    pump();
  };
  select.onchange = () => setDriver(select.value);
  for (const el of [button, slider, select]) el.disabled = false;
  $("status").textContent = `${codes.image_size}x${codes.image_size} avatar; ` +
    "play at the driver video's frame rate at most (frames/s: the renderer's own rate).";
  // optional start state from the URL: ?driver=NAME&frame=N&play=1
  if (params.get("driver") in feeds) select.value = params.get("driver");
  setDriver(select.value, parseInt(params.get("frame") || "0", 10) || 0);
  if (params.get("play") === "1") button.onclick();
}

(async () => {
  try {
    const state = await load();
    if (params.get("test")) await report(await runTest(state));
    else startPlayer(state);
  } catch (err) {
    const message = String(err && err.stack ? err.stack.split("\n")[0] : err);
    if (params.get("test")) await report({ ok: false, error: message });
    else $("status").textContent = `error: ${message}`;
  }
})();
