"""One device: pick the exported variants it runs, measure (or estimate) each, and label every figure."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from mg3d.bench.profiles import BenchError, DeviceProfile, reachable
from mg3d.workspace import Workspace

#: Which export target each transport/runtime loads, and the file suffix it takes.
_EXPORTS = {("local", "onnxruntime"): ("onnx", ".onnx"), ("adb", "onnxruntime"): ("android", ".ort"),
            ("ios", "coreml"): ("ios", ".mlpackage"), ("browser", "onnxruntime-web"): ("web", ".onnx"),
            ("qemu", "onnxruntime"): ("onnx", ".onnx")}
_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}


def bench_device(workspace: Workspace, profile: DeviceProfile, config: Any) -> dict[str, Any]:
    """Every figure for one device: {"device", "profile", "status", "rows": [...]} (errors are rows too)."""
    from mg3d.student.model import NeLF

    student = NeLF.load(workspace.stage_dir("student")).eval()
    ok, status = reachable(profile)
    result: dict[str, Any] = {"device": profile.name, "description": profile.description, "runtime": profile.runtime,
                              "provider": profile.provider, "threads": profile.threads, "target_fps": profile.target_fps,
                              "status": status, "mode": "estimate" if config.estimate else "measured", "rows": []}
    if not ok and not config.estimate:
        raise BenchError(f"{profile.name} is not reachable: {status}", hint=f"or get estimated figures: mg3d bench {workspace.root} --device {profile.name} --estimate")
    variants = _variants(workspace, profile, config)
    if config.estimate:
        result["rows"] = [estimate_row(profile, student.spec, precision, name) for name, precision in variants]
        return result
    poses, reference = _reference(workspace, student, config.views)
    for name, precision in variants:
        row = _label(profile, student.spec, precision, name)
        try:
            row.update(_measure(workspace, profile, student, name, precision, poses, reference, config))
        except BenchError as exc:  # the runtime's error, and the other variants still run
            row["error"] = str(exc)
        result["rows"].append(row)
    return result


def _variants(workspace: Workspace, profile: DeviceProfile, config: Any) -> list[tuple[str, str]]:
    """(file, precision) pairs to run: the export for the profile's runtime, filtered by --precision."""
    wanted = config.precision or profile.precision
    if profile.runtime == "torch":
        return [("student (torch)", p) for p in (("fp16", "fp32") if wanted == "all" else (wanted,))]
    target, suffix = _EXPORTS[(profile.transport, profile.runtime)]
    folder = workspace.stage_dir("export") / target
    meta_path = folder / "model.json"
    if not meta_path.is_file():
        if config.estimate:
            return [(f"model ({p})", p) for p in (("fp32", "fp16", "int8") if wanted == "all" else (wanted,))]
        raise BenchError(f"{workspace.root} has no export for {target} (needed by {profile.name})", hint=f"make it with: mg3d export {workspace.root} --target {target}")
    # variants at another resolution than the student's (the web export's half-size model) are not compared with its reference
    variants = [(v["file"], v["precision"]) for v in json.loads(meta_path.read_text())["variants"] if v["file"].endswith(suffix) and "resolution" not in v]
    chosen = [v for v in variants if wanted == "all" or v[1] == wanted] or variants  # the profile's precision if exported, else all
    return chosen


def _label(profile: DeviceProfile, spec: Any, precision: str, name: str) -> dict[str, Any]:
    return {"device": profile.name, "runtime": profile.runtime, "provider": profile.provider, "threads": profile.threads,
            "precision": precision, "resolution": [spec.width_px, spec.height_px], "file": name}


def _reference(workspace: Workspace, student: Any, views: int) -> tuple[np.ndarray, np.ndarray]:
    """Held-out poses and the torch fp32 student's images of them."""
    import torch

    from mg3d.formats.nerfstudio import load_nerfstudio

    scene = load_nerfstudio(workspace.stage_dir("capture") / "transforms.json")
    split = next((s for s in ("test", "val", "train") if len(scene.splits.get(s, [])) > 0))
    poses = scene.c2w[scene.splits[split][:views]].astype(np.float32)
    with torch.no_grad():
        reference = np.concatenate([student(torch.from_numpy(p)[None]).numpy() for p in poses])
    return poses, reference


def _measure(workspace: Workspace, profile: DeviceProfile, student: Any, name: str, precision: str, poses: np.ndarray, reference: np.ndarray, config: Any) -> dict[str, Any]:
    from mg3d.bench import runners

    if profile.runtime == "torch":
        return runners.run_torch_cuda(student, poses, reference, config.warmup, config.runs, precision)
    target, _ = _EXPORTS[(profile.transport, profile.runtime)]
    path = workspace.stage_dir("export") / target / name
    if profile.transport == "local":
        return runners.run_onnx_local(path, profile, poses, reference, config.warmup, config.runs)
    if profile.transport == "adb":
        return runners.run_adb(path, profile, config.runs)
    if profile.transport == "qemu":  # numerics only: no latency figure comes from an emulator
        from mg3d.bench.arm64 import run_arm64

        return run_arm64(path, poses, reference)
    if profile.transport == "browser":
        return runners.run_browser(path, profile, poses, reference, config.warmup, config.runs, precision, (student.spec.width_px, student.spec.height_px))
    raise BenchError(f"measuring on {profile.transport} devices is not available here", hint="use --estimate")


def estimate_row(profile: DeviceProfile, spec: Any, precision: str, name: str) -> dict[str, Any]:
    from mg3d.bench.runners import estimate
    from mg3d.student.model import macs_per_frame, sr_channels

    gw, gh = spec.grid
    pixels = gw * gh
    params = spec.in_channels * spec.width + spec.depth * 2 * spec.width * (spec.width + 1) + 3 * spec.plane_resolution**2 * spec.planes
    elements = pixels * (spec.in_channels + 2 * spec.depth * spec.width)
    scale, c = 1, spec.width  # c: channels of the last stage (the blocks' with no super-resolution)
    for c in sr_channels(spec.width, int(math.log2(spec.sr_factor))):
        scale *= 2
        elements += pixels * scale * scale * 3 * c
        params += 4 * c * c * 9
    if spec.detail:  # the surface-detail planes, and per pixel the 12 corner reads and the fuse
        params += sum(3 * r * r * spec.detail for r in spec.detail_resolutions) + (3 * spec.detail_resolution * spec.detail if spec.detail_lines else 0)
        elements += pixels * scale * scale * (12 * spec.detail * spec.detail_scales * spec.detail_points + 2 * c + spec.detail_channels + spec.view_channels)
    for _ in range(spec.head_layers):  # the head's hidden 1x1 layers at every pixel
        params += c * spec.head_width + spec.head_width
        elements += pixels * scale * scale * spec.head_width
        c = spec.head_width
    act_bytes = 2 if precision != "fp32" else 4  # int8 models keep fp16/fp32 activations in places; count 2
    row = _label(profile, spec, precision, name)
    row.update(estimate(profile, macs_per_frame(spec), params * _BYTES[precision], elements * act_bytes, precision))
    return row
