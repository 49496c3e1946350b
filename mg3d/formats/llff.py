"""LLFF ``poses_bounds.npy`` + ``images/`` (the forward-facing scenes of the NeRF paper): read and write.

``poses_bounds.npy`` is ``[N, 17]``: per image a 3x5 matrix flattened row by row (a 3x4 camera-to-world
pose whose rotation columns are LLFF's [down, right, backwards], then a column [H, W, focal]), then the
near and far scene bounds. Images are ``images/`` (or ``images_<factor>/``, downsampled) sorted by name.
The split is the LLFF convention: every 8th image (``i % 8 == 0``) is a test view, the rest train.

LLFF keeps no splits, normalization, points or distortion; :func:`write_llff` drops the first three and
refuses scenes that need the last.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from mg3d.errors import DatasetError
from mg3d.imageio import image_size
from mg3d.scene import IMAGE_SUFFIXES, Scene, near_far_from_points

HOLDOUT = 8  # every 8th image is a test view


def _list_images(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name)


def llff_to_opengl(poses: np.ndarray) -> np.ndarray:  # [N, 3, 4] LLFF -> [N, 4, 4] OpenGL c2w
    """LLFF rotation columns [down, right, backwards] -> OpenGL [right, up, backwards]."""
    out = np.tile(np.eye(4), (len(poses), 1, 1))
    out[:, :3, 0], out[:, :3, 1], out[:, :3, 2] = poses[:, :, 1], -poses[:, :, 0], poses[:, :, 2]
    out[:, :3, 3] = poses[:, :, 3]
    return out


def opengl_to_llff(c2w: np.ndarray) -> np.ndarray:  # [N, 4, 4] OpenGL c2w -> [N, 3, 4] LLFF
    """The inverse of :func:`llff_to_opengl`: [down, right, backwards] = [-up, right, backwards]."""
    return np.stack([-c2w[:, :3, 1], c2w[:, :3, 0], c2w[:, :3, 2], c2w[:, :3, 3]], axis=2)


def load_llff(root: Path, factor: int | None = None) -> Scene:
    """Read an LLFF scene folder; with ``factor``, images come from ``images_<factor>/``.

    Focal lengths and sizes are scaled by the ratio of each image's real size to the H, W stored with
    its pose, so a folder of downsampled images is read correctly whatever its name.

    Example:
        >>> scene = load_llff(Path("nerf_llff_data/fern"), factor=8)   # doctest: +SKIP
        >>> scene.split_indices("test")[:3]                            # doctest: +SKIP
        array([ 0,  8, 16])
    """
    root = Path(root)
    file = root / "poses_bounds.npy"
    try:
        data = np.load(file, allow_pickle=False)
    except FileNotFoundError:
        raise DatasetError(f"{file} does not exist") from None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{file} is not a readable .npy array ({exc})", hint="regenerate it with LLFF's imgs2poses.py") from None
    if data.ndim != 2 or data.shape[1] != 17 or data.shape[0] == 0 or not np.issubdtype(data.dtype, np.number):
        raise DatasetError(f"{file} has shape {data.shape}, expected [N, 17] numbers")
    data = data.astype(np.float64)
    poses = data[:, :15].reshape(-1, 3, 5)  # [N, 3, 5]
    bounds = data[:, 15:17]  # [N, 2] near, far

    folder = root / ("images" if factor is None else f"images_{int(factor)}")
    if not folder.is_dir():
        hint = "LLFF keeps its images in images/" if factor is None else f"downsample images/ into {folder.name}/ or omit factor"
        raise DatasetError(f"{folder} does not exist", hint=hint)
    paths = _list_images(folder)
    if len(paths) != len(poses):
        raise DatasetError(
            f"{file} holds {len(poses)} poses but {folder} holds {len(paths)} images",
            hint="every image needs a pose; remove extra images or regenerate poses_bounds.npy",
        )

    size = np.array([image_size(p) for p in paths], dtype=np.float64)  # [N, 2] width, height
    hwf = poses[:, :, 4]  # [N, 3] height, width, focal at the resolution the poses were made for
    if np.any(hwf <= 0):
        raise DatasetError(f"{file}: image sizes and focal lengths must be positive")
    sx, sy = size[:, 0] / hwf[:, 1], size[:, 1] / hwf[:, 0]
    if np.any(np.abs(sx / sy - 1) > 0.05):
        i = int(np.argmax(np.abs(sx / sy - 1)))
        raise DatasetError(
            f"{paths[i].name} is {int(size[i, 0])}x{int(size[i, 1])} but its pose was made for {int(hwf[i, 1])}x{int(hwf[i, 0])}",
            hint="the image was cropped or rotated after the poses were computed",
        )
    n = len(paths)
    test = np.arange(0, n, HOLDOUT)
    return Scene(
        image_paths=paths,
        c2w=llff_to_opengl(poses[:, :, :4]),
        fx=hwf[:, 2] * sx, fy=hwf[:, 2] * sy, cx=size[:, 0] / 2, cy=size[:, 1] / 2,
        width=size[:, 0].astype(np.int64), height=size[:, 1].astype(np.int64),
        camera_model=["PINHOLE"] * n,
        near=bounds[:, 0], far=bounds[:, 1],
        splits={"train": np.setdiff1d(np.arange(n), test), "test": test},
        source="llff",
    )


def write_llff(scene: Scene, out_dir: Path) -> Path:
    """Write ``out_dir/poses_bounds.npy`` and copy the images to ``out_dir/images/`` (named in scene order).

    The scene must be pinhole, with ``fx == fy`` and the principal point at the image centre, since LLFF
    stores one focal length per image and nothing else. Without near/far, bounds come from the sparse
    points. ``images/`` must be empty or absent: stray images would break the pose/image pairing.

    Returns:
        The path of the written ``poses_bounds.npy``.
    """
    if not scene.is_pinhole:
        raise DatasetError("LLFF stores pinhole cameras only; this scene has distortion", hint="undistort the images first")
    if not np.allclose(scene.fx, scene.fy, rtol=1e-6):
        raise DatasetError("LLFF stores one focal length per image; this scene has fx != fy")
    if not (np.allclose(scene.cx, scene.width / 2, atol=1e-3) and np.allclose(scene.cy, scene.height / 2, atol=1e-3)):
        raise DatasetError("LLFF assumes the principal point at the image centre; this scene's is elsewhere")
    if scene.near is not None and scene.far is not None:
        near, far = scene.near, scene.far
    elif scene.points is not None and len(scene.points):
        near, far = near_far_from_points(scene.c2w, scene.points)
    else:
        raise DatasetError("LLFF needs near/far bounds; the scene has neither bounds nor sparse points")

    out = Path(out_dir)
    images = out / "images"
    if images.is_dir() and _list_images(images):
        raise DatasetError(f"{images} already holds images", hint="write into an empty folder")
    images.mkdir(parents=True, exist_ok=True)
    width = len(str(len(scene) - 1))
    for i, src in enumerate(scene.image_paths):
        shutil.copy2(src, images / f"{i:0{max(width, 5)}d}{Path(src).suffix.lower()}")

    hwf = np.stack([scene.height, scene.width, scene.fx], axis=1).astype(np.float64)  # [N, 3]
    poses = np.concatenate([opengl_to_llff(scene.c2w), hwf[:, :, None]], axis=2)  # [N, 3, 5]
    data = np.concatenate([poses.reshape(len(scene), 15), np.stack([near, far], axis=1)], axis=1)  # [N, 17]
    file = out / "poses_bounds.npy"
    np.save(file, data)
    return file
