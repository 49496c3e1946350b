"""Sparse point clouds as PLY (x, y, z float; red, green, blue uchar), the layout nerfstudio reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mg3d.errors import DatasetError

_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}


def write_ply(path: Path, points: np.ndarray, colors: np.ndarray | None = None) -> None:
    """Write points [M, 3] and optional uint8 colours [M, 3] as binary little-endian PLY."""
    points = np.asarray(points, dtype=np.float32).reshape(-1, 3)
    colors = np.full_like(points, 255, dtype=np.uint8) if colors is None else np.asarray(colors, dtype=np.uint8)
    rows = np.empty(len(points), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    rows["x"], rows["y"], rows["z"] = points.T
    rows["red"], rows["green"], rows["blue"] = colors.T
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {len(points)}\n"
        "property float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n"
    )
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(rows.tobytes())


def read_ply(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read the vertices of a PLY file (ASCII or binary): points [M, 3] float64, colours [M, 3] uint8 or None."""
    data = Path(path).read_bytes()
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise DatasetError(f"{path} is not a PLY file")
    body_start = data.index(b"\n", end) + 1
    fmt, count, props, in_vertex = "", 0, [], False
    for line in data[:end].decode("ascii", "replace").splitlines():
        parts = line.split()
        if parts[:1] == ["format"]:
            fmt = parts[1]
        elif parts[:1] == ["element"]:
            in_vertex = parts[1] == "vertex"
            if not in_vertex and count == 0 and not props:
                raise DatasetError(f"{path}: element {parts[1]} comes before the vertices", hint="mg3d reads PLY files whose first element is vertex")
            count = int(parts[2]) if in_vertex else count
        elif parts[:1] == ["property"] and in_vertex:
            if parts[1] == "list" or parts[1] not in _TYPES:
                raise DatasetError(f"{path}: unsupported vertex property {' '.join(parts[1:])}")
            props.append((parts[2], _TYPES[parts[1]]))
    names = [p[0] for p in props]
    if not {"x", "y", "z"} <= set(names):
        raise DatasetError(f"{path}: vertices have no x, y, z")
    if fmt == "ascii":
        lines = data[body_start:].decode("ascii").splitlines()[:count]
        table = np.loadtxt(lines, ndmin=2) if count else np.zeros((0, len(names)))
        columns = {name: table[:, i] for i, name in enumerate(names)}
    elif fmt in ("binary_little_endian", "binary_big_endian"):
        order = "<" if fmt == "binary_little_endian" else ">"
        dtype = np.dtype([(n, order + t) for n, t in props])
        if len(data) - body_start < dtype.itemsize * count:
            raise DatasetError(f"{path} is truncated")
        rows = np.frombuffer(data, dtype=dtype, count=count, offset=body_start)
        columns = {name: rows[name] for name in names}
    else:
        raise DatasetError(f"{path}: unknown PLY format {fmt!r}")
    points = np.stack([columns["x"], columns["y"], columns["z"]], 1).astype(np.float64)
    colors = None
    if {"red", "green", "blue"} <= set(names):
        colors = np.stack([columns["red"], columns["green"], columns["blue"]], 1).astype(np.uint8)
    return points, colors
