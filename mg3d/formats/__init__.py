"""Dataset importers and exporters. :func:`load_scene` recognises the format of a path.

| format | what is read |
|---|---|
| nerfstudio | ``transforms.json`` (+ ``sparse_pc.ply``) |
| blender | ``transforms_{train,val,test}.json`` + RGBA PNGs (composited on white) |
| llff | ``poses_bounds.npy`` + ``images/`` |
| colmap | a sparse model (``cameras.bin``/``.txt``, ``images``, ``points3D``) via pycolmap + images |
| workspace | an mg3d workspace: its ``capture/transforms.json`` |
"""

from __future__ import annotations

from pathlib import Path

from mg3d.errors import DatasetError, InputError
from mg3d.scene import Scene

FORMATS = ("nerfstudio", "blender", "llff", "colmap")


def detect_format(path: Path) -> str:
    """Name of the dataset format at ``path`` (see the table above), or a DatasetError."""
    path = Path(path)
    if path.is_file():
        if path.name == "poses_bounds.npy":
            return "llff"
        if path.name.startswith("transforms_") and path.suffix == ".json":
            return "blender"
        if path.suffix == ".json":
            return "nerfstudio"
    if (path / "capture" / "transforms.json").is_file():
        return "workspace"
    if (path / "transforms.json").is_file():
        return "nerfstudio"
    if (path / "transforms_train.json").is_file():
        return "blender"
    if (path / "poses_bounds.npy").is_file():
        return "llff"
    from mg3d.formats.colmap import find_colmap_model

    if find_colmap_model(path) is not None:
        return "colmap"
    raise DatasetError(
        f"{path} holds no dataset mg3d recognises",
        hint="expected transforms.json, transforms_train.json, poses_bounds.npy or a COLMAP sparse model",
    )


def load_scene(path: str | Path, fmt: str | None = None) -> Scene:
    """Load a scene from any supported dataset (or an mg3d workspace).

    Example:
        >>> scene = load_scene("../shared/data/lego-400")   # doctest: +SKIP
        >>> len(scene), scene.split_indices("test").size      # doctest: +SKIP
        (400, 200)
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist", hint="check the path")
    fmt = fmt or detect_format(path)
    if fmt == "workspace":
        from mg3d.formats.nerfstudio import load_nerfstudio

        return load_nerfstudio(path / "capture" / "transforms.json")
    if fmt == "nerfstudio":
        from mg3d.formats.nerfstudio import load_nerfstudio

        return load_nerfstudio(path)
    if fmt == "blender":
        from mg3d.formats.blender import load_blender

        return load_blender(path if path.is_dir() else path.parent)
    if fmt == "llff":
        from mg3d.formats.llff import load_llff

        return load_llff(path if path.is_dir() else path.parent)
    if fmt == "colmap":
        from mg3d.formats.colmap import load_colmap

        return load_colmap(path)
    raise DatasetError(f"unknown dataset format {fmt!r}", hint=f"choose one of {', '.join(FORMATS)}")
