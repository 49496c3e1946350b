"""Student: a mobile neural light field (MobileR2L class) distilled from the teacher.

``mg3d distill WS`` renders pseudo views with the teacher (:mod:`mg3d.student.distill`); ``mg3d student WS``
trains the NeLF (:mod:`mg3d.student.model`) on them, fine-tunes on the real training images, and evaluates
it on the held-out views against the ground truth and against the teacher. Writes ``WS/student/``::

    student.safetensors   weights                          student.json   the spec (size, intrinsics, ...)
    renders/test_*.png    truth | teacher | student        manifest.json  config, metrics

Multi-GPU: ``torchrun --nproc_per_node N -m mg3d student WS`` (DDP; gloo on CPU, NCCL on GPUs).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from mg3d.config import config_to_dict
from mg3d.errors import ConfigError
from mg3d.workspace import Workspace, sha256_file

STAGE = "student"
#: Options that change how long or how often, not what is learned: a run with other values resumes.
_SCHEDULE_ONLY = ("steps", "max_time_s", "checkpoint_every", "eval_views", "save_views", "preload_gb", "lr", "plane_lr", "warmup", "finetune_fraction")


@dataclass(frozen=True)
class StudentConfig:
    """Options of ``mg3d student`` (each is a CLI option of the same name)."""

    depth: int = 28  # residual blocks (MobileR2L: 28)
    width: int = 256  # channels (MobileR2L: 256)
    samples: int = 8  # points per ray
    frequencies: int = 6  # positional-encoding frequencies
    planes: int = 0  # channels of learned feature planes read at every ray point (0: none, as MobileR2L)
    plane_resolution: int = 128  # cells per side of each plane
    detail: int = 0  # channels of the per-pixel surface-texture planes (0: none, as MobileR2L); needs the teacher's depth
    detail_resolution: int = 512  # cells per side of each detail plane
    depth_weight: float = 0.1  # weight of the L1 loss between the detail branch's depth and the teacher's (fraction of the sample range)
    occupancy: int = 0  # detail students: cells per side of an occupancy grid baked from the teacher, through which each pixel's ray is marched for its first hit (0: none)
    march_steps: int = 128  # steps of that march over the sample range
    march_box: bool = False  # occupancy students: those steps spread over each ray's chord through the occupied cells' bounding box instead
    head_layers: int = 0  # hidden 1x1 layers of the per-pixel head before the rgb conv (0: none, as MobileR2L)
    head_width: int = 64  # channels of those layers
    detail_lines: bool = False  # detail students: each texture plane's features times a learned line's along the axis it lacks (TensoRF's vector-matrix form)
    detail_view: int = 0  # detail students: frequencies of the viewing direction's encoding read with the surface texture at every pixel (0: none)
    detail_scales: int = 1  # detail students: sets of texture planes at detail_resolution, half of it, ... (K-planes' multi-scale planes)
    detail_product: bool = False  # detail students: the three planes' features multiplied (K-planes' Hadamard product) instead of concatenated
    detail_points: int = 1  # detail students: points along each pixel's ray around the surface where the texture is read (features concatenated)
    detail_spread: float = 2.0  # their spacing, in cells of the finest texture planes
    detail_coarse_once: bool = False  # detail students with several points and scales: the coarser scales read once, at the surface
    sr_factor: int = 8  # super-resolution factor
    upsample: str = "shuffle"  # shuffle (depth-to-space; NNAPI-friendly) or transpose (MobileR2L)
    activation: str = "gelu_tanh"  # gelu_tanh (Tanh: NNAPI and Core ML run it) or gelu (exact; Erf, which NNAPI lacks)
    norm: str = "batch"  # batch (BatchNorm in the blocks, folded into the convolutions at export) or none
    resolution: str = ""  # output size: "" (the pseudo data's), "400" (long side) or "400x300"
    steps: int = 6000  # about 7 minutes at 512x512 on an H100 (quality preset: 20000)
    max_time_s: float = 0.0  # stop after this many seconds of training (0: no limit)
    batch: int = 8  # images per step (per process under torchrun)
    lr: float = 1e-3
    plane_lr: float = 1e-2  # the feature planes learn faster, as hash tables do
    weight_decay: float = 0.0
    warmup: int = 500  # linear warm-up steps, then cosine decay to 1% of lr
    finetune_fraction: float = 0.1  # the last part of training mixes in the real training images
    finetune_real: float = 0.5  # share of each batch that is real images during that part
    mixed_precision: bool = True  # bf16 autocast and channels-last on CUDA
    compile: str = "off"  # torch.compile the network for training: on, off, auto (on CUDA); ~5% faster after ~40 s of compiling
    checkpoint_every: int = 1000
    eval_views: int = 0  # held-out views to evaluate (0: all)
    save_views: int = 4  # side-by-side PNGs to write
    preload_gb: float = 8.0  # keep the pseudo data on the training device when it is smaller than this
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("depth", "width", "samples", "sr_factor", "steps", "batch", "checkpoint_every", "march_steps", "head_width", "detail_scales", "detail_points", "detail_spread"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.plane_resolution < 2:
            raise ConfigError(f"plane_resolution {self.plane_resolution} is too small", hint="use 2 cells or more")
        if self.detail_resolution < 2:
            raise ConfigError(f"detail_resolution {self.detail_resolution} is too small", hint="use 2 cells or more")
        for name in ("frequencies", "planes", "detail", "detail_view", "head_layers", "depth_weight", "occupancy", "max_time_s", "weight_decay", "warmup", "eval_views", "save_views", "preload_gb"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative")
        if self.compile not in ("auto", "on", "off"):
            raise ConfigError(f"compile {self.compile!r} is unknown", hint="use auto, on or off")
        if self.upsample not in ("shuffle", "transpose"):
            raise ConfigError(f"upsample {self.upsample!r} is unknown", hint="use shuffle or transpose")
        if self.activation not in ("gelu_tanh", "gelu"):
            raise ConfigError(f"activation {self.activation!r} is unknown", hint="use gelu_tanh or gelu")
        if self.norm not in ("batch", "none"):
            raise ConfigError(f"norm {self.norm!r} is unknown", hint="use batch or none")
        if not 0 <= self.finetune_fraction <= 1 or not 0 <= self.finetune_real <= 1:
            raise ConfigError("finetune_fraction and finetune_real must be between 0 and 1")
        if not (self.lr > 0 and self.plane_lr > 0):
            raise ConfigError("lr and plane_lr must be positive")
        parse_resolution(self.resolution)


@dataclass
class StudentResult:
    manifest: dict[str, Any]
    skipped: bool


def parse_resolution(text: str) -> tuple[int, int] | int | None:
    """"" -> None, "400" -> 400 (long side), "400x300" -> (400, 300)."""
    text = str(text).strip().lower()
    if not text:
        return None
    try:
        if "x" in text:
            w, h = (int(v) for v in text.split("x"))
            if w > 0 and h > 0:
                return w, h
        elif int(text) > 0:
            return int(text)
    except ValueError:
        pass
    raise ConfigError(f"resolution {text!r} is not understood", hint="use a long side such as 400, or WIDTHxHEIGHT such as 400x300")


def output_size(resolution: str, data_width: int, data_height: int, sr_factor: int) -> tuple[int, int]:
    """The student's output size: the pseudo data's, a long side (short side rounded to a multiple of
    ``sr_factor``) or an exact ``WxH`` (which must be divisible by it)."""
    from mg3d.student.model import check_resolution

    parsed = parse_resolution(resolution)
    if parsed is None:
        w, h = data_width, data_height
    elif isinstance(parsed, int):
        scale = parsed / max(data_width, data_height)
        w, h = (parsed, round(data_height * scale / sr_factor) * sr_factor) if data_width >= data_height else (round(data_width * scale / sr_factor) * sr_factor, parsed)
    else:
        w, h = parsed
    check_resolution(int(w), int(h), sr_factor)
    return int(w), int(h)


def run(workspace: Workspace, config: StudentConfig, force: bool = False) -> StudentResult:
    """Train the student on ``WS/distill`` (+ the real training images) and evaluate it."""
    from mg3d.student.train import distributed, train_stage
    from mg3d.ui import console

    folder = workspace.require("distill", how=f"run mg3d distill {workspace.root} first (it needs a trained teacher: mg3d teacher {workspace.root})")
    inputs = {
        "distill": {"path": str(folder / "manifest.json"), "sha256": sha256_file(folder / "manifest.json")},
    }
    config_dict = config_to_dict(config)
    rank, world = distributed()
    if not force and workspace.is_up_to_date(STAGE, config_dict, inputs):
        if rank == 0:
            console.print(f"student in {workspace.root} is up to date (use --force to redo it)")
        return StudentResult(workspace.manifest(STAGE) or {}, skipped=True)
    _check_data(workspace, folder, config)  # a bad --resolution or missing surfaces fail before anything is written
    key_fields = {k: v for k, v in config_dict.items() if k not in _SCHEDULE_ONLY}
    key = hashlib.sha256(json.dumps([key_fields, inputs, world], sort_keys=True).encode()).hexdigest()[:16]
    if force and rank == 0:
        import shutil

        shutil.rmtree(workspace.root / f".{STAGE}.partial", ignore_errors=True)
    if rank != 0:  # other processes train; rank 0 owns the workspace
        train_stage(workspace, config, workspace.root / f".{STAGE}.partial", key, None)
        return StudentResult({}, skipped=False)
    with workspace.begin(STAGE, config_dict, inputs, resumable=True) as run_:
        run_.metrics.update(train_stage(workspace, config, run_.path, key, run_))
        run_.outputs.update({"weights": "student.safetensors", "spec": "student.json"})
    return StudentResult(run_.manifest, skipped=False)


def _check_data(workspace: Workspace, folder: Any, config: StudentConfig) -> None:
    from mg3d.student.distill import has_surfaces
    from mg3d.student.model import StudentError

    try:
        meta = json.loads((folder / "distill.json").read_text())
        width, height = int(meta["width"]), int(meta["height"])
    except (OSError, ValueError, KeyError) as exc:
        raise StudentError(f"the pseudo data in {folder} is unreadable ({exc.__class__.__name__})", hint="redo it with mg3d distill WS --force") from None
    output_size(config.resolution, width, height, config.sr_factor)
    if config.detail and not has_surfaces(meta):
        raise StudentError("--detail learns where each pixel's ray meets the surface, and this pseudo data has no surface distances (made by an older mg3d)",
                           hint=f"redo it with mg3d distill {workspace.root} --force, or train without --detail")
