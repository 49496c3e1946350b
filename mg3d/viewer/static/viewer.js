// mg3d viewer: the exported neural light field (camera pose in, image out) run by onnxruntime-web.
// The camera moves only where the model was trained: around the orbit of the training cameras (at their
// radii and elevations) or along their path. window.mg3d exposes rendering and timing to tests and benchmarks.

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

function say(text, error = false) {
  $("message").textContent = text;
  $("message").className = error ? "error" : "";
}

// ---- small 3-vector helpers ----
const add = (a, b) => a.map((x, i) => x + b[i]);
const scale = (a, s) => a.map((x) => x * s);
const dot = (a, b) => a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
const cross = (a, b) => [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]];
const norm = (a) => scale(a, 1 / Math.hypot(...a));
const clamp = (x, lo, hi) => Math.min(hi, Math.max(lo, x));

// OpenGL camera-to-world looking from `pos` along `forward` (columns: right, up, backward), row-major 4x4.
function lookAt(pos, forward, up) {
  const back = norm(scale(forward, -1));
  const right = norm(cross(up, back));
  const camUp = cross(back, right);
  return [right[0], camUp[0], back[0], pos[0], right[1], camUp[1], back[1], pos[1], right[2], camUp[2], back[2], pos[2], 0, 0, 0, 1];
}

// ---- camera rigs ----
class OrbitRig {
  constructor(s) {
    Object.assign(this, { center: s.center, up: s.up, e1: s.e1, e2: s.e2 });
    [this.rMin, this.r, this.rMax] = s.radius;
    [this.elMin, this.elMax] = s.elevation;
    this.arc = s.azimuth_arc; // [start, span] or null (all around)
    this.az = s.start_azimuth;
    this.el = s.start_elevation;
  }
  drag(dx, dy) {
    this.az -= dx * 0.008;
    if (this.arc) {
      const [start, span] = this.arc;
      let rel = ((this.az - start) % (2 * Math.PI) + 2 * Math.PI) % (2 * Math.PI);
      if (rel > span) rel = rel - span < (2 * Math.PI - span) / 2 ? span : 0;
      this.az = start + rel;
    }
    this.el = clamp(this.el + dy * 0.006, this.elMin, this.elMax);
  }
  zoom(f) { this.r = clamp(this.r * f, this.rMin * 0.95, this.rMax * 1.05); }
  pose() {
    const horiz = add(scale(this.e1, Math.cos(this.az)), scale(this.e2, Math.sin(this.az)));
    const dir = add(scale(horiz, Math.cos(this.el)), scale(this.up, Math.sin(this.el)));
    const pos = add(this.center, scale(dir, this.r));
    return lookAt(pos, scale(dir, -1), this.up);
  }
}

class PathRig {
  constructor(s) {
    this.path = s.path; this.spacing = s.spacing; this.t = (s.path.length - 1) / 2; this.yaw = 0; this.pitch = 0; this.dolly = 0;
  }
  drag(dx, dy) {
    this.t = clamp(this.t + dx * 0.01, 0, this.path.length - 1);
    this.pitch = clamp(this.pitch + dy * 0.002, -0.15, 0.15);
  }
  zoom(f) { this.dolly = clamp(this.dolly + (f < 1 ? 1 : -1) * 0.25 * this.spacing, -2 * this.spacing, 2 * this.spacing); }
  pose() {
    const i = Math.min(Math.floor(this.t), this.path.length - 2 < 0 ? 0 : this.path.length - 2);
    const j = Math.min(i + 1, this.path.length - 1), w = this.t - i;
    const A = this.path[i], B = this.path[j];
    const col = (m, c) => [m[0][c], m[1][c], m[2][c]];
    const mix = (c) => add(scale(col(A, c), 1 - w), scale(col(B, c), w));
    let back = norm(mix(2)), up = norm(mix(1));
    const right = norm(cross(up, back));
    back = norm(add(back, scale(up, -this.pitch)));
    up = cross(back, right);
    const pos = add(mix(3), scale(back, -this.dolly));
    return lookAt(pos, scale(back, -1), up);
  }
}

// ---- the runtime ----
const state = { frames: [], latencies: [], session: null, backend: null, threads: 1, variant: null, busy: false, dirty: true, outName: "rgb" };

async function pickBackend() {
  if (params.get("backend") === "wasm" || !("gpu" in navigator)) return { name: "wasm" };
  try {
    const adapter = await navigator.gpu.requestAdapter();
    // a fallback adapter is a CPU emulation of a GPU (SwiftShader): WebAssembly is faster there
    const fallback = adapter && (adapter.isFallbackAdapter || (adapter.info && adapter.info.isFallbackAdapter));
    if (adapter && !fallback) return { name: "webgpu", f16: adapter.features.has("shader-f16") };
  } catch (e) { /* no adapter: WASM */ }
  return { name: "wasm" };
}

async function loadSession(ort, variant, backend) {
  let provider = backend.name;
  if (variant.precision === "fp16" && provider === "webgpu" && !backend.f16) {
    provider = "wasm";
    say("this GPU has no shader-f16: the fp16 model runs on WebAssembly instead (choose fp32 for WebGPU)");
  }
  const session = await ort.InferenceSession.create(`model/${variant.file}`, { executionProviders: [provider], graphOptimizationLevel: "all" });
  return { session, provider };
}

async function run(c2w) {
  const input = new state.ort.Tensor("float32", Float32Array.from(c2w), [1, 4, 4]);
  const t0 = performance.now();
  const out = await state.session.run({ c2w: input });
  const ms = performance.now() - t0;
  const rgb = out[state.outName];
  const data = rgb.data instanceof Float32Array ? rgb.data : Float32Array.from(rgb.data, Number);
  return { ms, data, dims: rgb.dims };
}

function check(data) {
  let lo = Infinity, hi = -Infinity;
  for (let i = 0; i < data.length; i += 97) {
    const v = data[i];
    if (!Number.isFinite(v)) return "the model returned NaN pixels";
    lo = Math.min(lo, v); hi = Math.max(hi, v);
  }
  if (hi <= 1e-6) return "the model returned a black image";
  return null;
}

function draw(data, dims) {
  const [, , h, w] = dims;
  const canvas = $("view");
  if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; canvas.style.aspectRatio = `${w} / ${h}`; }
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(w, h);
  const px = img.data, n = w * h;
  for (let i = 0; i < n; i++) {
    px[4 * i] = data[i] * 255; px[4 * i + 1] = data[n + i] * 255; px[4 * i + 2] = data[2 * n + i] * 255; px[4 * i + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
}

async function frame() {
  if (state.busy || !state.session || !(state.dirty || $("continuous").checked)) return;
  state.busy = true; state.dirty = false;
  try {
    const { ms, data, dims } = await run(state.rig.pose());
    const problem = check(data);
    if (problem) say(`${problem} on ${state.backend}: try the fp32 model or ?backend=wasm`, true);
    draw(data, dims);
    const now = performance.now();
    state.frames.push(now); state.latencies.push(ms);
    while (state.frames.length && now - state.frames[0] > 1000) state.frames.shift();
    if (state.latencies.length > 30) state.latencies.shift();
    $("fps").textContent = state.frames.length > 1 ? fps().toFixed(1) : "–";
    $("latency").textContent = median(state.latencies).toFixed(1);
  } catch (e) {
    say(`rendering failed: ${e.message || e}`, true);
  } finally {
    state.busy = false;
  }
}

const median = (xs) => { const s = [...xs].sort((a, b) => a - b); return s.length ? s[Math.floor(s.length / 2)] : NaN; };
function fps() {
  const f = state.frames;
  return f.length > 1 ? (f.length - 1) * 1000 / (f[f.length - 1] - f[0]) : 0;
}

function loop() { frame().then(() => requestAnimationFrame(loop)); }

function controls() {
  const canvas = $("view");
  const pointers = new Map();
  let pinch = 0;
  canvas.addEventListener("pointerdown", (e) => { canvas.setPointerCapture(e.pointerId); pointers.set(e.pointerId, [e.clientX, e.clientY]); });
  canvas.addEventListener("pointerup", (e) => { pointers.delete(e.pointerId); pinch = 0; });
  canvas.addEventListener("pointercancel", (e) => { pointers.delete(e.pointerId); pinch = 0; });
  canvas.addEventListener("pointermove", (e) => {
    if (!pointers.has(e.pointerId)) return;
    const [x, y] = pointers.get(e.pointerId);
    pointers.set(e.pointerId, [e.clientX, e.clientY]);
    if (pointers.size === 2) { // pinch zoom
      const [a, b] = [...pointers.values()];
      const d = Math.hypot(a[0] - b[0], a[1] - b[1]);
      if (pinch) state.rig.zoom(pinch / d);
      pinch = d;
    } else {
      state.rig.drag(e.clientX - x, e.clientY - y);
    }
    state.dirty = true;
  });
  canvas.addEventListener("wheel", (e) => { e.preventDefault(); state.rig.zoom(e.deltaY > 0 ? 1.05 : 1 / 1.05); state.dirty = true; }, { passive: false });
}

async function useVariant(name) {
  const variant = state.variants.find((v) => v.file === name) || state.variants[0];
  say(`loading ${variant.file} (${variant.mb} MB)…`);
  const t0 = performance.now();
  const { session, provider } = await loadSession(state.ort, variant, state.backendInfo);
  state.loadMs = performance.now() - t0;
  state.session = session; state.backend = provider; state.variant = variant;
  state.outName = session.outputNames[0];
  state.firstMs = (await run(state.rig.pose())).ms;
  $("backend").textContent = provider === "webgpu" ? "WebGPU" : "WebAssembly (SIMD)";
  const [w, h] = variant.resolution || state.scene.model.resolution;
  $("size").textContent = `${w}x${h} ${variant.precision}`;
  state.dirty = true;
  if ($("message").className !== "error" && !$("message").textContent.startsWith("this GPU")) say(state.note || "");
}

async function main() {
  if (typeof WebAssembly !== "object") { say("this browser has no WebAssembly: it cannot run the model", true); return; }
  const scene = await (await fetch("scene.json")).json();
  state.scene = scene;
  state.variants = scene.model.variants.filter((v) => v.file.endsWith(".onnx"));
  state.backendInfo = await pickBackend();
  const ort = await import(state.backendInfo.name === "webgpu" ? "./ort/ort.webgpu.min.mjs" : "./ort/ort.wasm.min.mjs");
  state.ort = ort;
  ort.env.wasm.wasmPaths = new URL("ort/", location.href).href;
  if (self.crossOriginIsolated) {
    state.threads = Math.max(1, Math.min(navigator.hardwareConcurrency || 1, 8));
  } else {
    state.threads = 1;
    state.note = "WebAssembly threads are not available here (the page is not cross-origin isolated): running on one thread";
  }
  ort.env.wasm.numThreads = state.threads;
  $("threads").textContent = String(state.threads);
  state.rig = scene.kind === "orbit" ? new OrbitRig(scene) : new PathRig(scene);
  const select = $("variant");
  const size = (v) => (v.resolution || scene.model.resolution).join("x");
  for (const v of state.variants) select.add(new Option(`${size(v)} ${v.precision} · ${v.mb} MB`, v.file));
  select.addEventListener("change", () => useVariant(select.value).catch((e) => say(`cannot load ${select.value}: ${e.message || e}`, true)));
  $("continuous").checked = params.get("continuous") === "1";
  controls();
  await useVariant(params.get("model") || state.variants[0].file);
  loop();
}

const ready = main().catch((e) => { say(`the viewer could not start: ${e.message || e}`, true); throw e; });

// For tests and benchmarks.
window.mg3d = {
  ready,
  state,
  pose: () => state.rig.pose(),
  async render(c2w) { const r = await run(c2w); draw(r.data, r.dims); return { ms: r.ms, dims: r.dims, pixels: Array.from(r.data) }; },
  async benchmark(frames = 30, warmup = 3) {
    const pose = state.rig.pose();
    for (let i = 0; i < warmup; i++) await run(pose);
    const times = [];
    const t0 = performance.now();
    for (let i = 0; i < frames; i++) { const r = await run(pose); draw(r.data, r.dims); times.push(r.ms); }
    const total = performance.now() - t0;
    return { fps: frames * 1000 / total, median_ms: median(times), times, backend: state.backend, threads: state.threads,
             load_ms: state.loadMs, first_ms: state.firstMs, user_agent: navigator.userAgent };
  },
  use: useVariant,
  fps,
};
