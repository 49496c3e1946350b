"""Benchmark the teacher: train on a dataset or workspace for a time budget, evaluate on the held-out
views, and time rendering (median of repeated renders after warm-up, CUDA-synchronised).

    python scripts/bench_teacher.py ../shared/data/lego-400 --max-time 300 --out results/
    python scripts/bench_teacher.py ws-woman --max-time 180 --set appearance=16 --out results/

Writes ``<out>/teacher_<name>.json`` (the manifest metrics plus render timing) and the evaluation PNGs.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a dataset (imported first) or an mg3d workspace")
    parser.add_argument("--max-time", type=float, default=300.0, help="training budget in seconds")
    parser.add_argument("--steps", type=int, default=100000)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--set", action="append", default=[], help="teacher option KEY=VALUE (YAML value)")
    parser.add_argument("--render-repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    opts = parser.parse_args()

    import torch

    from mg3d.capture import CaptureConfig
    from mg3d.capture import run as capture
    from mg3d.config import resolve_config
    from mg3d.formats import load_scene
    from mg3d.teacher import TeacherConfig
    from mg3d.teacher import run as teach
    from mg3d.teacher.model import Teacher
    from mg3d.workspace import Workspace

    opts.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp())
    if (opts.source / "capture" / "manifest.json").is_file():
        ws_path = tmp / "ws"
        shutil.copytree(opts.source, ws_path)
    else:
        ws_path = tmp / "ws"
        capture(opts.source, CaptureConfig(), Workspace(ws_path))
    overrides = {"steps": opts.steps, "max_time_s": opts.max_time}
    for item in opts.set:
        key, value = item.split("=", 1)
        overrides[key] = yaml.safe_load(value)
    config = resolve_config(TeacherConfig, "teacher", opts.preset, overrides=overrides)
    result = teach(Workspace(ws_path), config, force=True)
    metrics = dict(result.manifest["metrics"])

    # Render speed: one held-out camera at the evaluation size, after warm-up.
    scene = load_scene(ws_path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = Teacher.load(ws_path / "teacher", device)
    if config.compile == "on" or (config.compile == "auto" and device.type == "cuda"):
        model.compile_kernels()
    i = int(scene.splits.get("test", scene.splits["train"])[0])
    w, h = metrics.get("eval_resolution", [int(scene.width[i]), int(scene.height[i])])
    sx, sy = w / scene.width[i], h / scene.height[i]
    args = (scene.c2w[i][None], scene.fx[i] * sx, scene.fy[i] * sy, scene.cx[i] * sx, scene.cy[i] * sy, w, h)
    times = []
    for k in range(3 + opts.render_repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        model.render(*args, chunk=config.chunk)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if k >= 3:
            times.append(time.perf_counter() - t)
    metrics["render_ms_median"] = round(1000 * statistics.median(times), 2)
    metrics["render_fps"] = round(1.0 / statistics.median(times), 2)
    metrics["device"] = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    metrics["config"] = {k: v for k, v in result.manifest["config"].items() if k in overrides or k in ("levels", "log2_size", "target_samples")}

    name = opts.source.name
    (opts.out / f"teacher_{name}.json").write_text(json.dumps(metrics, indent=1))
    for png in sorted((ws_path / "teacher" / "renders").glob("*.png"))[:2]:
        shutil.copy(png, opts.out / f"{name}_{png.name}")
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
