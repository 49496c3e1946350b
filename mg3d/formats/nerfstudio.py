"""nerfstudio ``transforms.json``: read (shared or per-frame intrinsics; PINHOLE, OPENCV, OPENCV_FISHEYE)
and write, so a capture made by mg3d opens in nerfstudio and a nerfstudio dataset opens in mg3d.

mg3d adds keys nerfstudio ignores: ``mg3d_normalization`` and ``mg3d_background`` (top level) and
``mg3d_near``/``mg3d_far`` (per frame). Splits use nerfstudio's ``train_filenames`` / ``val_filenames`` / ``test_filenames``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from mg3d.errors import DatasetError
from mg3d.formats.ply import read_ply, write_ply
from mg3d.scene import CAMERA_MODELS, DISTORTION_KEYS, Normalization, Scene, resolve_inside

_INTRINSIC_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h", "camera_model", *DISTORTION_KEYS)
SPLIT_KEYS = {"train": "train_filenames", "val": "val_filenames", "test": "test_filenames"}


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} is not valid JSON ({exc})", hint="fix or regenerate the file") from None


def frame_pose(frame: Any, i: int, file: Path) -> np.ndarray:  # -> [4, 4]
    """The ``transform_matrix`` of frame ``i`` of ``file`` (which must also have a ``file_path``)."""
    if not isinstance(frame, dict) or "file_path" not in frame or "transform_matrix" not in frame:
        raise DatasetError(f"{file}: frame {i} needs file_path and transform_matrix")
    try:
        matrix = np.asarray(frame["transform_matrix"], dtype=np.float64)
    except (TypeError, ValueError):
        raise DatasetError(f"{file}: frame {i} transform_matrix is not a matrix of numbers") from None
    if matrix.shape not in ((4, 4), (3, 4)):
        raise DatasetError(f"{file}: frame {i} transform_matrix has shape {matrix.shape}, expected 4x4")
    return np.vstack([matrix[:3], [0, 0, 0, 1]])


def load_nerfstudio(path: str | Path) -> Scene:
    """Read a nerfstudio dataset: ``path`` is ``transforms.json`` or the folder holding it."""
    path = Path(path)
    file = path / "transforms.json" if path.is_dir() else path
    root = file.parent
    meta = read_json(file)
    frames = meta.get("frames") if isinstance(meta, dict) else None
    if not frames:
        raise DatasetError(f"{file} has no frames", hint="a transforms.json lists its images under 'frames'")

    def value(frame: dict, key: str, default: Any = None) -> Any:
        return frame.get(key, meta.get(key, default))

    paths, c2w, masks, intr, near, far = [], [], [], {k: [] for k in _INTRINSIC_KEYS}, [], []
    for i, frame in enumerate(frames):
        c2w.append(frame_pose(frame, i, file))
        paths.append(resolve_inside(root, frame["file_path"]))
        masks.append(resolve_inside(root, frame["mask_path"], "mask_path") if frame.get("mask_path") else None)
        fl_x = value(frame, "fl_x")
        w, h = value(frame, "w"), value(frame, "h")
        if fl_x is None or w is None or h is None:
            raise DatasetError(f"{file}: frame {i} has no fl_x, w and h (neither per frame nor shared)")
        try:
            fl_x, w, h = float(fl_x), int(w), int(h)
        except (TypeError, ValueError):
            raise DatasetError(f"{file}: frame {i} fl_x/w/h are not numbers") from None
        model = value(frame, "camera_model", "OPENCV")
        if model not in CAMERA_MODELS:
            raise DatasetError(f"{file}: camera_model {model} is not supported", hint=f"use one of {', '.join(CAMERA_MODELS)}")
        for key, default in (("fl_x", fl_x), ("fl_y", fl_x), ("cx", w / 2), ("cy", h / 2), ("w", w), ("h", h)):
            intr[key].append(value(frame, key, default))
        intr["camera_model"].append(model)
        for key in DISTORTION_KEYS:
            intr[key].append(value(frame, key, 0.0))
        near.append(frame.get("mg3d_near"))
        far.append(frame.get("mg3d_far"))

    names = [str(Path(f["file_path"]).as_posix()) for f in frames]
    splits = _read_splits(meta, names, file)
    missing = [name for name, p in zip(names, paths) if not p.is_file()]
    if missing:
        raise DatasetError(f"{file}: {len(missing)} image(s) do not exist, e.g. {missing[0]!r}", hint="fix file_path or restore the images")
    points = colors = None
    if meta.get("ply_file_path"):
        points, colors = read_ply(resolve_inside(root, meta["ply_file_path"], "ply_file_path"))
    norm = Normalization.from_dict(meta["mg3d_normalization"]) if "mg3d_normalization" in meta else Normalization()
    distortion = np.stack([np.asarray(intr[k], dtype=np.float64) for k in DISTORTION_KEYS], 1)
    return Scene(
        image_paths=paths,
        c2w=np.stack(c2w),
        fx=intr["fl_x"], fy=intr["fl_y"], cx=intr["cx"], cy=intr["cy"], width=intr["w"], height=intr["h"],
        camera_model=intr["camera_model"],
        distortion=distortion,
        near=None if None in near else np.asarray(near, dtype=np.float64),
        far=None if None in far else np.asarray(far, dtype=np.float64),
        splits=splits,
        normalization=norm,
        points=points,
        point_colors=colors,
        mask_paths=masks if any(m is not None for m in masks) else None,
        background=tuple(meta["mg3d_background"]) if "mg3d_background" in meta else None,
        source="nerfstudio",
    )


def _read_splits(meta: dict, names: list[str], file: Path) -> dict[str, np.ndarray]:
    index = {os.path.normpath(n): i for i, n in enumerate(names)}
    splits = {}
    for split, key in SPLIT_KEYS.items():
        if key not in meta:
            continue
        if not isinstance(meta[key], list):
            raise DatasetError(f"{file}: {key} must be a list of file paths")
        missing = [n for n in meta[key] if os.path.normpath(n) not in index]
        if missing:
            raise DatasetError(f"{file}: {key} names {missing[0]!r}, which is not among the frames")
        splits[split] = np.array([index[os.path.normpath(n)] for n in meta[key]], dtype=np.int64)
    return splits or {"train": np.arange(len(names))}


def write_nerfstudio(scene: Scene, out_dir: str | Path, copy_images: bool = True, image_dir: str = "images") -> Path:
    """Write ``out_dir/transforms.json`` (and ``sparse_pc.ply`` when the scene has points).

    Images already inside ``out_dir`` are referenced where they are; others are copied into
    ``out_dir/<image_dir>/`` (or, with ``copy_images=False``, an error is raised, since a relative path
    out of the folder would not be readable back). Intrinsics shared by all frames are written once at
    the top level, as nerfstudio does.

    Returns:
        The path of the written ``transforms.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    out_real = os.path.realpath(out)

    def place(src: Path, i: int, subdir: str) -> str:
        src_real = os.path.realpath(src)
        if os.path.commonpath([out_real, src_real]) == out_real:
            return Path(os.path.relpath(src_real, out_real)).as_posix()
        if not copy_images:
            raise DatasetError(f"{src} lies outside {out}", hint="write with copy_images=True")
        dst = out / subdir / f"{i:05d}_{Path(src).name}"
        dst.parent.mkdir(exist_ok=True)
        shutil.copy2(src, dst)
        return dst.relative_to(out).as_posix()

    rel_paths = [place(src, i, image_dir) for i, src in enumerate(scene.image_paths)]
    per_image = {
        "fl_x": scene.fx, "fl_y": scene.fy, "cx": scene.cx, "cy": scene.cy, "w": scene.width, "h": scene.height,
        "camera_model": np.asarray(scene.camera_model),
        **{k: scene.distortion[:, j] for j, k in enumerate(DISTORTION_KEYS)},
    }
    shared = {k: v[0].item() for k, v in per_image.items() if np.all(v == v[0])}
    meta: dict[str, Any] = dict(shared)
    frames = []
    for i, rel in enumerate(rel_paths):
        frame: dict[str, Any] = {"file_path": rel, "transform_matrix": scene.c2w[i].tolist()}
        frame.update({k: v[i].item() for k, v in per_image.items() if k not in shared})
        if scene.mask_paths is not None and scene.mask_paths[i] is not None:
            frame["mask_path"] = place(scene.mask_paths[i], i, "masks")
        if scene.near is not None and scene.far is not None:
            frame["mg3d_near"], frame["mg3d_far"] = float(scene.near[i]), float(scene.far[i])
        frames.append(frame)
    meta["frames"] = frames
    for split, idx in scene.splits.items():
        if split in SPLIT_KEYS:
            meta[SPLIT_KEYS[split]] = [rel_paths[i] for i in idx]
    if scene.points is not None and len(scene.points):
        write_ply(out / "sparse_pc.ply", scene.points, scene.point_colors)
        meta["ply_file_path"] = "sparse_pc.ply"
    meta["mg3d_normalization"] = scene.normalization.to_dict()
    if scene.background is not None:
        meta["mg3d_background"] = [float(c) for c in scene.background]
    file = out / "transforms.json"
    file.write_text(json.dumps(meta, indent=2) + "\n")
    return file
