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

from mg3d.config import config_to_dict, switch
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
    # The per-pixel surface texture (``surface``) and its form. The defaults are the best lego student measured
    # (BENCHMARKS.md): 3-scale product planes of 8 channels read at 3 points, a 64-step march through the box of
    # a 256-cell occupancy grid, the viewing direction and a 2x64 per-pixel head.
    surface: str = switch("auto")  # auto: on for bounded scenes (RGBA data) whose pseudo views hold the teacher's surface distances, off for unbounded captures; on; off (MobileR2L's student)
    detail: int = 8  # channels of the surface-texture planes (0: no texture, as --surface off)
    detail_resolution: int = 512  # cells per side of each detail plane
    depth_weight: float = 0.1  # weight of the L1 loss between the detail branch's depth and the teacher's (fraction of the sample range)
    occupancy: int = 256  # cells per side of an occupancy grid baked from the teacher, through which each pixel's ray is marched for its first hit (0: none)
    march_steps: int = 64  # steps of that march
    march_box: bool = True  # those steps spread over each ray's chord through the occupied cells' bounding box (else over the sample range)
    head_layers: int = -1  # hidden 1x1 layers of the per-pixel head before the rgb conv (-1: 2 with the surface texture, 0 without, as MobileR2L)
    head_width: int = 64  # channels of those layers
    detail_lines: bool = False  # each texture plane's features times a learned line's along the axis it lacks (TensoRF's vector-matrix form)
    detail_view: int = 2  # frequencies of the viewing direction's encoding read with the surface texture at every pixel (0: none)
    detail_scales: int = 3  # sets of texture planes at detail_resolution, half of it, ... (K-planes' multi-scale planes)
    detail_product: bool = True  # the three planes' features multiplied (K-planes' Hadamard product) instead of concatenated
    detail_points: int = 3  # points along each pixel's ray around the surface where the texture is read (features concatenated)
    detail_spread: float = 2.0  # their spacing, in cells of the finest texture planes
    detail_coarse_once: bool = True  # with several points and scales: the coarser scales read once, at the surface
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
    compile: str = switch("off")  # torch.compile the network for training: on, off, auto (on CUDA); ~5% faster after ~40 s of compiling
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
        for name in ("frequencies", "planes", "detail", "detail_view", "depth_weight", "occupancy", "max_time_s", "weight_decay", "warmup", "eval_views", "save_views", "preload_gb"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative")
        if self.head_layers < -1:
            raise ConfigError(f"head_layers {self.head_layers} is out of range", hint="use 0 or more, or -1 (2 with the surface texture, 0 without)")
        if self.surface not in ("auto", "on", "off"):
            raise ConfigError(f"surface {self.surface!r} is unknown", hint="use auto, on or off")
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


#: Options that shape only the surface texture and its march (``surface``): with the texture off, a value other
#: than the default is reported, not dropped. All but ``depth_weight`` (a loss weight) are fields of the spec.
SURFACE_OPTIONS = ("detail", "detail_resolution", "occupancy", "march_steps", "march_box", "detail_lines", "detail_view", "detail_scales", "detail_product",
                   "detail_points", "detail_spread", "detail_coarse_once", "depth_weight")


def surface_choice(config: StudentConfig, meta: dict[str, Any]) -> tuple[bool, str]:
    """Whether the student gets the per-pixel surface texture on pseudo data ``meta`` (its distill.json), and
    why. ``auto`` turns it on for a bounded scene (RGBA data, such as Blender's) whose pseudo views hold the
    teacher's surface distances: on lego it scores 28.9 dB after the default 6,000 steps (4.8 minutes on an
    H200), where MobileR2L's form has stayed at 22.1-23.7 dB in every minutes-long run (BENCHMARKS.md). An
    unbounded capture gets MobileR2L's student: on the woman-512 video it scores 33.90 dB after the default
    6,000 steps, 0.04 dB below its teacher, and with the texture (on or off its occupancy grid) 0.7-1.4 dB less
    than without it at equal training time. Texture options changed while it is off are a ConfigError, so that
    nothing the user asked for is dropped in silence."""
    from mg3d.student.distill import has_surfaces

    if config.detail == 0:
        on, why = False, "detail is 0"
    elif config.surface != "auto":
        on, why = config.surface == "on", f"surface is {config.surface}"
    elif meta.get("unbounded"):
        on, why = False, "the capture is unbounded (there MobileR2L's form matched its teacher and the texture scored lower)"
    elif not has_surfaces(meta):
        on, why = False, "the pseudo views hold no surface distances (made by an older mg3d)"
    else:
        on, why = True, "a bounded scene with the teacher's surface distances"
    if not on:
        defaults = StudentConfig()
        changed = [n for n in SURFACE_OPTIONS if getattr(config, n) != getattr(defaults, n) and not (n == "detail" and config.detail == 0)]
        if changed:
            said = ", ".join(f"{n} {getattr(config, n)}" for n in changed)
            raise ConfigError(f"{said}: {'it shapes' if len(changed) == 1 else 'they shape'} the surface detail, which is off here: {why}",
                              hint="add --surface on to train the texture anyway, or leave these options out")
    return on, why


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
    if surface_choice(config, meta)[0] and not has_surfaces(meta):  # only --surface on gets here without them
        raise StudentError("the surface texture learns where each pixel's ray meets the surface, and this pseudo data has no surface distances (made by an older mg3d)",
                           hint=f"redo it with mg3d distill {workspace.root} --force, or train with --surface off")
