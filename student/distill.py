"""Pseudo data: novel cameras drawn like the training cameras, rendered by the teacher, stored in shards.

Writes ``WS/distill/``::

    distill.json          size, intrinsics, count, shards, the depth range seen, camera kind
    cameras.npy           [N, 4, 4] float32 OpenGL camera-to-world of every view
    shard_0000.npy ...    [n, H, W, 3] uint8 (or float16) images, read back memory-mapped
    surface_0000.npy ...  [n, H, W] float16 distance along each pixel's ray to the teacher's surface (0: none)
    preview.png           a contact sheet of the first views

An interrupted run keeps its finished shards (``WS/.distill.partial/``) and renders only the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mg3d.config import config_to_dict
from mg3d.errors import ConfigError
from mg3d.workspace import Workspace, sha256_file

STAGE = "distill"


@dataclass(frozen=True)
class DistillConfig:
    """Options of ``mg3d distill`` (each is a CLI option of the same name)."""

    views: int = 2000  # pseudo views to render (MobileR2L and the quality preset: 10,000)
    resolution: int = 0  # long side in pixels (0: the teacher's training images); rounded to a multiple of 16
    trajectory: str = "auto"  # auto, orbit (object-centric), path (hand-held / forward-facing)
    jitter: float = 0.5  # path cameras: perturbation as a fraction of the spacing between training cameras
    shard_size: int = 500  # views per shard file
    dtype: str = "uint8"  # uint8 or float16
    chunk: int = 1 << 20  # rays per teacher render chunk (also capped by a candidate-sample budget)
    device: str = "auto"
    seed: int = 0
    source: str = "auto"  # the field to render: auto (the active edit, else the teacher), teacher, edit, or an edit's name

    def __post_init__(self) -> None:
        if not self.source:
            raise ConfigError("source must not be empty", hint="use auto, teacher, edit or the name of an edit")
        if self.views < 1 or self.shard_size < 1 or self.chunk < 1 or self.resolution < 0 or self.jitter < 0:
            raise ConfigError("views, shard_size and chunk must be positive; resolution and jitter not negative")
        if self.trajectory not in ("auto", "orbit", "path"):
            raise ConfigError(f"trajectory {self.trajectory!r} is unknown", hint="use auto, orbit or path")
        if self.dtype not in ("uint8", "float16"):
            raise ConfigError(f"dtype {self.dtype!r} is unknown", hint="use uint8 or float16")
        if self.resolution and self.resolution < 16:
            raise ConfigError(f"resolution {self.resolution} is too small", hint="use 16 pixels or more")


@dataclass
class DistillResult:
    manifest: dict[str, Any]
    skipped: bool


def pseudo_size(width: float, height: float, long_side: int) -> tuple[int, int]:
    """Pseudo-image size: ``long_side`` (0: keep) with the aspect ratio kept, both sides multiples of 16."""
    scale = long_side / max(width, height) if long_side else 1.0
    return max(16, int(round(width * scale / 16)) * 16), max(16, int(round(height * scale / 16)) * 16)


def teacher_input(workspace: Workspace, source: str = "auto") -> dict[str, Any]:
    """The radiance field this stage reads (the teacher, or an edit of it), as a manifest input entry."""
    workspace.require("teacher", how=f"run mg3d teacher {workspace.root} first")
    stage = workspace.field_source(source)
    folder = workspace.stage_dir(stage)
    entry = {"path": str(folder / "manifest.json"), "sha256": sha256_file(folder / "manifest.json")}
    return {"teacher": entry} if stage == "teacher" else {"edit": {**entry, "stage": stage}}


def run(workspace: Workspace, config: DistillConfig, force: bool = False) -> DistillResult:
    """Render ``config.views`` pseudo views with the teacher into ``WS/distill``."""
    from mg3d.formats.nerfstudio import load_nerfstudio
    from mg3d.teacher import _device
    from mg3d.ui import console

    inputs = teacher_input(workspace, config.source)
    source = workspace.field_source(config.source)
    config_dict = config_to_dict(config)
    if not force and workspace.is_up_to_date(STAGE, config_dict, inputs):
        console.print(f"distill in {workspace.root} is up to date (use --force to redo it)")
        return DistillResult(workspace.manifest(STAGE) or {}, skipped=True)
    device = _device(config.device)
    scene = load_nerfstudio(workspace.stage_dir("capture") / "transforms.json")
    teacher_manifest = workspace.manifest("teacher") or {}
    downscale = int(teacher_manifest.get("config", {}).get("downscale", 1))
    train_idx = scene.splits["train"]
    if force:
        import shutil

        shutil.rmtree(workspace.root / f".{STAGE}.partial", ignore_errors=True)
    key = hashlib.sha256(json.dumps([{k: v for k, v in config_dict.items() if k not in ("chunk", "device")}, inputs], sort_keys=True).encode()).hexdigest()[:16]
    with workspace.begin(STAGE, config_dict, inputs, resumable=True) as run_:
        run_.device = f"{device} ({_gpu_name(device)})" if device.type == "cuda" else "cpu"
        run_.metrics.update(_render(workspace, source, scene, train_idx, downscale, config, device, run_.path, key))
        run_.outputs.update({"meta": "distill.json", "cameras": "cameras.npy"})
    return DistillResult(run_.manifest, skipped=False)


def _gpu_name(device: Any) -> str:
    import torch

    return torch.cuda.get_device_name(device)


def _render(workspace: Workspace, source: str, scene: Any, train_idx: np.ndarray, downscale: int, config: DistillConfig, device: Any, out: Path, key: str) -> dict[str, Any]:
    import torch

    from mg3d.student.cameras import camera_kind, sample_cameras
    from mg3d.teacher.model import Teacher
    from mg3d.ui import progress

    train_c2w = scene.c2w[train_idx]
    kind = camera_kind(train_c2w) if config.trajectory == "auto" else config.trajectory
    src_w, src_h = float(np.median(scene.width[train_idx])) / downscale, float(np.median(scene.height[train_idx])) / downscale
    width, height = pseudo_size(src_w, src_h, config.resolution)
    sx, sy = width / np.median(scene.width[train_idx]), height / np.median(scene.height[train_idx])
    fx, fy = float(np.median(scene.fx[train_idx]) * sx), float(np.median(scene.fy[train_idx]) * sy)
    cx, cy = float(np.median(scene.cx[train_idx]) * sx), float(np.median(scene.cy[train_idx]) * sy)
    cameras = sample_cameras(train_c2w, config.views, kind, seed=config.seed, jitter=config.jitter)

    key_path = out / "key.json"
    if key_path.is_file() and json.loads(key_path.read_text()).get("key") != key:
        for stale in out.glob("*"):
            stale.unlink()  # leftovers of a run with other options: start over
    key_path.write_text(json.dumps({"key": key}))
    np.save(out / "cameras.npy", cameras)

    teacher = Teacher.load(workspace.stage_dir(source), device=device)
    if device.type == "cuda":
        teacher.compile_kernels()  # fused hash encoding and candidate pass (tests/test_teacher_parity.py checks both)
    dtype = np.uint8 if config.dtype == "uint8" else np.float16
    shards = [(s, min(s + config.shard_size, config.views)) for s in range(0, config.views, config.shard_size)]
    t0, rendered = time.perf_counter(), 0
    with progress() as bar:
        task = bar.add_task("rendering pseudo views", total=config.views)
        for n, (start, stop) in enumerate(shards):
            path = out / f"shard_{n:04d}.npy"
            if path.is_file() and (out / f"depth_{n:04d}.npy").is_file() and (out / f"surface_{n:04d}.npy").is_file():
                bar.advance(task, stop - start)
                continue
            images = np.lib.format.open_memmap(str(path) + ".tmp", mode="w+", dtype=dtype, shape=(stop - start, height, width, 3))
            surface = np.lib.format.open_memmap(str(out / f"surface_{n:04d}.npy") + ".tmp", mode="w+", dtype=np.float16, shape=(stop - start, height, width))
            ranges = np.full((stop - start, 2), np.nan, np.float32)
            for i in range(start, stop):
                rgb, surface_map, depth_range = _render_one(teacher, cameras[i], fx, fy, cx, cy, width, height, config.chunk)
                images[i - start] = (rgb * 255 + 0.5).astype(np.uint8) if dtype == np.uint8 else rgb.astype(np.float16)
                surface[i - start] = surface_map
                ranges[i - start] = depth_range
                rendered += 1
                bar.advance(task)
            images.flush()
            surface.flush()
            del images, surface
            np.save(out / f"depth_{n:04d}.npy", ranges)
            os.replace(str(out / f"surface_{n:04d}.npy") + ".tmp", out / f"surface_{n:04d}.npy")
            os.replace(str(path) + ".tmp", path)  # a shard exists only when it is complete
    render_s = time.perf_counter() - t0
    ranges = np.concatenate([np.load(out / f"depth_{n:04d}.npy") for n in range(len(shards))])
    near, far = _depth_range(ranges, teacher)
    meta = {
        "schema": 1, "count": config.views, "width": width, "height": height, "fx": fx, "fy": fy, "cx": cx, "cy": cy,
        "dtype": config.dtype, "shards": [f"shard_{n:04d}.npy" for n in range(len(shards))], "kind": kind,
        "surfaces": [f"surface_{n:04d}.npy" for n in range(len(shards))],
        "near": near, "far": far, "unbounded": bool(teacher.spec.unbounded),
        "bound": float(teacher.spec.bound), "background": teacher.spec.background, "source": source,
    }
    (out / "distill.json").write_text(json.dumps(meta, indent=2) + "\n")
    key_path.unlink()
    _preview(out, meta)
    del teacher
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "views": config.views, "resolution": [width, height], "kind": kind, "source": source, "near": round(near, 4), "far": round(far, 4),
        "rendered_now": rendered, "render_fps": round(rendered / max(render_s, 1e-9), 2),
        "bytes": int(sum((out / s).stat().st_size for s in meta["shards"])),
    }


def _render_one(teacher: Any, c2w: np.ndarray, fx: float, fy: float, cx: float, cy: float, width: int, height: int, chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One view: rgb [H, W, 3] float in [0, 1], the distance to the surface along each pixel's ray [H, W]
    float16 (the weights' mean distance; 0 where the pixel is less than half opaque) and the 1st/99th
    percentile of those distances."""
    import torch

    out = teacher.render(torch.from_numpy(c2w)[None], fx, fy, cx, cy, width, height, chunk=chunk)
    surface, opaque = (t[0] for t in teacher.surface(out))
    depth = surface[opaque]
    if depth.numel() > 16:
        q = torch.quantile(depth.float()[:: max(1, depth.numel() // 65536)], torch.tensor([0.01, 0.99], device=depth.device))
        depth_range = q.cpu().numpy()
    else:
        depth_range = np.array([np.nan, np.nan], np.float32)
    return out["rgb"][0].float().cpu().numpy(), surface.half().cpu().numpy(), depth_range


def _depth_range(ranges: np.ndarray, teacher: Any) -> tuple[float, float]:
    """Where the student should put its samples: the depths the teacher's opaque pixels have, with a margin."""
    valid = ranges[np.isfinite(ranges).all(1)]
    if len(valid) == 0:  # an empty scene: fall back on the teacher's range
        return float(teacher.spec.near), float(min(teacher.spec.far, 100.0))
    near = float(np.percentile(valid[:, 0], 1)) * 0.9
    far = float(np.percentile(valid[:, 1], 99)) / 0.9
    return max(near, 1e-3), max(far, near * 1.5)


def _preview(out: Path, meta: dict[str, Any], count: int = 16) -> None:
    from PIL import Image

    images = np.load(out / meta["shards"][0], mmap_mode="r")[:count]
    if images.dtype != np.uint8:
        images = (np.clip(images.astype(np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
    cols = min(4, len(images))
    rows = (len(images) + cols - 1) // cols
    h, w = images.shape[1:3]
    sheet = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for k, img in enumerate(images):
        sheet[(k // cols) * h : (k // cols + 1) * h, (k % cols) * w : (k % cols + 1) * w] = img
    Image.fromarray(sheet).save(out / "preview.png")


def has_surfaces(meta: dict[str, Any]) -> bool:
    """Whether pseudo data (its ``distill.json``) holds surface distances for every shard (older data has none)."""
    return len(meta.get("surfaces", [])) == len(meta.get("shards", []))


class PseudoData:
    """The pseudo views of ``WS/distill``, memory-mapped.

    images [N, H, W, 3] (uint8 or float16) are read lazily from the shards; cameras [N, 4, 4]; surfaces
    [N, H, W] float16 (distance to the teacher's surface, 0: none) where the data has them (``has_surfaces``).
    """

    def __init__(self, folder: Path) -> None:
        from mg3d.student.model import StudentError

        try:
            self.meta = json.loads((folder / "distill.json").read_text())
            self.cameras = np.load(folder / "cameras.npy", allow_pickle=False)
            self.shards = [np.load(folder / name, mmap_mode="r", allow_pickle=False) for name in self.meta["shards"]]
            # pseudo data made before surfaces were stored has none; the detail branch needs them
            self.surfaces = [np.load(folder / name, mmap_mode="r", allow_pickle=False) for name in self.meta.get("surfaces", [])]
        except (OSError, ValueError, KeyError) as exc:
            raise StudentError(f"the pseudo data in {folder} is unreadable ({exc.__class__.__name__})", hint="redo it with mg3d distill WS --force") from None
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        if self.offsets[-1] != len(self.cameras):
            raise StudentError(f"the pseudo data in {folder} has {self.offsets[-1]} images for {len(self.cameras)} cameras", hint="redo it with mg3d distill WS --force")
        cams = self.cameras
        if cams.ndim != 3 or cams.shape[1:] != (4, 4) or not np.issubdtype(cams.dtype, np.floating):
            raise StudentError(f"the pseudo data in {folder} holds cameras of {cams.dtype} {list(cams.shape)}, not [N, 4, 4] poses", hint="redo it with mg3d distill WS --force")
        bad = ~np.isfinite(cams).all(axis=(1, 2))
        if bad.any():  # training would end in a "divergence" with the hint to lower the learning rate
            raise StudentError(f"the pseudo data in {folder} has {int(bad.sum())} camera(s) with NaN or infinite entries (the first: view {int(np.argmax(bad))})",
                               hint="redo it with mg3d distill WS --force")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def nbytes(self) -> int:
        return int(sum(s.nbytes for s in self.shards))

    @property
    def surface_nbytes(self) -> int:
        return int(sum(s.nbytes for s in self.surfaces))

    def _rows(self, arrays: list[np.ndarray], indices: np.ndarray) -> np.ndarray:
        """The given views' rows of per-shard arrays (images or surfaces), stacked."""
        shard = np.searchsorted(self.offsets, indices, side="right") - 1
        return np.stack([arrays[s][i - self.offsets[s]] for s, i in zip(shard, indices)])

    def images(self, indices: np.ndarray) -> np.ndarray:
        """Images [len(indices), H, W, 3] of the given views."""
        return self._rows(self.shards, indices)

    @property
    def has_surfaces(self) -> bool:
        return has_surfaces(self.meta)

    def surface(self, indices: np.ndarray) -> np.ndarray:
        """Surface distances [len(indices), H, W] float16 of the given views."""
        return self._rows(self.surfaces, indices)

    def all_images(self) -> np.ndarray:
        return np.concatenate([np.asarray(s) for s in self.shards])

    def all_surfaces(self) -> np.ndarray:
        return np.concatenate([np.asarray(s) for s in self.surfaces])
