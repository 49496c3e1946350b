"""Teacher: a fast radiance field (instant-NGP class) trained on the capture, evaluated on held-out views.

Writes ``WS/teacher/``::

    teacher.safetensors   weights and occupancy grid        teacher.json   the model spec
    renders/test_*.png    ground truth | render | depth     manifest.json  config, metrics (PSNR, SSIM)

Training resumes from ``WS/.teacher.partial/checkpoint.safetensors`` after an interruption.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mg3d.config import config_to_dict, switch
from mg3d.errors import ConfigError, DatasetError
from mg3d.workspace import Workspace, sha256_file

STAGE = "teacher"
#: Options that change only how long or how often, not what is learned: a run with other values resumes.
_SCHEDULE_ONLY = ("steps", "max_time_s", "checkpoint_every", "eval_views", "save_views", "chunk", "lr")


@dataclass(frozen=True)
class TeacherConfig:
    """Options of ``mg3d teacher`` (each is a CLI option of the same name)."""

    steps: int = 10000  # about 3 minutes on an H100 (quality preset: 20000)
    max_time_s: float = 0.0  # stop training after this many seconds (0: no limit)
    rays: int = 4096  # rays in the first batch; then adapted to target_samples
    target_samples: int = 1 << 18  # samples per batch the ray count adapts to (0: keep `rays`)
    lr: float = 1e-2
    levels: int = 16
    features: int = 2
    log2_size: int = 19
    max_resolution: int = 2048
    hidden: int = 64
    density_bias: float = -1.0  # log density before training; lower starts transparent
    distortion: float = 0.0  # weight of mip-NeRF 360's distortion loss (against fog and floaters; nerfacto: 0.002)
    grid_resolution: int = 128
    grid_update_every: int = 16
    steps_per_ray: int = 1024  # smallest step = 2 sqrt(3) bound / steps_per_ray
    cone: float = 1 / 256  # step growth with distance, unbounded scenes
    scene: str = "auto"  # auto (bounded for RGBA data, else unbounded), bounded, unbounded
    bound: float = 1.5  # half side of the scene cube, bounded scenes
    near: float = 0.05  # unbounded scenes; bounded ones use the scene's near/far
    far: float = 1000.0
    appearance: int = -1  # per-image embedding size; -1: 16 for captures, 0 for RGBA data
    pose_refine: bool = False
    random_background: bool = True  # RGBA data: composite on random colours while training
    downscale: int = 1
    mixed_precision: bool = True  # bf16 autocast on CUDA
    compile: str = switch("auto")  # torch.compile the hash encoding and the march: auto (on CUDA), on, off
    checkpoint_every: int = 1000
    eval_views: int = 0  # held-out views to evaluate (0: all)
    save_views: int = 4  # side-by-side PNGs to write
    chunk: int = 1 << 20  # rays per render chunk (also capped by a candidate-sample budget)
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scene not in ("auto", "bounded", "unbounded"):
            raise ConfigError(f"scene {self.scene!r} is unknown", hint="use auto, bounded or unbounded")
        for name in ("steps", "rays", "levels", "features", "log2_size", "hidden", "grid_resolution", "grid_update_every", "max_resolution", "steps_per_ray", "downscale", "checkpoint_every", "chunk"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        for name in ("max_time_s", "target_samples", "eval_views", "save_views", "cone", "near", "distortion"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative")
        if self.appearance < -1 or not self.bound > 0 or not self.far > self.near:
            raise ConfigError("appearance must be -1 or more, bound positive, and far greater than near")
        if self.compile not in ("auto", "on", "off"):
            raise ConfigError(f"compile {self.compile!r} is unknown", hint="use auto, on or off")
        if not self.lr > 0:
            raise ConfigError("lr must be positive")


@dataclass
class TeacherResult:
    manifest: dict[str, Any]
    skipped: bool


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name} was asked for but no CUDA GPU is visible", hint="use --device cpu")
    return torch.device(name)


def run(workspace: Workspace, config: TeacherConfig, force: bool = False) -> TeacherResult:
    """Train the teacher on ``WS/capture`` and evaluate it on the held-out views."""
    from mg3d.formats.nerfstudio import load_nerfstudio
    from mg3d.ui import console

    capture = workspace.require("capture", how=f"run mg3d capture VIDEO --out {workspace.root} first")
    inputs = {"capture": {"path": str(capture / "manifest.json"), "sha256": sha256_file(capture / "manifest.json")}}
    config_dict = config_to_dict(config)
    if not force and workspace.is_up_to_date(STAGE, config_dict, inputs):
        console.print(f"teacher in {workspace.root} is up to date (use --force to redo it)")
        return TeacherResult(workspace.manifest(STAGE) or {}, skipped=True)
    _device(config.device)  # a missing GPU is an error before anything is written
    scene = load_nerfstudio(capture / "transforms.json")
    train_idx = scene.splits.get("train")
    if train_idx is None or len(train_idx) == 0:
        raise DatasetError(f"the capture in {capture} has no training images", hint="recapture with --holdout-every 0 or more frames")
    eval_split = next((s for s in ("test", "val") if len(scene.splits.get(s, [])) > 0), None)
    if force:
        import shutil

        shutil.rmtree(workspace.root / f".{STAGE}.partial", ignore_errors=True)

    key_fields = {k: v for k, v in config_dict.items() if k not in _SCHEDULE_ONLY}
    key = hashlib.sha256(json.dumps([key_fields, inputs], sort_keys=True).encode()).hexdigest()[:16]
    with workspace.begin(STAGE, config_dict, inputs, resumable=True) as run_:
        metrics = _train_and_evaluate(scene, train_idx, eval_split, config, run_.path, key, run_)
        run_.metrics.update(metrics)
        run_.outputs.update({"weights": "teacher.safetensors", "spec": "teacher.json"})
    return TeacherResult(run_.manifest, skipped=False)


def _train_and_evaluate(scene: Any, train_idx: Any, eval_split: str | None, config: TeacherConfig, out: Path, key: str, run_: Any) -> dict[str, Any]:
    import torch
    from rich.progress import TextColumn

    from mg3d.teacher.evaluate import evaluate
    from mg3d.teacher.model import ModelSpec, Teacher
    from mg3d.checkpoint import CHECKPOINT, CHECKPOINT_META
    from mg3d.teacher.train import load_views, train
    from mg3d.ui import console, progress

    torch.manual_seed(config.seed)
    device = _device(config.device)
    run_.device = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"
    views = load_views(scene, train_idx, config.downscale, device)
    unbounded = config.scene == "unbounded" or (config.scene == "auto" and not views.has_alpha)
    near, far = (config.near, config.far) if unbounded else (float(scene.near.min()) if scene.near is not None else 0.0, float(scene.far.max()) if scene.far is not None else 1e3)
    spec = ModelSpec(
        unbounded=unbounded, bound=1.0 if unbounded else config.bound, near=near, far=far,
        steps_per_ray=config.steps_per_ray, cone=config.cone if unbounded else 0.0,
        levels=config.levels, features=config.features, log2_size=config.log2_size, max_resolution=config.max_resolution,
        hidden=config.hidden, grid_resolution=config.grid_resolution,
        appearance=(16 if unbounded else 0) if config.appearance < 0 else config.appearance,
        num_images=len(train_idx), pose_refine=config.pose_refine,
        background=(1.0, 1.0, 1.0) if views.has_alpha else None, density_bias=config.density_bias,
    )
    model = Teacher(spec).to(device)
    if config.compile == "on" or (config.compile == "auto" and device.type == "cuda"):
        model.compile_kernels()
    bar = progress()
    bar.columns = (*bar.columns, TextColumn("loss {task.fields[loss]:.4f}  PSNR {task.fields[psnr]:.2f}"))
    with bar:
        metrics = train(model, views, config, out, key, bar)
    model.save(out)
    for name in (CHECKPOINT, CHECKPOINT_META):
        (out / name).unlink(missing_ok=True)  # the finished stage keeps weights, not optimizer state
    del views
    if eval_split is None:
        console.print("[yellow]note:[/] the capture has no held-out views; PSNR/SSIM are not measured")
        return metrics
    t = time.perf_counter()
    metrics.update(evaluate(model, scene, scene.splits[eval_split], config, out / "renders"))
    metrics["eval_split"] = eval_split
    metrics["eval_time_s"] = round(time.perf_counter() - t, 2)
    return metrics
