"""Export: one self-contained model per target, simplified, verified against the torch student, quantized.

``mg3d export WS --target onnx|android|ios|web`` writes ``WS/export/<target>/``::

    model.onnx / model.fp16.onnx / model.int8.onnx     (onnx, web; android adds model*.ort)
    model.mlpackage / model.palettized-4bit.mlpackage  (ios)
    model.json      inputs/outputs, resolution, intrinsics, pose convention, and per variant: precision,
                    size, verification against torch, PSNR against fp32 and the ground truth on the held-out
                    views, delegate coverage (android, ios)
    manifest.json   every file with its size and SHA-256

Every model takes ``c2w`` [1, 4, 4] (OpenGL camera-to-world, the workspace's scene frame) and returns
``rgb`` [1, 3, H, W] in [0, 1]; intrinsics are baked in. Nothing is marked done unless the fp32 model matches
the torch student within ``tolerance`` and the int8 model loses at most ``max_int8_loss_db``. Exporting a
second target keeps the first (``WS/export/`` holds one folder per target; ``mg3d info`` shows their sizes).
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from dataclasses import dataclass
from typing import Any

from mg3d.config import config_to_dict
from mg3d.errors import ConfigError
from mg3d.workspace import Workspace, sha256_file

STAGE = "export"
TARGETS = ("onnx", "android", "ios", "web")
PRECISIONS = ("fp32", "fp16", "int8")
#: What each target gets when --precision is not given.
DEFAULT_PRECISIONS = {"onnx": "fp32,fp16,int8", "android": "fp32,int8", "ios": "fp16", "web": "fp32,fp16"}
#: Precisions each target can hold (Core ML programs compute in fp16 or fp32; int8 there is weight compression).
ALLOWED_PRECISIONS = {"onnx": PRECISIONS, "android": PRECISIONS, "ios": PRECISIONS, "web": ("fp32", "fp16")}
PALETTE_BITS = (4, 6, 8)
#: Python packages each target needs, and the extra that installs them.
NEEDS = {"onnx": ("onnx", "onnxslim", "onnxruntime"), "ios": ("coremltools",)}


@dataclass(frozen=True)
class ExportConfig:
    """Options of ``mg3d export`` (each is a CLI option of the same name)."""

    target: str = "onnx"
    precision: str = ""  # comma-separated fp32,fp16,int8; "": the target's defaults (DEFAULT_PRECISIONS)
    palettize: int = 0  # ios: also write a palettized (k-means LUT) variant with this many bits: 4, 6 or 8
    opset: int = 17
    tolerance: float = 1e-4  # largest |fp32 ONNX - torch| allowed on the verification poses
    verify_poses: int = 8  # random poses from the training-camera distribution for that check
    calib_views: int = 32  # pseudo-data poses that calibrate the int8 activations
    eval_views: int = 0  # held-out views for the PSNR of each variant (0: all)
    max_int8_loss_db: float = 0.5  # the int8 model may lose at most this much PSNR against the ground truth
    seed: int = 0

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ConfigError(f"unknown target {self.target!r}", hint=f"valid targets: {', '.join(TARGETS)}")
        for name in self.precisions:
            if name not in PRECISIONS:
                raise ConfigError(f"unknown precision {name!r}", hint=f"valid precisions: {', '.join(PRECISIONS)}")
            if name not in ALLOWED_PRECISIONS[self.target]:
                raise ConfigError(f"precision {name} is not offered for target {self.target}", hint=f"choose from {', '.join(ALLOWED_PRECISIONS[self.target])}")
        if self.palettize and self.palettize not in PALETTE_BITS:
            raise ConfigError(f"--palettize {self.palettize} is not supported", hint="use 4, 6 or 8 bits")
        if self.palettize and self.target != "ios":
            raise ConfigError("--palettize applies to Core ML only", hint="use it with --target ios")
        if self.opset < 17:
            raise ConfigError(f"opset {self.opset} is too old", hint="use 17 or newer")
        if not self.tolerance > 0 or self.verify_poses < 1 or self.calib_views < 1 or self.eval_views < 0 or self.max_int8_loss_db < 0:
            raise ConfigError("tolerance must be positive, verify_poses and calib_views at least 1, eval_views and max_int8_loss_db not negative")

    @property
    def precisions(self) -> list[str]:
        text = self.precision or DEFAULT_PRECISIONS.get(self.target, "fp32")
        names = [p.strip().lower() for p in text.split(",") if p.strip()]
        return list(dict.fromkeys(names))


@dataclass
class ExportResult:
    manifest: dict[str, Any]
    skipped: bool


def check_dependencies(target: str) -> None:
    """Fail before anything is written when a package the target needs is missing."""
    from mg3d.export.onnxmodel import ExportError

    needed = NEEDS["onnx"] + (NEEDS["ios"] if target == "ios" else ())
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        extra = "coreml" if "coremltools" in missing else "export"
        raise ExportError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed (needed for --target {target})", hint=f"pip install 'mg3d[{extra}]'")


def run(workspace: Workspace, config: ExportConfig, force: bool = False) -> ExportResult:
    """Export the workspace's student for ``config.target`` into ``WS/export/<target>/``."""
    from mg3d.ui import console

    student_dir = workspace.require("student", how=f"train one with: mg3d student {workspace.root}")
    check_dependencies(config.target)
    inputs = {"student": {"path": str(student_dir / "student.safetensors"), "sha256": sha256_file(student_dir / "student.safetensors")}}
    wanted = config_to_dict(config)
    old = workspace.manifest(STAGE) or {}
    same_student = {k: v.get("sha256") for k, v in old.get("inputs", {}).items()} == {k: v["sha256"] for k, v in inputs.items()}
    old_targets: dict[str, Any] = old.get("config", {}).get("targets", {}) if same_student else {}
    done_before = (workspace.stage_dir(STAGE) / config.target / "model.json").is_file()
    if not force and old_targets.get(config.target) == wanted and done_before:
        console.print(f"export for {config.target} in {workspace.root} is up to date (use --force to redo it)")
        return ExportResult(old, skipped=True)
    keep = {t: c for t, c in old_targets.items() if t != config.target and (workspace.stage_dir(STAGE) / t / "model.json").is_file()}
    dropped = sorted(set(old.get("config", {}).get("targets", {})) - set(keep) - {config.target})
    if dropped:
        console.print(f"the student changed since the last export: dropping the old {', '.join(dropped)} export (run mg3d export again for it)")
    with workspace.begin(STAGE, {"targets": {**keep, config.target: wanted}}, inputs) as run_:
        for target in keep:
            shutil.copytree(workspace.stage_dir(STAGE) / target, run_.path / target)
        from mg3d.export.build import export_target

        t0 = time.perf_counter()
        summary = export_target(workspace, config, run_.path / config.target)
        summary["seconds"] = round(time.perf_counter() - t0, 3)
        previous = old.get("metrics", {}).get("targets", {})
        run_.metrics["targets"] = {**{t: previous[t] for t in keep if t in previous}, config.target: summary}
        # one target per run: the stage's time is that of every target it holds
        run_.metrics["duration_s"] = round(sum(t.get("seconds", 0.0) for t in run_.metrics["targets"].values()), 3)
        for target in (*keep, config.target):
            run_.outputs[target] = f"{target}/model.json"
    return ExportResult(run_.manifest, skipped=False)


def size_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per exported variant (target, file, precision, MB, PSNR loss) for ``mg3d info``."""
    rows = []
    for target, summary in manifest.get("metrics", {}).get("targets", {}).items():
        for v in summary.get("variants", []):
            rows.append({"target": target, **{k: v.get(k) for k in ("file", "precision", "format", "mb", "psnr_vs_fp32", "psnr_loss_db")}})
    return rows
