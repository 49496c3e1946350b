"""Capture: a video or a folder of photos -> frames -> structure-from-motion -> a normalized Scene.

Writes ``WS/capture/``::

    images/frame_00000.png ...   undistorted (pinhole) frames that registered
    transforms.json              nerfstudio format; train/test split; mg3d normalization, near/far
    sparse_pc.ply                sparse points in the same (normalized) coordinates
    colmap/                      the pinhole COLMAP model (original SfM coordinates)
    frames.json                  which source frame each image came from, its sharpness, registration
    overview.png                 contact sheet and a top view of cameras and points
    manifest.json                config, input hash, metrics (registered frames, reprojection error, times)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mg3d.config import config_to_dict
from mg3d.errors import CaptureError, ConfigError, DatasetError, InputError
from mg3d.scene import IMAGE_SUFFIXES
from mg3d.workspace import Workspace, hash_input

STAGE = "capture"


@dataclass(frozen=True)
class CaptureConfig:
    """Options of ``mg3d capture`` (each is a CLI option of the same name)."""

    frames: int | None = None  # exactly this many frames (an error if the input has fewer); None: max_frames
    max_frames: int = 100  # without `frames`: up to this many, fewer when the input is shorter
    max_size: int = 512  # long side of the frames, pixels (InstructPix2Pix edits best near 512)
    matcher: str = "auto"  # auto (sequential for video, exhaustive for photos), sequential, exhaustive
    mapper: str = "incremental"  # incremental, or global (GLOMAP)
    camera_model: str = "SIMPLE_RADIAL"  # COLMAP model solved for; undistorted to pinhole afterwards
    holdout_every: int = 8  # every k-th frame goes to the test split; 0 keeps all for training
    min_registered_fraction: float = 0.5  # fail when fewer frames than this register
    threads: int = -1  # -1: all cores
    seed: int = 0

    def __post_init__(self) -> None:
        from mg3d.capture.sfm import COLMAP_CAMERA_MODELS

        if self.max_frames < 5:
            raise ConfigError(f"max_frames {self.max_frames} is too few", hint="use at least 5")
        if self.max_size < 32:
            raise ConfigError(f"max_size {self.max_size} is too small", hint="use at least 32 pixels")
        if self.matcher not in ("auto", "sequential", "exhaustive"):
            raise ConfigError(f"matcher {self.matcher!r} is unknown", hint="use auto, sequential or exhaustive")
        if self.mapper not in ("incremental", "global"):
            raise ConfigError(f"mapper {self.mapper!r} is unknown", hint="use incremental or global")
        if self.camera_model not in COLMAP_CAMERA_MODELS:
            raise ConfigError(f"camera_model {self.camera_model!r} is unknown", hint=f"use one of {', '.join(COLMAP_CAMERA_MODELS)}")
        if self.holdout_every < 0 or self.holdout_every == 1:
            raise ConfigError("holdout_every must be 0 (no test split) or at least 2")
        if not 0 < self.min_registered_fraction <= 1:
            raise ConfigError("min_registered_fraction must be in (0, 1]")


@dataclass
class CaptureResult:
    manifest: dict[str, Any]
    skipped: bool  # the stage was already up to date


def holdout_split(n: int, every: int) -> dict[str, np.ndarray]:
    """Every ``every``-th frame (0, k, 2k, ...) is held out for evaluation, as in LLFF/mip-NeRF practice."""
    idx = np.arange(n)
    if every <= 0:
        return {"train": idx}
    test = idx % every == 0
    return {"train": idx[~test], "test": idx[test]}


def run(source: Path, config: CaptureConfig, workspace: Workspace, force: bool = False, verbose: bool = False) -> CaptureResult:
    """Run the capture stage on a video file, a folder of photos, or a posed dataset."""
    from mg3d.capture.frames import is_video, probe_video
    from mg3d.ui import console

    source = Path(source)
    if not source.exists():
        raise InputError(f"{source} does not exist", hint="pass a video file or a folder of photos")
    if source.is_file() and source.suffix.lower() in IMAGE_SUFFIXES:
        raise InputError(f"{source} is a single image", hint="pass the folder that holds all the photos")
    if source.is_file() and not is_video(source):
        probe_video(source)  # an unusual suffix: accept it only if it really is a video
    inputs = {"source": hash_input(source)}
    config_dict = config_to_dict(config)
    if not force and workspace.is_up_to_date(STAGE, config_dict, inputs):
        console.print(f"capture in {workspace.root} is up to date (use --force to redo it)")
        return CaptureResult(workspace.manifest(STAGE) or {}, skipped=True)

    posed = _posed_format(source)
    with workspace.begin(STAGE, config_dict, inputs) as run_:
        if posed:
            scene = _import_posed(source, posed, config, run_.path)
            run_.metrics.update({"imported_format": posed, "frames_selected": len(scene), "frames_registered": len(scene)})
        else:
            scene = _reconstruct(source, config, run_.path, run_.metrics, verbose)
        run_.metrics.update({
            "points3d": int(len(scene.points)) if scene.points is not None else 0,
            "train_images": int(scene.splits["train"].size),
            "test_images": int(scene.splits.get("test", np.empty(0)).size),
            "image_size": [int(scene.width[0]), int(scene.height[0])],
            "focal_px": round(float(scene.fx[0]), 2),
        })
        run_.outputs.update({"transforms": "transforms.json", "images": "images", "overview": "overview.png"})
    skipped = run_.metrics["frames_selected"] - run_.metrics["frames_registered"]
    if skipped:
        console.print(f"[yellow]note:[/] {skipped} of {run_.metrics['frames_selected']} frames did not register and were left out")
    return CaptureResult(run_.manifest, skipped=False)


def _reconstruct(source: Path, config: CaptureConfig, out: Path, metrics: dict[str, Any], verbose: bool) -> Any:
    """Frames from a video or photos, SfM, normalization; writes the stage files into ``out``."""
    from mg3d.capture.frames import select_photos, select_video_frames
    from mg3d.capture.overview import draw_overview
    from mg3d.capture.sfm import run_sfm
    from mg3d.formats.nerfstudio import write_nerfstudio
    from mg3d.ui import progress

    video = source.is_file()
    scratch = out / "_work"
    raw = scratch / "frames"
    raw.mkdir(parents=True)
    t = time.perf_counter()
    with progress() as bar:
        task = bar.add_task("reading video" if video else "reading photos", total=None)
        on_frame = lambda done, total: bar.update(task, completed=done, total=total)  # noqa: E731
        if video:
            frames = select_video_frames(source, config.frames, config.max_size, config.max_frames, on_frame)
        else:
            frames = select_photos(source, config.frames, config.max_size, config.max_frames, on_frame)
        names = [f"frame_{i:05d}.png" for i in range(len(frames))]
        for name, frame in zip(names, frames):
            frame.image.save(raw / name)
    decode_s = time.perf_counter() - t

    sfm = run_sfm(
        raw, scratch, ordered=video, single_camera=video, camera_model=config.camera_model,
        matcher=config.matcher, mapper=config.mapper, min_registered_fraction=config.min_registered_fraction,
        threads=config.threads, seed=config.seed, verbose=verbose,
    )
    scene = _finish_scene(sfm, out, config)
    write_nerfstudio(scene, out, copy_images=False)
    registered = {p.name for p in scene.image_paths}
    (out / "frames.json").write_text(json.dumps([
        {"name": name, "source": f.source_name, "source_index": f.source_index, "time_s": f.time_s,
         "sharpness": round(f.sharpness, 6), "registered": name in registered}
        for name, f in zip(names, frames)
    ], indent=1) + "\n")
    draw_overview(scene, out / "overview.png", title=f"{source.name}: {len(scene)}/{len(frames)} frames registered")
    shutil.rmtree(scratch)
    metrics.update({
        "frames_selected": len(frames),
        "frames_registered": sfm.num_registered,
        "registered_fraction": round(sfm.num_registered / len(frames), 4),
        "mean_reprojection_error_px": round(sfm.mean_reprojection_error, 4),
        "mean_track_length": round(float(sfm.reconstruction.compute_mean_track_length()), 3),
        "matcher": sfm.matcher,
        "decode_s": round(decode_s, 3),
        **sfm.timings,
    })
    return scene


def _posed_format(source: Path) -> str | None:
    """The dataset format when ``source`` already has camera poses, else None (photos or a video)."""
    from mg3d.formats import detect_format

    if not source.is_dir():
        return None
    try:
        return detect_format(source)
    except DatasetError:
        return None


def _import_posed(source: Path, fmt: str, config: CaptureConfig, out: Path) -> Any:
    """Copy a posed dataset into ``out`` as nerfstudio data, shrinking images above ``max_size``.

    Coordinates are kept as the dataset has them (its normalization is carried over); a dataset with only
    a training split gets the every-k-th hold-out split.
    """
    from mg3d.capture.overview import draw_overview
    from mg3d.formats import load_scene
    from mg3d.formats.nerfstudio import write_nerfstudio
    from mg3d.imageio import image_size, open_image, resize_long_side
    from mg3d.ui import progress

    scene = load_scene(source, fmt)
    images = out / "images"
    images.mkdir()
    new_paths, sizes = [], []
    with progress() as bar:
        task = bar.add_task(f"importing {fmt} images", total=len(scene))
        for i, src in enumerate(scene.image_paths):
            dst = images / f"{i:05d}_{src.stem}.png"
            size = image_size(src)
            if max(size) > config.max_size or src.suffix.lower() != ".png":
                image = resize_long_side(open_image(src), config.max_size)
                image.save(dst)
                size = image.size
            else:
                _link_or_copy(src, dst)
            new_paths.append(dst)
            sizes.append(size)
            bar.advance(task)
    sizes_arr = np.asarray(sizes, dtype=np.float64)
    sx, sy = sizes_arr[:, 0] / scene.width, sizes_arr[:, 1] / scene.height
    scene = dataclasses.replace(
        scene, image_paths=new_paths, fx=scene.fx * sx, fy=scene.fy * sy, cx=scene.cx * sx, cy=scene.cy * sy,
        width=sizes_arr[:, 0], height=sizes_arr[:, 1], mask_paths=None,
    )
    if set(scene.splits) == {"train"}:
        scene.splits = holdout_split(len(scene), config.holdout_every)
    write_nerfstudio(scene, out, copy_images=False)
    draw_overview(scene, out / "overview.png", title=f"{source.name}: {len(scene)} posed images ({fmt})")
    return scene


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


def _finish_scene(sfm: Any, out: Path, config: CaptureConfig) -> Any:
    """Move the registered pinhole images and model into ``out``; normalize; split; near/far."""
    from mg3d.formats.colmap import has_pose, scene_from_reconstruction
    from mg3d.scene import auto_normalization

    images = out / "images"
    images.mkdir()
    for image in filter(has_pose, sfm.reconstruction.images.values()):
        shutil.move(str(sfm.image_dir / image.name), images / image.name)
    colmap_dir = out / "colmap"
    colmap_dir.mkdir()
    sfm.reconstruction.write(colmap_dir)
    scene = scene_from_reconstruction(sfm.reconstruction, images)
    if not scene.is_pinhole:
        raise CaptureError("undistortion left a camera with distortion", hint="report this with the input")
    scene = scene.transformed(auto_normalization(scene.c2w, scene.points))
    scene.splits = holdout_split(len(scene), config.holdout_every)
    scene.source = "mg3d capture"
    return scene
