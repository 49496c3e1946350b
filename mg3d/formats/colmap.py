"""COLMAP sparse models (through ``pycolmap.Reconstruction``) to :class:`~mg3d.scene.Scene`.

COLMAP stores world-to-camera poses in OpenCV axes; they are inverted and flipped to OpenGL
camera-to-world here, the only place that conversion happens. Camera models map onto nerfstudio's:
SIMPLE_PINHOLE/PINHOLE -> PINHOLE, SIMPLE_RADIAL/RADIAL/OPENCV -> OPENCV, the fisheye ones ->
OPENCV_FISHEYE.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mg3d.errors import DatasetError
from mg3d.scene import OPENCV_TO_OPENGL, Scene, near_far_from_points, resolve_inside

_MODEL_FILES = ("cameras.bin", "cameras.txt")


def find_colmap_model(path: Path) -> Path | None:
    """The folder holding a sparse model at or under ``path`` (``.``, ``sparse/0``, ``sparse``, ``colmap``, ``colmap/sparse/0``)."""
    for candidate in (path, path / "sparse" / "0", path / "sparse", path / "colmap", path / "colmap" / "sparse" / "0"):
        if any((candidate / name).is_file() for name in _MODEL_FILES):
            return candidate
    return None


def _camera(camera: Any) -> tuple[str, list[float], list[float]]:
    """(nerfstudio model, [fx, fy, cx, cy], [k1, k2, k3, k4, p1, p2]) of a pycolmap camera."""
    name, p = camera.model.name, [float(x) for x in camera.params]
    if name == "SIMPLE_PINHOLE":
        return "PINHOLE", [p[0], p[0], p[1], p[2]], [0.0] * 6
    if name == "PINHOLE":
        return "PINHOLE", p[:4], [0.0] * 6
    if name == "SIMPLE_RADIAL":
        return "OPENCV", [p[0], p[0], p[1], p[2]], [p[3], 0, 0, 0, 0, 0]
    if name == "RADIAL":
        return "OPENCV", [p[0], p[0], p[1], p[2]], [p[3], p[4], 0, 0, 0, 0]
    if name == "OPENCV":
        return "OPENCV", p[:4], [p[4], p[5], 0, 0, p[6], p[7]]
    if name == "OPENCV_FISHEYE":
        return "OPENCV_FISHEYE", p[:4], [p[4], p[5], p[6], p[7], 0, 0]
    if name == "SIMPLE_RADIAL_FISHEYE":
        return "OPENCV_FISHEYE", [p[0], p[0], p[1], p[2]], [p[3], 0, 0, 0, 0, 0]
    if name == "RADIAL_FISHEYE":
        return "OPENCV_FISHEYE", [p[0], p[0], p[1], p[2]], [p[3], p[4], 0, 0, 0, 0]
    raise DatasetError(
        f"COLMAP camera model {name} is not supported",
        hint="use SIMPLE_PINHOLE, PINHOLE, SIMPLE_RADIAL, RADIAL, OPENCV or OPENCV_FISHEYE (or undistort first)",
    )


def _cam_from_world(image: Any) -> np.ndarray:  # [3, 4]; a method in pycolmap >= 3.12, a property before
    pose = image.cam_from_world
    return np.asarray((pose() if callable(pose) else pose).matrix(), dtype=np.float64)


def has_pose(image: Any) -> bool:
    return bool(getattr(image, "has_pose", getattr(image, "registered", True)))


def scene_from_reconstruction(reconstruction: Any, image_dir: Path) -> Scene:
    """A Scene of the registered images of a ``pycolmap.Reconstruction``, sorted by image name.

    Near/far per image come from the depths of the sparse points that image observes.
    """
    images = sorted((im for im in reconstruction.images.values() if has_pose(im)), key=lambda im: im.name)
    if not images:
        raise DatasetError("the COLMAP model has no registered images")
    point_ids = np.array(sorted(reconstruction.points3D), dtype=np.int64)
    row = {int(pid): i for i, pid in enumerate(point_ids)}
    points = np.array([reconstruction.points3D[int(i)].xyz for i in point_ids], dtype=np.float64).reshape(-1, 3)
    colors = np.array([reconstruction.points3D[int(i)].color for i in point_ids], dtype=np.uint8).reshape(-1, 3)

    paths, c2w, intr, dist, models, visible = [], [], [], [], [], []
    for im in images:
        paths.append(resolve_inside(image_dir, im.name, "image name"))
        w2c = np.eye(4)
        w2c[:3] = _cam_from_world(im)
        c2w.append(np.linalg.inv(w2c) @ OPENCV_TO_OPENGL)
        camera = reconstruction.cameras[im.camera_id]
        model, k, d = _camera(camera)
        models.append(model)
        intr.append([*k, camera.width, camera.height])
        dist.append(d)
        visible.append(np.array([row[int(p.point3D_id)] for p in im.points2D if p.has_point3D()], dtype=np.int64))
    c2w_arr, intr_arr = np.stack(c2w), np.asarray(intr, dtype=np.float64)
    near = far = None
    if len(points):
        near, far = near_far_from_points(c2w_arr, points, visible)
    return Scene(
        image_paths=paths, c2w=c2w_arr,
        fx=intr_arr[:, 0], fy=intr_arr[:, 1], cx=intr_arr[:, 2], cy=intr_arr[:, 3],
        width=intr_arr[:, 4], height=intr_arr[:, 5],
        camera_model=models, distortion=np.asarray(dist), near=near, far=far,
        points=points, point_colors=colors, source="colmap",
    )


def load_colmap(path: str | Path, image_dir: str | Path | None = None) -> Scene:
    """Read a COLMAP dataset: a folder with ``sparse/0`` (or the model folder itself) and ``images/``.

    Example:
        >>> scene = load_colmap("garden")        # garden/sparse/0/*.bin, garden/images/  # doctest: +SKIP
    """
    import pycolmap

    path = Path(path)
    model = find_colmap_model(path)
    if model is None:
        raise DatasetError(f"no COLMAP sparse model (cameras.bin or cameras.txt) under {path}")
    if image_dir is None:
        for base in (path, *model.parents):
            if (base / "images").is_dir():
                image_dir = base / "images"
                break
            if base == path.parent:
                break
    if image_dir is None:
        raise DatasetError(f"no images/ folder next to the COLMAP model {model}", hint="pass the image folder")
    try:
        reconstruction = pycolmap.Reconstruction(str(model))
    except Exception as exc:  # pycolmap raises plain RuntimeError/ValueError for unreadable models
        raise DatasetError(f"cannot read the COLMAP model in {model} ({exc})") from None
    return scene_from_reconstruction(reconstruction, Path(image_dir))
