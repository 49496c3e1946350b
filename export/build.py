"""Builds one target's folder: models, verification, PSNR per variant, delegate coverage, model.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mg3d import __version__
from mg3d.metrics import mean_psnr
from mg3d.workspace import Workspace, sha256_file

POSE_CONVENTION = "OpenGL camera-to-world (x right, y up, the camera looks along -z), in the workspace's normalized scene frame"


class _Views:
    """The poses the export is checked on: random valid poses (verification), pseudo-data poses (int8
    calibration) and the held-out views with their ground truth (PSNR per variant)."""

    def __init__(self, workspace: Workspace, spec: Any, config: Any) -> None:
        from mg3d.formats.nerfstudio import load_nerfstudio
        from mg3d.student.cameras import sample_cameras
        from mg3d.student.evaluate import camera_at, truth_at

        scene = load_nerfstudio(workspace.stage_dir("capture") / "transforms.json")
        train = scene.c2w[scene.splits["train"]]
        distill = workspace.stage_dir("distill")
        meta = json.loads((distill / "distill.json").read_text()) if (distill / "distill.json").is_file() else {}
        kind = meta.get("kind", "auto")
        rng = np.random.default_rng(config.seed)
        self.verify = sample_cameras(train, config.verify_poses, kind=kind, seed=config.seed + 1).astype(np.float32)
        if (distill / "cameras.npy").is_file():
            pseudo = np.load(distill / "cameras.npy", allow_pickle=False).astype(np.float32)
            self.calib = pseudo[rng.choice(len(pseudo), min(config.calib_views, len(pseudo)), replace=False)]
        else:
            self.calib = sample_cameras(train, config.calib_views, kind=kind, seed=config.seed + 2).astype(np.float32)
        split = next((s for s in ("test", "val") if len(scene.splits.get(s, [])) > 0), "train")
        indices = scene.splits[split][: config.eval_views or None]
        self.split = split
        w, h = spec.width_px, spec.height_px
        self.test = np.stack([camera_at(scene, int(i), w, h)[0].numpy() for i in indices]).astype(np.float32)
        # the ground truth is comparable only where the held-out camera has the intrinsics baked into the model
        baked = np.array([spec.fx, spec.fy, spec.cx, spec.cy])
        same = [np.allclose(camera_at(scene, int(i), w, h)[1], baked, rtol=1e-3) for i in indices]
        self.truth = np.stack([truth_at(scene, int(i), w, h).transpose(2, 0, 1) for i in indices]) if all(same) else None


#: Share of the verified pixels of a student with an occupancy march that may differ by more than the
#: tolerance: a ray that grazes an occupancy cell's corner can take the neighbouring cell under another
#: runtime's rounding, which moves that one pixel. A trained lego student: 5 of 1.28 M pixels on 8 poses
#: (up to 0.11), the rest within 8.3e-5 (BENCHMARKS.md).
GRAZING = 1e-4
_WHERE = {False: "", True: " in 99.99% of the pixels"}


def onnx_error(spec: Any, onnx_rgb: np.ndarray, torch_rgb: np.ndarray, tolerance: float) -> tuple[float, dict[str, Any]]:
    """The error of ONNX images [N, 3, H, W] against torch's that the tolerance bounds, and the figures a
    manifest records: the largest per-pixel error, or for a student that marches its occupancy grid the
    error of all but the :data:`GRAZING` share of pixels (the largest and the count past the tolerance too)."""
    per_pixel = np.abs(onnx_rgb - torch_rgb).max(1)
    worst = float(per_pixel.max())
    if not spec.occupancy:
        return worst, {"max_abs_error_fp32": worst}
    checked = float(np.quantile(per_pixel, 1 - GRAZING))
    return checked, {"max_abs_error_fp32": worst, "abs_error_fp32_p9999": checked, "pixels_past_tolerance": int((per_pixel > tolerance).sum()), "pixels": int(per_pixel.size)}


def export_target(workspace: Workspace, config: Any, out: Path) -> dict[str, Any]:
    """Write ``out`` (= WS/export/<target> in the stage's partial folder); return the target's summary."""
    from mg3d.export import onnxmodel as ox
    from mg3d.student.model import NeLF, fold_batchnorm, macs_per_frame, parameter_count
    from mg3d.ui import progress

    student = NeLF.load(workspace.stage_dir("student")).eval()
    spec = student.spec
    views = _Views(workspace, spec, config)
    out.mkdir(parents=True, exist_ok=True)
    work = out / ".work"
    work.mkdir()
    target, precisions = config.target, config.precisions
    steps = 3 + len(precisions) + (target == "android")
    with progress() as bar, torch.no_grad():
        task = bar.add_task(f"exporting for {target}", total=steps)
        net = fold_batchnorm(student)
        reference = np.concatenate([student(torch.from_numpy(p)[None]).numpy() for p in views.verify])
        test_torch = np.concatenate([student(torch.from_numpy(p)[None]).numpy() for p in views.test])
        bar.advance(task)

        # fp32 ONNX: the base of every ONNX variant and the reference the others are measured against
        import onnx

        graph = ox.export_fp32(net, config.opset)
        fp32_path = work / "model.onnx"
        onnx.save(graph, str(fp32_path))
        sess32 = ox.session(fp32_path)
        error, agreement = onnx_error(spec, ox.render(sess32, views.verify), reference, config.tolerance)
        if error > config.tolerance:
            raise ox.ExportError(
                f"the fp32 ONNX model differs from the torch student by {error:.2e}{_WHERE[bool(spec.occupancy)]} on {len(views.verify)} poses (tolerance {config.tolerance:.0e})",
                hint="nothing was exported; raise --tolerance only if you accept that difference",
            )
        fp32_test = ox.render(sess32, views.test)
        bar.advance(task)
        summary: dict[str, Any] = {
            "verification": {"poses": len(views.verify), "tolerance": config.tolerance, **agreement},
            "eval_split": views.split, "eval_views": len(views.test),
            "psnr_torch": mean_psnr(test_torch.clip(0, 1), views.truth) if views.truth is not None else None,
        }
        variants = []
        if target == "ios":
            variants = _coreml_variants(net, spec, config, views, test_torch, out, bar, task)
        else:
            keep32 = ox.encoding_nodes(graph, spec.in_channels) + ox.detail_nodes(graph)
            for precision in precisions:
                path = work / {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}[precision]
                if precision == "fp16":
                    half = ox.to_fp16(graph, keep32)
                    ox.half_tables(half)  # feature planes: stored fp16, read into the fp32 encoding
                    onnx.save(half, str(path))
                elif precision == "int8":
                    ox.to_int8(fp32_path, path, views.calib, ox.block_convs(graph, spec.width, spec.in_channels))
                    if spec.planes or spec.detail:
                        quantized = onnx.load(str(path))
                        ox.half_tables(quantized)
                        onnx.save(quantized, str(path))
                variants.append(_measure(path, precision, fp32_test, views))
                bar.advance(task)
            for v in variants:
                _check_loss(v, config, ox.ExportError)
            if target == "android":
                variants = _to_ort(variants, work, out, views, fp32_test)
                bar.advance(task)
            else:
                for v in variants:
                    shutil.move(str(work / v["file"]), out / v["file"])
            if target == "web":  # the page's resolution switch: the same network on a ray grid half as dense
                variants += _half_resolution(student, views, config, out, fp32_test)
        shutil.rmtree(work)
        bar.advance(task)

    gw, gh = spec.grid
    model_json = {
        "schema": 1, "mg3d": __version__, "target": target,
        "inputs": [{"name": ox.INPUT, "shape": [1, 4, 4], "dtype": "float32", "meaning": POSE_CONVENTION}],
        "outputs": [{"name": ox.OUTPUT, "shape": [1, 3, spec.height_px, spec.width_px], "dtype": "float32", "range": [0, 1], "layout": "NCHW, RGB"}],
        "resolution": [spec.width_px, spec.height_px],
        "intrinsics": {"fx": spec.fx, "fy": spec.fy, "cx": spec.cx, "cy": spec.cy, "baked_in": True},
        "pose_convention": "opengl_c2w",
        "cameras": {"example_pose": views.test[0].tolist(), "scene_center": list(spec.center), "near": spec.near, "far": spec.far},
        "student": {
            "depth": spec.depth, "width": spec.width, "samples": spec.samples, "frequencies": spec.frequencies, "planes": spec.planes, "detail": spec.detail, "occupancy": spec.occupancy, "sr_factor": spec.sr_factor,
            "upsample": spec.upsample, "activation": spec.activation, "norm_folded": spec.norm != "none", "ray_grid": [gw, gh],
            "parameters": parameter_count(net), "gmacs_per_frame": round(macs_per_frame(spec) / 1e9, 3),
        },
        "opset": config.opset if target != "ios" else None,
        **summary,
        "variants": variants,
    }
    (out / "model.json").write_text(json.dumps(model_json, indent=2) + "\n")
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {"target": target, "mg3d": __version__, "files": {str(p.relative_to(out)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return {"eval_views": len(views.test), "max_abs_error_fp32": agreement["max_abs_error_fp32"], "psnr_torch": summary["psnr_torch"],
            "variants": [{k: v[k] for k in ("file", "format", "precision", "mb", "psnr", "psnr_vs_fp32", "psnr_loss_db", "resolution", "psnr_vs_full_downsampled") if k in v} for v in variants]}


def _half_resolution(student: Any, views: _Views, config: Any, out: Path, fp32_test: np.ndarray) -> list[dict[str, Any]]:
    """``model.half.onnx``: the student at half the width and height (the convolutions do not depend on the
    grid size; the intrinsics scale with it), verified against torch at that size, or nothing when the
    half size does not fit the super-resolution factor."""
    import dataclasses

    import onnx
    import torch.nn.functional as F

    from mg3d.export import onnxmodel as ox
    from mg3d.student.model import NeLF, fold_batchnorm

    spec = student.spec
    try:
        half_spec = dataclasses.replace(spec, width_px=spec.width_px // 2, height_px=spec.height_px // 2, fx=spec.fx / 2, fy=spec.fy / 2, cx=spec.cx / 2, cy=spec.cy / 2)
    except Exception:  # noqa: BLE001 - a size the super-resolution factor does not divide: no half variant
        return []
    half = NeLF(half_spec).eval()
    half.load_state_dict(student.state_dict())
    graph = ox.export_fp32(fold_batchnorm(half), config.opset)
    path = out / "model.half.onnx"
    onnx.save(graph, str(path))
    session = ox.session(path)
    reference = np.concatenate([half(torch.from_numpy(p)[None]).numpy() for p in views.verify])
    error, _ = onnx_error(spec, ox.render(session, views.verify), reference, config.tolerance)
    if error > config.tolerance:
        raise ox.ExportError(f"the half-resolution ONNX model differs from torch by {error:.2e}{_WHERE[bool(spec.occupancy)]} (tolerance {config.tolerance:.0e})", hint="nothing was exported")
    images = ox.render(session, views.test)
    full_down = F.interpolate(torch.from_numpy(fp32_test), size=images.shape[2:], mode="area").numpy()
    size = path.stat().st_size
    return [{"file": path.name, "format": "onnx", "precision": "fp32", "bytes": size, "mb": round(size / 1e6, 3),
             "resolution": [half_spec.width_px, half_spec.height_px], "psnr_vs_full_downsampled": round(mean_psnr(images, full_down), 3)}]


def _measure(path: Path, precision: str, fp32_test: np.ndarray, views: _Views, fmt: str = "onnx") -> dict[str, Any]:
    """Size and quality of one model file on the held-out views."""
    from mg3d.export import onnxmodel as ox

    images = fp32_test if precision == "fp32" and fmt == "onnx" else ox.render(ox.session(path), views.test)
    return _variant(path, precision, fmt, images, fp32_test, views)


def _variant(path: Path, precision: str, fmt: str, images: np.ndarray | None, fp32_test: np.ndarray, views: _Views) -> dict[str, Any]:
    size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    entry: dict[str, Any] = {"file": path.name, "format": fmt, "precision": precision, "bytes": size, "mb": round(size / 1e6, 3)}
    if images is not None:
        entry["psnr_vs_fp32"] = round(mean_psnr(images, fp32_test), 3) if not (precision == "fp32" and fmt == "onnx") else None
        if views.truth is not None:
            entry["psnr"] = round(mean_psnr(images, views.truth), 3)
            entry["psnr_loss_db"] = round(mean_psnr(fp32_test, views.truth) - entry["psnr"], 3)
    return entry


def _check_loss(v: dict[str, Any], config: Any, error: type[Exception]) -> None:
    """int8 must not lose more than ``max_int8_loss_db`` against the ground truth (or against fp32 when the
    held-out views have no comparable ground truth: then its PSNR vs fp32 must reach 30 dB)."""
    if v["precision"] != "int8":
        return
    loss = v.get("psnr_loss_db")
    if loss is not None and loss > config.max_int8_loss_db:
        raise error(
            f"the int8 model loses {loss:.2f} dB PSNR against the fp32 model on the held-out views (allowed: {config.max_int8_loss_db} dB)",
            hint="nothing was exported; export without int8 (--precision fp32,fp16), or calibrate on more poses (--calib-views)",
        )
    if loss is None and (v.get("psnr_vs_fp32") or 0) < 30:
        raise error(f"the int8 model is only {v.get('psnr_vs_fp32')} dB PSNR from the fp32 model on the held-out views", hint="export without int8 (--precision fp32,fp16)")


def _to_ort(variants: list[dict[str, Any]], work: Path, out: Path, views: _Views, fp32_test: np.ndarray) -> list[dict[str, Any]]:
    """ONNX Runtime mobile format for each variant, with the delegate coverage of its graph."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    from mg3d.export import onnxmodel as ox
    from mg3d.export.mobile import delegate_coverage

    result = []
    for v in variants:
        src = work / v["file"]
        single = work / "ort" / src.stem
        single.mkdir(parents=True)
        shutil.copy(src, single / src.name)
        # Runtime style: keeps the graph that NNAPI can take and applies CPU-only fusions at load time
        with ox.quiet():
            convert_onnx_models_to_ort(single, output_dir=single, optimization_styles=[OptimizationStyle.Runtime])
        made = next(p for p in single.glob("*.ort"))
        final = out / (src.stem + ".ort")
        shutil.move(str(made), final)
        # the operators a reduced (minimal) onnxruntime build for this model must contain
        config = next(single.glob("required_operators*.config"), None)
        if config is not None:
            shutil.move(str(config), out / f"{src.stem}.required_operators.config")
        entry = _variant(final, v["precision"], "ort", ox.render(ox.session(final), views.test), fp32_test, views)
        entry["delegates"] = delegate_coverage(src)
        entry["session_options"] = {"session.enable_saved_runtime_optimizations": "1"}
        result.append(entry)
    return result


def _coreml_variants(net: torch.nn.Module, spec: Any, config: Any, views: _Views, test_torch: np.ndarray, out: Path, bar: Any, task: Any) -> list[dict[str, Any]]:
    """Core ML packages: fp16 compute (fp32 on request), optionally palettized or int8-weight variants."""
    from mg3d.export import coreml

    base = coreml.convert(net, spec.in_channels)
    coreml.check(base, spec.width_px, spec.height_px)
    made = []
    for precision in config.precisions:
        model = base
        if precision == "fp32":
            model = coreml.convert(net, spec.in_channels, half=False)
        elif precision == "int8":
            model = coreml.quantize_int8(base)
        made.append((precision, f"model.{precision}.mlpackage" if precision != "fp16" else "model.mlpackage", model))
        bar.advance(task)
    if config.palettize:
        made.append((f"palettized-{config.palettize}bit", f"model.palettized-{config.palettize}bit.mlpackage", coreml.palettize(base, config.palettize)))
    variants = []
    for precision, name, model in made:
        model.save(str(out / name))
        images = coreml.predict(model, views.test) if coreml.can_predict() else None
        entry = _variant(out / name, precision, "mlpackage", images, test_torch, views)
        entry["spec"] = coreml.describe(model)
        entry["prediction"] = "compared with torch on the held-out views" if images is not None else "not run: Core ML predicts only on macOS (the spec was checked)"
        variants.append(entry)
    return variants
