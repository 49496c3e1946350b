"""The NeRF Blender synthetic format: ``transforms_{train,val,test}.json`` + RGBA PNGs.

Each file holds ``camera_angle_x`` (horizontal field of view, radians) and ``frames`` with a
``file_path`` (``./train/r_0``, usually without extension) and a ``transform_matrix`` that is already an
OpenGL camera-to-world matrix. The images are RGBA; like the literature, mg3d composites them on white,
and uses the fixed bounds near 2, far 6 of the NeRF paper.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mg3d.errors import DatasetError
from mg3d.formats.nerfstudio import frame_pose, read_json
from mg3d.imageio import image_size
from mg3d.scene import Scene, resolve_inside

SPLITS = ("train", "val", "test")
NEAR, FAR = 2.0, 6.0  # the bounds every NeRF paper uses for this set


def _image_path(root: Path, file_path: str, source: Path) -> Path:
    """``file_path`` resolved inside ``root``; ``.png`` is appended when the file has no extension."""
    if not isinstance(file_path, str) or not file_path:
        raise DatasetError(f"{source}: file_path {file_path!r} is not a path")
    path = resolve_inside(root, file_path)
    if path.is_file():
        return path
    # The original set omits the extension ("./train/r_0"); a name like "r_0.5" has a "suffix" too.
    with_png = resolve_inside(root, file_path + ".png")
    if not with_png.is_file():
        raise DatasetError(f"{source}: image {file_path!r} does not exist (looked for {path} and {with_png.name})")
    return with_png


def load_blender(root: Path) -> Scene:
    """Read a Blender synthetic dataset folder (``transforms_train.json`` and, if present, val and test).

    Images of all splits are concatenated in the order train, val, test; ``scene.splits`` indexes them.

    Example:
        >>> scene = load_blender(Path("../shared/data/lego-400"))   # doctest: +SKIP
        >>> len(scene), round(float(scene.fx[0]), 3)                 # doctest: +SKIP
        (400, 555.555)
    """
    root = Path(root)
    if not (root / "transforms_train.json").is_file():
        raise DatasetError(f"{root} has no transforms_train.json", hint="a Blender dataset has transforms_{train,val,test}.json")
    paths: list[Path] = []
    c2w: list[np.ndarray] = []
    focal: list[float] = []
    width: list[int] = []
    height: list[int] = []
    splits: dict[str, np.ndarray] = {}
    for split in SPLITS:
        file = root / f"transforms_{split}.json"
        if not file.is_file():
            continue
        meta = read_json(file)
        frames = meta.get("frames") if isinstance(meta, dict) else None
        if not isinstance(frames, list) or (split == "train" and not frames):
            raise DatasetError(f"{file} has no frames", hint="a transforms file lists its images under 'frames'")
        try:
            angle = float(meta["camera_angle_x"])
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"{file} has no numeric camera_angle_x") from None
        if not 0.0 < angle < math.pi:
            raise DatasetError(f"{file}: camera_angle_x {angle} is not an angle in (0, pi) radians")
        start = len(paths)
        for i, frame in enumerate(frames):
            c2w.append(frame_pose(frame, i, file))
            paths.append(_image_path(root, frame["file_path"], file))
        if len(paths) > start:
            # All frames of a split share one size; read it from the first image's header only.
            w, h = image_size(paths[start])
            count = len(paths) - start
            width += [w] * count
            height += [h] * count
            focal += [0.5 * w / math.tan(0.5 * angle)] * count
        splits[split] = np.arange(start, len(paths), dtype=np.int64)
    w_arr, h_arr = np.asarray(width, dtype=np.float64), np.asarray(height, dtype=np.float64)
    return Scene(
        image_paths=paths,
        c2w=np.stack(c2w),
        fx=focal, fy=focal, cx=w_arr / 2, cy=h_arr / 2, width=width, height=height,
        camera_model=["PINHOLE"] * len(paths),
        near=NEAR, far=FAR,
        splits=splits,
        background=(1.0, 1.0, 1.0),
        source="blender",
    )
