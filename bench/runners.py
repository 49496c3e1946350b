"""Runners: measure one exported model on one device, the way onnxruntime_perf_test and Qualcomm AI Hub
report it: load/init time, first inference, latency over many runs after warm-up (median, p90, p99, min),
frames per second, peak memory, and the PSNR of the device's images against the torch fp32 reference.

* ``local`` + onnxruntime: a child process per model (so its peak memory is its own), fixed threads.
* ``local`` + torch: the student on CUDA in fp16, CUDA-graph replay, device-event timing.
* ``adb``: pushes the model and the profile's runner binary (an Android build of onnxruntime_perf_test)
  and parses its report. ``ios`` needs macOS with Xcode.
* ``browser``: the viewer page (onnxruntime-web, WebGPU or WASM) in headless Chromium, timed in the page.
* ``estimate``: a roofline from the profile's peak rates and the model's multiply-adds and bytes.
"""

from __future__ import annotations

import multiprocessing
import re
import resource
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from mg3d.bench.profiles import BenchError, DeviceProfile


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    from mg3d.metrics import mean_psnr

    return round(mean_psnr(a, b), 3)


def latency_stats(times_ms: list[float]) -> dict[str, float]:
    """median, p90, p99, min and frames per second of per-run latencies in milliseconds."""
    ordered = sorted(times_ms)
    pick = lambda q: ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]  # noqa: E731
    median = statistics.median(ordered)
    return {"median_ms": round(median, 3), "p90_ms": round(pick(0.9), 3), "p99_ms": round(pick(0.99), 3), "min_ms": round(ordered[0], 3), "fps": round(1e3 / median, 2)}


def time_runs(run: Any, warmup: int, runs: int) -> tuple[float, list[float]]:
    """First call's time and the per-run times (ms) of ``runs`` calls after ``warmup`` untimed ones."""
    t = time.perf_counter()
    run()
    first_ms = (time.perf_counter() - t) * 1e3
    for _ in range(warmup):
        run()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        run()
        times.append((time.perf_counter() - t) * 1e3)
    return first_ms, times


def _onnx_child(path: str, threads: int, poses: np.ndarray, warmup: int, runs: int, queue: Any) -> None:
    """Runs in a fresh process: measure, then report through ``queue``."""
    try:
        from mg3d.export.onnxmodel import render, session

        t = time.perf_counter()
        sess = session(Path(path), threads)
        load_ms = (time.perf_counter() - t) * 1e3
        first_ms, times = time_runs(lambda: sess.run(None, {"c2w": poses[:1]}), warmup, runs)
        images = render(sess, poses)
        queue.put({"load_ms": round(load_ms, 2), "first_ms": round(first_ms, 2), "times": times, "images": images,
                   "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})
    except Exception as exc:  # the runtime's own error goes back to the parent, which names the device
        queue.put({"error": f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:300]}"})


def run_onnx_local(path: Path, profile: DeviceProfile, poses: np.ndarray, reference: np.ndarray, warmup: int = 3, runs: int = 20, timeout_s: float = 900) -> dict[str, Any]:
    """onnxruntime on this machine, in a child process (spawned: no state shared with the caller)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_onnx_child, args=(str(path), profile.threads, poses.astype(np.float32), warmup, runs, queue))
    child.start()
    try:
        result = queue.get(timeout=timeout_s)
    except Exception:
        child.kill()
        raise BenchError(f"{path.name} did not finish on {profile.name} within {timeout_s:.0f} s", hint="use a smaller model or fewer --runs") from None
    child.join(30)
    if "error" in result:
        raise BenchError(f"{path.name} failed on {profile.name}: {result['error']}")
    return {"load_ms": result["load_ms"], "first_ms": result["first_ms"], **latency_stats(result["times"]), "runs": runs,
            "peak_rss_mb": result["peak_rss_mb"], "psnr_vs_torch": _psnr(result["images"], reference)}


def run_browser(path: Path, profile: DeviceProfile, poses: np.ndarray, reference: np.ndarray, warmup: int = 3, runs: int = 20,
                precision: str = "fp32", resolution: tuple[int, int] | None = None) -> dict[str, Any]:
    """The model in mg3d's viewer page, served on 127.0.0.1 with COOP/COEP (threaded WASM), in headless
    Chromium driven by Playwright; latency from ``performance.now()`` around ``session.run``."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    from mg3d.viewer import browser_executable, model_site, serve_site

    w, h = resolution or (reference.shape[3], reference.shape[2])
    variant = {"file": path.name, "precision": precision, "mb": round(path.stat().st_size / 1e6, 3)}
    scene = {"kind": "path", "path": [poses[0].tolist()], "spacing": 0.05, "start": poses[0].tolist(),
             "model": {"variants": [variant], "resolution": [w, h]}}
    server = serve_site(*model_site(path.parent, [path.name], scene), port=0)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_executable(), args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.goto(server.url + f"?model={path.name}")
                page.wait_for_function("window.mg3d !== undefined", timeout=60_000)
                page.evaluate("window.mg3d.ready")
                stats = page.evaluate(f"async () => await window.mg3d.benchmark({runs}, {warmup})")
                images = np.stack([np.array(page.evaluate("async (p) => (await window.mg3d.render(p)).pixels", pose.reshape(-1).tolist()),
                                            np.float32).reshape(3, h, w) for pose in poses])
                memory = page.evaluate("performance.memory ? performance.memory.usedJSHeapSize : null")
            finally:
                browser.close()
    except PlaywrightError as exc:
        raise BenchError(f"{path.name} failed in headless Chromium: {str(exc).splitlines()[0][:300]}") from None
    finally:
        server.shutdown()
    return {"load_ms": round(stats["load_ms"], 2), "first_ms": round(stats["first_ms"], 2), **latency_stats(stats["times"]), "runs": runs,
            "provider": stats["backend"], "threads": stats["threads"], "browser": stats["user_agent"].split(") ")[-1][:80],
            "js_heap_mb": round(memory / 2**20, 1) if memory else None, "psnr_vs_torch": _psnr(images, reference)}


def run_torch_cuda(model: Any, poses: np.ndarray, reference: np.ndarray, warmup: int = 10, runs: int = 100, precision: str = "fp16") -> dict[str, Any]:
    """The student on the GPU in ``precision`` (fp16 or fp32) as :func:`mg3d.student.gpu.gpu_form` makes it
    (BatchNorm folded, channels-last; in fp16 the residual stack and the texture reads as Triton kernels where it can), compiled
    and replayed from one CUDA graph (:func:`mg3d.student.gpu.graphed`); timed with CUDA events. ``first_ms``
    includes the compilation. Poses go in as fp32: the model computes positions in fp32."""
    import torch

    from mg3d.student.gpu import gpu_form, graphed

    device = torch.device("cuda")
    t = time.perf_counter()
    net = gpu_form(model, torch.float16 if precision == "fp16" else torch.float32, fuse=precision == "fp16", device=device)
    static = torch.from_numpy(poses[:1]).to(device=device, dtype=torch.float32)
    torch.cuda.synchronize()
    load_ms = (time.perf_counter() - t) * 1e3
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        t = time.perf_counter()
        try:  # compiled (inductor fuses the element-wise work), then captured into one CUDA graph
            render = graphed(net, static, warmup=max(warmup, 1))
            compiled = "yes"
        except Exception as exc:  # noqa: BLE001 - a compiler failure costs speed, not the measurement
            render, compiled = graphed(net, static, compile=False, warmup=max(warmup, 1)), f"no ({exc.__class__.__name__})"
        torch.cuda.synchronize()
        first_ms = (time.perf_counter() - t) * 1e3
        times = []
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            render(static)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        images = [render(torch.from_numpy(pose[None]).to(device)).float().cpu().numpy() for pose in poses]
    return {"load_ms": round(load_ms, 2), "first_ms": round(first_ms, 2), **latency_stats(times), "runs": runs,
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1), "psnr_vs_torch": _psnr(np.concatenate(images), reference),
            "kernels": net.kernels, "compiled": compiled}


#: onnxruntime_perf_test's report lines -> our fields (seconds or milliseconds as printed)
_PERF_LINES = {
    "load_ms": (r"Session creation time cost:\s*([\d.]+)\s*s", 1e3),
    "first_ms": (r"First inference time cost:\s*([\d.]+)\s*ms", 1.0),
    "mean_ms": (r"Average inference time cost:\s*([\d.]+)\s*ms", 1.0),
    "median_ms": (r"P50 Latency:\s*([\d.eE+-]+)\s*s", 1e3),
    "p90_ms": (r"P90 Latency:\s*([\d.eE+-]+)\s*s", 1e3),
    "p99_ms": (r"P99 Latency:\s*([\d.eE+-]+)\s*s", 1e3),
    "peak_rss_mb": (r"Peak working set size:\s*(\d+)\s*bytes", 1 / 2**20),
}


def parse_perf_test(text: str) -> dict[str, float]:
    """The figures of an onnxruntime_perf_test report (missing lines are left out)."""
    found = {}
    for key, (pattern, scale) in _PERF_LINES.items():
        match = re.search(pattern, text)
        if match:
            found[key] = round(float(match.group(1)) * scale, 3)
    if "median_ms" in found:
        found["fps"] = round(1e3 / found["median_ms"], 2)
    elif "mean_ms" in found:
        found["fps"] = round(1e3 / found["mean_ms"], 2)
    return found


def runner_path(profile: DeviceProfile) -> Path:
    """Where the Android runner binary named in the profile is expected."""
    return Path.home() / ".mg3d" / "runners" / "android" / profile.runner


def run_adb(path: Path, profile: DeviceProfile, runs: int = 50) -> dict[str, Any]:
    """Push the model and the runner, run it with the profile's provider, parse its report."""
    adb = shutil.which("adb")
    runner = runner_path(profile)
    if adb is None:
        raise BenchError("adb is not installed", hint="apt-get install adb, connect the phone with USB debugging on, or use --estimate")
    if not runner.is_file():
        raise BenchError(f"no runner binary for {profile.name}: {runner} is missing", hint=f"put an Android arm64 build of {profile.runner} there (onnxruntime's build.sh --android --build_shared_lib), or use --estimate")
    remote = "/data/local/tmp/mg3d"
    provider = {"NNAPI": "nnapi", "XNNPACK": "xnnpack", "CPUExecutionProvider": "cpu"}.get(profile.provider, "cpu")
    commands = [
        [adb, "shell", "mkdir", "-p", remote],
        [adb, "push", str(runner), f"{remote}/runner"],
        [adb, "push", str(path), f"{remote}/{path.name}"],
        [adb, "shell", "chmod", "755", f"{remote}/runner"],
    ]
    for command in commands:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise BenchError(f"adb failed on {profile.name}: {(done.stderr or done.stdout).strip()[:200]}", hint="check adb devices and the phone's screen for a USB-debugging prompt")
    done = subprocess.run([adb, "shell", f"{remote}/runner", "-e", provider, "-m", "times", "-r", str(runs), "-x", str(profile.threads or 1), f"{remote}/{path.name}"],
                          capture_output=True, text=True, timeout=1800)
    figures = parse_perf_test(done.stdout + done.stderr)
    if done.returncode != 0 or "fps" not in figures:
        raise BenchError(f"{path.name} failed on {profile.name}: {(done.stderr or done.stdout).strip().splitlines()[-1:] or ['no output']}")
    return {**figures, "runs": runs, "psnr_vs_torch": None}


def estimate(profile: DeviceProfile, macs: float, weight_bytes: float, activation_bytes: float, precision: str) -> dict[str, Any]:
    """Roofline: the slower of compute (2 flops per multiply-add at the profile's peak for ``precision``) and
    memory traffic (weights once plus activations written and read once) at its peak bandwidth."""
    peak = profile.peak
    rate_key = {"fp32": "gflops_fp32", "fp16": "gflops_fp16", "int8": "gops_int8"}[precision]
    rate = peak.get(rate_key) or peak.get("gflops_fp16") or peak.get("gflops_fp32")
    bandwidth = peak.get("bandwidth_gbs")
    if not rate or not bandwidth:
        raise BenchError(f"the {profile.name} profile has no peak rates to estimate from", hint="add peak: gflops_*/bandwidth_gbs to its YAML file")
    compute_ms = 2 * macs / (rate * 1e9) * 1e3
    memory_ms = (weight_bytes + 2 * activation_bytes) / (bandwidth * 1e9) * 1e3
    median = max(compute_ms, memory_ms)
    return {"estimate": True, "median_ms": round(median, 3), "fps": round(1e3 / median, 1), "bound": "compute" if compute_ms >= memory_ms else "memory",
            "compute_ms": round(compute_ms, 3), "memory_ms": round(memory_ms, 3), "peak_source": peak.get("source", "")}
