"""The sweep: pick the student depth, width and resolution for a device.

1. Latency over a grid of architectures x resolutions with seeded random weights (latency does not depend
   on training): measured on reachable ``local`` devices (onnxruntime, or torch on CUDA) and in headless
   Chromium (``browser``), roofline estimates elsewhere.
2. Keep those that reach the device's target FPS; train the ``top`` largest of them (most multiply-adds,
   the most capacity the device affords) on the workspace's pseudo data, each for an equal share of the
   time budget, and evaluate them on the held-out views.
3. The best PSNR wins. ``WS/bench/choice-<device>.json`` holds it; ``mg3d student WS --for-device D``
   trains that configuration.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mg3d.bench.profiles import BenchError, DeviceProfile, reachable
from mg3d.workspace import Workspace


def _ints(text: str) -> list[int]:
    return [int(v) for v in str(text).split(",") if v.strip()]


def base_spec(workspace: Workspace, sr_factor: int, form: dict[str, Any]) -> Any:
    """The student spec the workspace's pseudo data implies (intrinsics, near/far, centre), at its own size,
    with the texture options ``form`` (:func:`student_form`)."""
    from mg3d.student import StudentConfig
    from mg3d.student.distill import PseudoData
    from mg3d.student.train import build_spec

    data = PseudoData(workspace.require("distill", how=f"run mg3d distill {workspace.root} first"))
    return build_spec(data.meta, StudentConfig(sr_factor=sr_factor, **form))


def student_form(workspace: Workspace) -> dict[str, Any]:
    """The surface-texture options of the workspace's trained student (its manifest's config), so that the
    sweep sizes the same kind of student; without one, the defaults (``surface`` auto)."""
    from mg3d.student import SURFACE_OPTIONS

    config = (workspace.manifest("student") or {}).get("config") or {}
    form = {k: config[k] for k in ("surface", "head_layers", "head_width", *SURFACE_OPTIONS) if k in config}
    if "surface" not in form and form.get("detail"):  # a student from before --surface: its texture was asked for
        form["surface"] = "on"
    return form


def spec_at(base: Any, depth: int, width: int, long_side: int) -> Any:
    """``base`` with another architecture and output size (long side; the short side keeps the aspect,
    rounded to the super-resolution factor)."""
    from mg3d.student import output_size

    w, h = output_size(str(long_side), base.width_px, base.height_px, base.sr_factor)
    sx, sy = w / base.width_px, h / base.height_px
    return replace(base, width_px=w, height_px=h, fx=base.fx * sx, fy=base.fy * sy, cx=base.cx * sx, cy=base.cy * sy, depth=depth, width=width)


def latency_ms(profile: DeviceProfile, spec: Any, estimate: bool, runs: int = 10) -> tuple[float, bool]:
    """(frame time in ms, whether it is an estimate) of ``spec`` with random weights on ``profile``."""
    import torch

    from mg3d.student.model import NeLF, fold_batchnorm

    ok, _ = reachable(profile)
    if estimate or not ok or profile.transport not in ("local", "browser"):
        from mg3d.bench.measure import estimate_row

        return estimate_row(profile, spec, profile.precision if profile.precision in ("fp32", "fp16", "int8") else "fp32", "")["median_ms"], True
    torch.manual_seed(0)
    model = NeLF(spec).eval()
    pose = np.eye(4, dtype=np.float32)[None]
    pose[0, 2, 3] = float(spec.near + spec.far) / 2
    if profile.runtime == "torch":
        from mg3d.bench.runners import run_torch_cuda

        return run_torch_cuda(model, pose, np.zeros((1, 3, spec.height_px, spec.width_px), np.float32), 3, runs * 4, "fp16")["min_ms"], False
    import onnx

    from mg3d.bench.runners import time_runs
    from mg3d.export.onnxmodel import export_fp32, session

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "candidate.onnx"
        onnx.save(export_fp32(fold_batchnorm(model)), str(path))
        if profile.transport == "browser":  # the viewer page in headless Chromium
            from mg3d.bench.runners import run_browser

            blank = np.zeros((1, 3, spec.height_px, spec.width_px), np.float32)
            return run_browser(path, profile, pose, blank, 2, runs, "fp32", (spec.width_px, spec.height_px))["min_ms"], False
        sess = session(path, profile.threads)
        _, times = time_runs(lambda: sess.run(None, {"c2w": pose}), 3, runs)
    return min(times), False


def sweep(workspace: Workspace, profile: DeviceProfile, config: Any) -> dict[str, Any]:
    """Run the sweep for one device; returns {"rows", "trained", "choice"} (the choice also as a file)."""
    from mg3d.student import StudentConfig
    from mg3d.student.model import macs_per_frame
    from mg3d.student.train import train_stage
    from mg3d.ui import progress

    ok, status = reachable(profile)
    if not ok and not config.estimate:
        raise BenchError(f"{profile.name} is not reachable: {status}", hint=f"or sweep on estimated latencies: mg3d bench {workspace.root} --device {profile.name} --sweep --estimate")
    form = student_form(workspace)  # read once: the grid and every trained candidate share it
    base = base_spec(workspace, config.sweep_sr_factor, form)
    grid = [(d, w, s) for s in _ints(config.sweep_sizes) for d in _ints(config.sweep_depths) for w in _ints(config.sweep_widths)]
    specs = [(d, w, size, spec_at(base, d, w, size)) for d, w, size in grid]
    best_ms: dict[int, tuple[float, bool]] = {}
    with progress() as bar:
        # two passes, the second in reverse order, keeping each candidate's fastest: the first model of a
        # new size measured in a process can run up to 2x slow (allocator warm-up), whatever came before it
        task = bar.add_task(f"latency grid on {profile.name}", total=2 * len(grid))
        for order in (range(len(specs)), reversed(range(len(specs)))):
            for i in order:
                ms, estimated = latency_ms(profile, specs[i][3], config.estimate)
                best_ms[i] = min(best_ms.get(i, (ms, estimated)), (ms, estimated))
                bar.advance(task)
    rows = []
    for i, (depth, width, size, spec) in enumerate(specs):
        ms, estimated = best_ms[i]
        rows.append({"depth": depth, "width": width, "resolution": [spec.width_px, spec.height_px], "long_side": size, "gmacs": round(macs_per_frame(spec) / 1e9, 4),
                     "latency_ms": round(ms, 3), "fps": round(1e3 / ms, 2), "estimate": estimated, "meets_target": 1e3 / ms >= profile.target_fps})
    feasible = sorted((r for r in rows if r["meets_target"]), key=lambda r: r["gmacs"], reverse=True)
    if not feasible:
        fastest = max(rows, key=lambda r: r["fps"])
        raise BenchError(
            f"no student in the grid reaches {profile.target_fps:g} FPS on {profile.name}; the fastest ({fastest['depth']}x{fastest['width']} at {fastest['long_side']} px) reaches {fastest['fps']:g}",
            hint="add smaller sizes to --sweep-depths/--sweep-widths/--sweep-sizes, or lower target_fps in the device profile",
        )
    promising = feasible[: config.sweep_top]
    share = config.sweep_budget_s / len(promising)
    trained = []
    for row in promising:
        student_config = StudentConfig(depth=row["depth"], width=row["width"], sr_factor=config.sweep_sr_factor, resolution=str(row["long_side"]), **form,
                                       steps=1_000_000, max_time_s=share, warmup=50, checkpoint_every=1_000_000, eval_views=config.sweep_eval_views, save_views=0)
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            metrics = train_stage(workspace, student_config, Path(tmp), f"sweep-{row['depth']}-{row['width']}-{row['long_side']}", None, with_teacher=False)
        trained.append({**row, "psnr": metrics.get("psnr"), "steps": metrics.get("steps"), "train_s": round(time.perf_counter() - t, 1)})
    scored = [t for t in trained if t["psnr"] is not None] or trained
    best = max(scored, key=lambda t: (t["psnr"] or 0.0, t["gmacs"]))
    choice = {"device": profile.name, "target_fps": profile.target_fps, "depth": best["depth"], "width": best["width"], "sr_factor": config.sweep_sr_factor,
              "resolution": str(best["long_side"]), "fps": best["fps"], "psnr": best["psnr"], "estimate": best["estimate"],
              "how": f"best PSNR of the {len(trained)} largest students that reach {profile.target_fps:g} FPS, each trained {share:.0f} s"}
    return {"rows": rows, "trained": trained, "choice": choice}


def read_choice(workspace: Path, device: str) -> dict[str, Any]:
    """The sweep's choice for ``device`` (a name or alias), or a BenchError saying how to make one."""
    from mg3d.bench.profiles import resolve
    from mg3d.errors import WorkspaceError

    name = resolve(device).name
    path = Path(workspace) / "bench" / f"choice-{name}.json"
    if not path.is_file():
        raise WorkspaceError(f"{workspace} has no sweep result for {name}", hint=f"run: mg3d bench {workspace} --device {name} --sweep")
    return json.loads(path.read_text())
