"""Novel cameras drawn from the distribution of the training cameras, for pseudo data (numpy, OpenGL c2w).

Two kinds of capture:
- **orbit** (object-centric, e.g. Blender scenes and turntable captures): the optical axes meet near one
  point. New cameras sit around that centre at the training radii and elevations, looking at it.
- **path** (hand-held or forward-facing): new cameras interpolate between neighbouring training cameras
  (positions linearly, rotations by quaternion slerp) and are perturbed by a fraction of the spacing.

Rotations are built from unit quaternions or look-at frames, so they stay orthonormal.

    kind = camera_kind(c2w)                         # "orbit" or "path"
    new = sample_cameras(c2w, 1000, kind, seed=0)   # [1000, 4, 4]
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mg3d.scene import look_at_rotation


def focus_point(c2w: np.ndarray) -> np.ndarray:
    """The point [3] closest (least squares) to all optical axes."""
    origins, forward = c2w[:, :3, 3], -c2w[:, :3, 2]
    forward = forward / np.linalg.norm(forward, axis=1, keepdims=True)
    proj = np.eye(3)[None] - forward[:, :, None] * forward[:, None, :]  # [N, 3, 3] projects off each axis
    a, b = proj.sum(0), (proj @ origins[:, :, None]).sum(0)[:, 0]
    return np.linalg.lstsq(a, b, rcond=None)[0]


def camera_kind(c2w: np.ndarray, max_angle_deg: float = 20.0, min_spread_deg: float = 60.0) -> str:
    """``orbit`` when the cameras look at a common point from directions at least ``min_spread_deg`` apart,
    else ``path``."""
    if len(c2w) < 3:
        return "path"
    center = focus_point(c2w)
    to_center = center - c2w[:, :3, 3]
    dist = np.linalg.norm(to_center, axis=1)
    forward = -c2w[:, :3, 2] / np.linalg.norm(c2w[:, :3, 2], axis=1, keepdims=True)
    cos = np.sum(to_center / np.maximum(dist[:, None], 1e-9) * forward, 1)
    aimed = np.median(np.degrees(np.arccos(np.clip(cos, -1, 1)))) < max_angle_deg
    view_dirs = -to_center / np.maximum(dist[:, None], 1e-9)
    spread = np.degrees(np.arccos(np.clip(np.min(view_dirs @ view_dirs.T), -1, 1)))
    return "orbit" if aimed and spread >= min_spread_deg else "path"


def _quaternions(rot: np.ndarray) -> np.ndarray:
    """Unit quaternions [N, 4] (w, x, y, z) of rotation matrices [N, 3, 3]."""
    q = np.empty((len(rot), 4))
    for i, m in enumerate(rot):
        t = np.trace(m)
        if t > 0:
            s = np.sqrt(t + 1.0) * 2
            q[i] = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
        else:
            k = int(np.argmax(np.diag(m)))
            j, l = (k + 1) % 3, (k + 2) % 3
            s = np.sqrt(1.0 + m[k, k] - m[j, j] - m[l, l]) * 2
            q[i, 0] = (m[l, j] - m[j, l]) / s
            q[i, 1 + k] = 0.25 * s
            q[i, 1 + j] = (m[j, k] + m[k, j]) / s
            q[i, 1 + l] = (m[l, k] + m[k, l]) / s
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def _rotations(q: np.ndarray) -> np.ndarray:
    """Rotation matrices [N, 3, 3] of quaternions [N, 4] (normalised here)."""
    w, x, y, z = (q / np.linalg.norm(q, axis=1, keepdims=True)).T
    return np.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], 1).reshape(-1, 3, 3)


def slerp(q0: np.ndarray, q1: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Spherical interpolation of unit quaternions [N, 4] at fractions t [N]."""
    dot = np.sum(q0 * q1, 1)
    q1 = np.where(dot[:, None] < 0, -q1, q1)
    dot = np.abs(dot).clip(-1, 1)
    theta = np.arccos(dot)
    small = theta < 1e-6
    s = np.where(small, 1.0, np.sin(theta))
    a = np.where(small, 1 - t, np.sin((1 - t) * theta) / s)
    b = np.where(small, t, np.sin(t * theta) / s)
    return a[:, None] * q0 + b[:, None] * q1


def orbit_frame(c2w: np.ndarray) -> dict[str, Any]:
    """The orbit the training cameras c2w [N, 4, 4] lie on: ``center``, ``up`` and the horizontal axes
    ``e1``, ``e2`` [3]; each camera's ``radius``, ``elevation`` and ``azimuth`` [N] (radians); and ``arc``:
    (start, span) of the azimuths they cover, or None when they go all around."""
    center = focus_point(c2w)
    up = c2w[:, :3, 1].mean(0)
    up = up / np.linalg.norm(up)
    offsets = c2w[:, :3, 3] - center
    radius = np.linalg.norm(offsets, axis=1)
    elevation = np.arcsin(np.clip(offsets @ up / radius, -1, 1))
    e1 = np.cross(up, [1.0, 0, 0] if abs(up[0]) < 0.9 else [0, 1.0, 0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(up, e1)
    azimuth = np.arctan2(offsets @ e2, offsets @ e1)
    a = np.sort(azimuth)
    gaps = np.diff(np.concatenate([a, a[:1] + 2 * np.pi]))  # circular gaps between neighbouring azimuths
    k = int(np.argmax(gaps))
    arc = (float(a[(k + 1) % len(a)]), float(2 * np.pi - gaps[k])) if gaps[k] > np.pi / 2 else None
    return {"center": center, "up": up, "e1": e1, "e2": e2, "radius": radius, "elevation": elevation, "azimuth": azimuth, "arc": arc}


def orbit_position(frame: dict[str, Any], r: np.ndarray, el: np.ndarray, az: np.ndarray) -> np.ndarray:
    """Positions [n, 3] at radii, elevations and azimuths [n] on ``frame`` (see :func:`orbit_frame`)."""
    e1, e2, up = frame["e1"], frame["e2"], frame["up"]
    return frame["center"] + r[:, None] * (np.cos(el)[:, None] * (np.cos(az)[:, None] * e1 + np.sin(az)[:, None] * e2) + np.sin(el)[:, None] * up)


def _orbit(c2w: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    f = orbit_frame(c2w)
    center, up, radius, elevation = f["center"], f["up"], f["radius"], f["elevation"]
    # keep to the training azimuths when the cameras do not go all around
    az = f["arc"][0] + rng.uniform(0, f["arc"][1], n) if f["arc"] else rng.uniform(-np.pi, np.pi, n)
    r = rng.uniform(radius.min(), radius.max(), n)
    # evenly over the area of the band of training elevations (the sine uniform), as cameras spread evenly
    # over a sphere are; uniform elevations crowd the pole (lego: mean 45.7 deg against the training's 37.7)
    el = np.arcsin(rng.uniform(np.sin(elevation.min()), np.sin(elevation.max()), n))
    pos = orbit_position(f, r, el, az)
    out = np.tile(np.eye(4), (n, 1, 1))
    for i in range(n):
        out[i, :3, :3] = look_at_rotation(center - pos[i], up)
    out[:, :3, 3] = pos
    return out


def _path(c2w: np.ndarray, n: int, rng: np.random.Generator, jitter: float) -> np.ndarray:
    m = len(c2w)
    pos, quat = c2w[:, :3, 3], _quaternions(c2w[:, :3, :3])
    if m == 1:
        i, j = np.zeros(n, int), np.zeros(n, int)
    else:
        i = rng.integers(0, m - 1, n)
        j = i + 1
    t = rng.uniform(0, 1, n)
    spacing = np.median(np.linalg.norm(np.diff(pos, axis=0), axis=1)) if m > 1 else 0.01
    new_pos = pos[i] * (1 - t[:, None]) + pos[j] * t[:, None] + rng.normal(0, jitter * spacing, (n, 3))
    q = slerp(quat[i], quat[j], t)
    angle = np.radians(rng.normal(0, 2.0 * jitter, n))  # a few degrees of extra turn
    axis = rng.normal(size=(n, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    turn = np.concatenate([np.cos(angle / 2)[:, None], np.sin(angle / 2)[:, None] * axis], 1)
    w0, v0, w1, v1 = q[:, :1], q[:, 1:], turn[:, :1], turn[:, 1:]
    q = np.concatenate([w0 * w1 - np.sum(v0 * v1, 1, keepdims=True), w0 * v1 + w1 * v0 + np.cross(v0, v1)], 1)
    out = np.tile(np.eye(4), (n, 1, 1))
    out[:, :3, :3] = _rotations(q)
    out[:, :3, 3] = new_pos
    return out


def sample_cameras(c2w: np.ndarray, n: int, kind: str = "auto", seed: int = 0, jitter: float = 0.5) -> np.ndarray:
    """``n`` new OpenGL cameras [n, 4, 4] like the training cameras c2w [N, 4, 4] (``kind``: auto, orbit, path).

    ``jitter`` scales the path perturbation (fraction of the median spacing between neighbouring cameras).
    """
    c2w = np.asarray(c2w, np.float64)
    rng = np.random.default_rng(seed)
    kind = camera_kind(c2w) if kind == "auto" else kind
    out = _orbit(c2w, n, rng) if kind == "orbit" else _path(c2w, n, rng, jitter)
    return out.astype(np.float32)
