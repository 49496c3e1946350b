"""Synthetic pseudo data with exact answers: textured spheres seen from orbit cameras, written in the
``mg3d distill`` format (images, the surface distance of every pixel, cameras, ``distill.json``).

It isolates one question from the teacher's quality: can a student learn detail finer than its ray grid?
``tests/test_student.py`` and ``scripts/bench_detail_proxy.py`` use it (and :func:`sphere_occupancy`, the scene's
exact occupancy grid for the ``occupancy`` option).

    images, c2w = textured_spheres(Path("data"), views=600, size=128, seed=0)   # then PseudoData(Path("data"))
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

#: one sphere (no occlusions) and five overlapping ones (occlusion edges, surfaces behind surfaces)
ONE = ((np.zeros(3), 0.8),)
FIVE = ((np.array([0.35, 0.2, 0.1]), 0.4), (np.array([-0.3, -0.25, 0.0]), 0.45), (np.array([0.0, 0.35, -0.3]), 0.3),
        (np.array([-0.2, 0.3, 0.45]), 0.25), (np.array([0.3, -0.4, -0.35]), 0.3))
RADIUS, NEAR, FAR = 3.0, 2.0, 4.0  # camera distance from the centre; the sample range of the students


def texture(x: np.ndarray) -> np.ndarray:
    """Colours [..., 3] of surface points x [..., 3]: stripes with periods of 0.2-0.3 units (3-6 px at 128 px)."""
    return np.stack([0.5 + 0.5 * np.sin(23 * x[..., 0] + 3 * np.sin(17 * x[..., 1])), 0.5 + 0.5 * np.sin(19 * x[..., 1]) * np.sin(29 * x[..., 2]),
                     0.5 + 0.4 * np.sign(np.sin(31 * x[..., 2] + 11 * x[..., 0]))], -1)


def textured_spheres(folder: Path | None, views: int, size: int, seed: int, spheres: tuple = ONE) -> tuple[np.ndarray, np.ndarray]:
    """Render ``views`` orbit cameras (azimuth all round, elevation -29 to 57 degrees, 40 degree field of view) at
    ``size`` x ``size`` on white; write them to ``folder`` in the distill format unless it is None.
    Returns images [N, size, size, 3] float32 in [0, 1] and cameras [N, 4, 4] (OpenGL camera-to-world)."""
    from mg3d.scene import look_at_rotation

    g = np.random.default_rng(seed)
    fx = size / (2 * np.tan(np.radians(20)))
    v, u = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
    cam = np.stack([(u - size / 2) / fx, -(v - size / 2) / fx, -np.ones_like(u)], -1)
    cam /= np.linalg.norm(cam, axis=-1, keepdims=True)
    c2w = np.tile(np.eye(4, dtype=np.float32), (views, 1, 1))
    images, surfaces = [], []
    for i in range(views):
        az, el = g.uniform(0, 2 * np.pi), g.uniform(-0.5, 1.0)
        eye = RADIUS * np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
        c2w[i, :3, :3], c2w[i, :3, 3] = look_at_rotation(-eye, np.array([0, 0, 1.0])), eye
        d = cam @ c2w[i, :3, :3].T.astype(np.float64)
        t = np.full(d.shape[:-1], np.inf)
        for center, r in spheres:  # nearest hit of any sphere
            oc = eye - center
            b = d @ oc
            disc = b * b - (oc @ oc - r * r)
            t = np.minimum(t, np.where(disc > 0, -b - np.sqrt(np.maximum(disc, 0)), np.inf))
        hit = np.isfinite(t)
        t = np.where(hit, t, 0.0)
        images.append(np.where(hit[..., None], texture(eye + d * t[..., None]), 1.0))
        surfaces.append(t)
    images = np.stack(images).astype(np.float32)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "shard_0000.npy", (images * 255 + 0.5).astype(np.uint8))
        np.save(folder / "surface_0000.npy", np.stack(surfaces).astype(np.float16))
        np.save(folder / "cameras.npy", c2w)
        meta = {"schema": 1, "count": views, "width": size, "height": size, "fx": fx, "fy": fx, "cx": size / 2, "cy": size / 2, "dtype": "uint8",
                "shards": ["shard_0000.npy"], "surfaces": ["surface_0000.npy"], "kind": "orbit", "near": NEAR, "far": FAR, "unbounded": False,
                "bound": 1.0, "background": [1.0, 1.0, 1.0], "source": "teacher"}
        (folder / "distill.json").write_text(json.dumps(meta))
    return images, c2w


def sphere_occupancy(spheres: tuple, resolution: int) -> np.ndarray:
    """The exact occupancy grid [R^3] uint8 of ``spheres`` over [-1, 1]^3 (x slowest, as the student's march
    reads it): cells whose centre lies inside a sphere or within half a cell of it."""
    r = resolution
    centres = (np.stack(np.meshgrid(*[np.arange(r)] * 3, indexing="ij"), -1).reshape(-1, 3) + 0.5) / r * 2 - 1
    inside = np.zeros(len(centres), bool)
    for center, radius in spheres:
        inside |= np.linalg.norm(centres - center, axis=-1) < radius + 1.0 / r
    return inside.astype(np.uint8)
