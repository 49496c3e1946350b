"""The ``Scene``: posed images, the one data type every stage reads.

Conventions (those of nerfstudio and the Blender synthetic set):

* ``c2w`` is camera-to-world, 4x4, OpenGL camera axes: x right, y up, the camera looks down -z.
  COLMAP/OpenCV poses (x right, y down, looking down +z) are converted at the importer boundary only.
* Intrinsics are per image, in pixels: ``fx, fy, cx, cy`` with the pixel-centre convention of COLMAP
  (the top-left pixel's centre is at (0.5, 0.5)). Distortion follows nerfstudio: model name per image
  (``PINHOLE``, ``OPENCV``, ``OPENCV_FISHEYE``) and coefficients ``[k1, k2, k3, k4, p1, p2]``.
* ``normalization`` records the similarity that took the source coordinates to these ones:
  ``x_scene = scale * (R @ x_source + t)``, so that the region of interest fits in the unit sphere.

Images are read lazily from disk (uint8, RGB or RGBA).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mg3d.errors import DatasetError

CAMERA_MODELS = ("PINHOLE", "OPENCV", "OPENCV_FISHEYE")
DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

#: Flip between OpenCV camera axes (x right, y down, z forward) and OpenGL ones; its own inverse.
OPENCV_TO_OPENGL = np.diag([1.0, -1.0, -1.0, 1.0])


def resolve_inside(root: Path, relative: str, what: str = "file_path") -> Path:
    """Join a path read from a dataset file to the dataset folder, refusing anything that escapes it.

    Absolute paths, ``..`` components and symlinks that lead outside ``root`` are all refused, so a
    crafted ``transforms.json`` cannot make mg3d read (or later overwrite) files elsewhere.
    """
    root_real = os.path.realpath(root)
    if not isinstance(relative, str) or not relative:
        raise DatasetError(f"{what} {relative!r} is empty or not a string")
    if os.path.isabs(relative) or (len(relative) > 1 and relative[1] == ":"):
        raise DatasetError(f"{what} {relative!r} is absolute", hint=f"dataset paths must be relative to {root}")
    candidate = os.path.realpath(os.path.join(root_real, relative))
    if os.path.commonpath([root_real, candidate]) != root_real:
        raise DatasetError(f"{what} {relative!r} escapes the dataset folder {root}", hint="keep images inside it")
    return Path(candidate)


@dataclass(frozen=True)
class Normalization:
    """The similarity applied to source coordinates: ``x_scene = scale * (transform[:, :3] @ x + transform[:, 3])``."""

    transform: np.ndarray = field(default_factory=lambda: np.eye(3, 4))  # [3, 4], rotation | translation
    scale: float = 1.0

    @property
    def matrix(self) -> np.ndarray:
        """The full similarity as a 4x4 matrix (rotation and translation scaled)."""
        m = np.eye(4)
        m[:3, :4] = self.scale * np.asarray(self.transform, dtype=np.float64)
        return m

    def apply_points(self, points: np.ndarray) -> np.ndarray:  # [..., 3] -> [..., 3]
        t = np.asarray(self.transform, dtype=np.float64)
        return self.scale * (points @ t[:, :3].T + t[:, 3])

    def apply_c2w(self, c2w: np.ndarray) -> np.ndarray:  # [N, 4, 4] -> [N, 4, 4], rotations stay orthonormal
        t = np.asarray(self.transform, dtype=np.float64)
        out = np.array(c2w, dtype=np.float64, copy=True)
        out[..., :3, :3] = t[:, :3] @ out[..., :3, :3]
        out[..., :3, 3] = self.apply_points(out[..., :3, 3])
        return out

    def then(self, other: Normalization) -> Normalization:
        """The composition: first ``self``, then ``other``."""
        a, b = np.asarray(self.transform), np.asarray(other.transform)
        rot = b[:, :3] @ a[:, :3]
        trans = b[:, :3] @ a[:, 3] + b[:, 3] / self.scale
        return Normalization(np.concatenate([rot, trans[:, None]], 1), self.scale * other.scale)

    def to_dict(self) -> dict:
        return {"transform": np.asarray(self.transform).tolist(), "scale": float(self.scale)}

    @classmethod
    def from_dict(cls, data: dict) -> Normalization:
        transform = np.asarray(data["transform"], dtype=np.float64)
        if transform.shape != (3, 4):
            raise DatasetError(f"normalization transform has shape {transform.shape}, expected (3, 4)")
        return cls(transform, float(data["scale"]))


@dataclass
class Scene:
    """Posed images of one scene. Arrays are indexed by image; see the module docstring for conventions."""

    image_paths: list[Path]  # [N] absolute paths
    c2w: np.ndarray  # [N, 4, 4] float64, OpenGL axes
    fx: np.ndarray  # [N] pixels
    fy: np.ndarray  # [N]
    cx: np.ndarray  # [N]
    cy: np.ndarray  # [N]
    width: np.ndarray  # [N] int
    height: np.ndarray  # [N] int
    camera_model: list[str] = field(default_factory=list)  # [N], "PINHOLE" when empty
    distortion: np.ndarray | None = None  # [N, 6] k1 k2 k3 k4 p1 p2; zeros when None
    near: np.ndarray | None = None  # [N] scene units
    far: np.ndarray | None = None  # [N]
    splits: dict[str, np.ndarray] = field(default_factory=dict)  # name -> image indices
    normalization: Normalization = field(default_factory=Normalization)
    points: np.ndarray | None = None  # [M, 3] sparse points, scene units
    point_colors: np.ndarray | None = None  # [M, 3] uint8
    mask_paths: list[Path | None] | None = None  # [N] optional masks (white = keep)
    background: tuple[float, float, float] | None = None  # colour RGBA images are composited on, [0, 1]
    source: str = ""  # which importer made it

    def __post_init__(self) -> None:
        n = len(self.image_paths)
        self.c2w = np.asarray(self.c2w, dtype=np.float64).reshape(n, 4, 4)
        for name in ("fx", "fy", "cx", "cy"):
            setattr(self, name, np.broadcast_to(np.asarray(getattr(self, name), dtype=np.float64), (n,)).copy())
        for name in ("width", "height"):
            setattr(self, name, np.broadcast_to(np.asarray(getattr(self, name), dtype=np.int64), (n,)).copy())
        if not self.camera_model:
            self.camera_model = ["PINHOLE"] * n
        if self.distortion is None:
            self.distortion = np.zeros((n, 6))
        self.distortion = np.asarray(self.distortion, dtype=np.float64).reshape(n, 6)
        for name in ("near", "far"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, np.broadcast_to(np.asarray(value, dtype=np.float64), (n,)).copy())
        if not self.splits:
            self.splits = {"train": np.arange(n)}
        self.splits = {k: np.asarray(v, dtype=np.int64) for k, v in self.splits.items()}
        self.validate()

    def __len__(self) -> int:
        return len(self.image_paths)

    def validate(self) -> None:
        """Check shapes and conventions; raises DatasetError naming the first problem."""
        n = len(self)
        if n == 0:
            raise DatasetError("the scene has no images")
        if len(self.camera_model) != n:
            raise DatasetError(f"{len(self.camera_model)} camera models for {n} images")
        bad = sorted(set(self.camera_model) - set(CAMERA_MODELS))
        if bad:
            raise DatasetError(f"unsupported camera model {bad[0]}", hint=f"mg3d reads {', '.join(CAMERA_MODELS)}")
        if not np.all(np.isfinite(self.c2w)):
            raise DatasetError("camera poses contain NaN or inf")
        rot = self.c2w[:, :3, :3]
        err = np.abs(rot @ np.swapaxes(rot, 1, 2) - np.eye(3)).max()
        if err > 1e-3:
            raise DatasetError(f"camera rotations are not orthonormal (error {err:.2g})", hint="check transform_matrix")
        if np.any(self.fx <= 0) or np.any(self.fy <= 0) or np.any(self.width <= 0) or np.any(self.height <= 0):
            raise DatasetError("focal lengths and image sizes must be positive")
        for name, idx in self.splits.items():
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise DatasetError(f"split {name!r} refers to images outside 0..{n - 1}")

    # ---- cameras -------------------------------------------------------------------------------------
    def K(self, i: int) -> np.ndarray:  # [3, 3]
        """Pinhole intrinsics matrix of image ``i``."""
        return np.array([[self.fx[i], 0, self.cx[i]], [0, self.fy[i], self.cy[i]], [0, 0, 1.0]])

    @property
    def centers(self) -> np.ndarray:  # [N, 3]
        return self.c2w[:, :3, 3]

    @property
    def is_pinhole(self) -> bool:
        return all(m == "PINHOLE" for m in self.camera_model) and not np.any(self.distortion)

    def split_indices(self, name: str) -> np.ndarray:
        if name not in self.splits:
            raise DatasetError(f"the scene has no {name!r} split", hint=f"splits: {', '.join(self.splits)}")
        return self.splits[name]

    # ---- images --------------------------------------------------------------------------------------
    def image(self, i: int) -> np.ndarray:
        """Image ``i`` as stored: uint8 [H, W, 3] or [H, W, 4]. EXIF orientation is applied."""
        from mg3d.imageio import read_image

        return read_image(self.image_paths[i])

    def rgb(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 RGB [H, W, 3]; RGBA is composited on ``background`` (white if unset)."""
        img = self.image(i)
        if img.shape[-1] == 3:
            return img
        bg = np.asarray(self.background if self.background is not None else (1.0, 1.0, 1.0)) * 255.0
        alpha = img[..., 3:4].astype(np.float32) / 255.0
        return np.round(img[..., :3] * alpha + bg * (1.0 - alpha)).astype(np.uint8)

    # ---- derived scenes ------------------------------------------------------------------------------
    def subset(self, indices: np.ndarray | list[int]) -> Scene:
        """A scene of the chosen images, with splits re-indexed."""
        idx = np.asarray(indices, dtype=np.int64)
        remap = {int(old): new for new, old in enumerate(idx)}
        pick = lambda a: None if a is None else np.asarray(a)[idx]  # noqa: E731
        return dataclasses.replace(
            self,
            image_paths=[self.image_paths[i] for i in idx],
            c2w=self.c2w[idx], fx=self.fx[idx], fy=self.fy[idx], cx=self.cx[idx], cy=self.cy[idx],
            width=self.width[idx], height=self.height[idx],
            camera_model=[self.camera_model[i] for i in idx], distortion=self.distortion[idx],
            near=pick(self.near), far=pick(self.far),
            splits={k: np.array([remap[int(i)] for i in v if int(i) in remap], dtype=np.int64) for k, v in self.splits.items()},
            mask_paths=None if self.mask_paths is None else [self.mask_paths[i] for i in idx],
        )

    def transformed(self, norm: Normalization) -> Scene:
        """The scene moved by a further similarity (poses, points, near/far); ``normalization`` accumulates."""
        return dataclasses.replace(
            self,
            c2w=norm.apply_c2w(self.c2w),
            points=None if self.points is None else norm.apply_points(self.points),
            near=None if self.near is None else self.near * norm.scale,
            far=None if self.far is None else self.far * norm.scale,
            normalization=self.normalization.then(norm),
        )


def look_at_rotation(forward: np.ndarray, up: np.ndarray) -> np.ndarray:  # [3], [3] -> [3, 3]
    """OpenGL camera rotation (columns: right, up, backward) looking along ``forward``."""
    back = -forward / np.linalg.norm(forward)
    right = np.cross(up, back)
    right /= np.linalg.norm(right)
    return np.stack([right, np.cross(back, right), back], axis=1)


def rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # [3], [3] -> [3, 3]
    """The smallest rotation taking direction ``a`` to direction ``b``."""
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    v, c = np.cross(a, b), float(np.dot(a, b))
    if c < -1 + 1e-10:  # opposite: turn half a revolution about any axis orthogonal to a
        axis = np.cross(a, [1.0, 0, 0] if abs(a[0]) < 0.9 else [0, 1.0, 0])
        axis /= np.linalg.norm(axis)
        return 2 * np.outer(axis, axis) - np.eye(3)
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1 + c)


def auto_normalization(c2w: np.ndarray, points: np.ndarray | None, roi_percentile: float = 80.0) -> Normalization:
    """Orient z up and fit the region of interest in the unit sphere.

    Up is the mean camera up vector (people hold phones upright). The centre is the median of the sparse
    points (robust to stray far points) or, without points, the mean camera centre. The radius is the
    larger of the farthest camera and the ``roi_percentile``-th percentile of point distances, so cameras
    and most of the scene lie inside the unit sphere and the far background is left to the contraction.

    Args:
        c2w: [N, 4, 4] OpenGL camera-to-world.
        points: [M, 3] sparse points or None.
    """
    up = c2w[:, :3, 1].mean(0)
    rot = rotation_between(up, np.array([0.0, 0.0, 1.0])) if np.linalg.norm(up) > 1e-6 else np.eye(3)
    cams = c2w[:, :3, 3] @ rot.T
    pts = None if points is None or len(points) == 0 else points @ rot.T
    center = np.median(pts, axis=0) if pts is not None else cams.mean(0)
    radius = np.linalg.norm(cams - center, axis=1).max()
    if pts is not None:
        radius = max(radius, float(np.percentile(np.linalg.norm(pts - center, axis=1), roi_percentile)))
    radius = radius if radius > 1e-9 else 1.0
    return Normalization(np.concatenate([rot, -center[:, None]], 1), 1.0 / radius)


def near_far_from_points(
    c2w: np.ndarray, points: np.ndarray, visible: list[np.ndarray] | None = None, margin: float = 0.8
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image near/far from the depths of sparse points (1st and 99th percentile, widened by ``margin``).

    Args:
        c2w: [N, 4, 4] OpenGL camera-to-world.
        points: [M, 3] sparse points.
        visible: per image, indices into ``points`` seen by it; all points in front when None.
    Returns:
        near [N], far [N].
    """
    near, far = np.empty(len(c2w)), np.empty(len(c2w))
    for i, pose in enumerate(c2w):
        pts = points if visible is None or len(visible[i]) == 0 else points[visible[i]]
        depth = -(pts - pose[:3, 3]) @ pose[:3, 2]  # distance along the viewing direction (-z)
        depth = depth[depth > 0]
        if depth.size == 0:
            near[i], far[i] = 0.05, 10.0
            continue
        near[i] = max(np.percentile(depth, 1) * margin, 1e-3)
        far[i] = np.percentile(depth, 99) / margin
    return near, far
