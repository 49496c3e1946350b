"""Render mg3d's built-in demo scene: a small synthetic hand-held video plus its ground truth.

The scene is a closed, richly textured room (8 x 8 x 4 units, floor at z=0, world z-up) with a
sphere, a rotated box and a cylinder standing on the floor in the middle.  Every surface carries
its own non-repeating procedural colour texture (multi-octave 3D value noise, coloured blobs and
dark veins), defined in world / object coordinates so it is consistent across views.  Shading is
Lambertian (ambient + one directional light with hard shadows), i.e. view-independent.

A pure-numpy ray tracer renders 60 frames (320x240, horizontal FOV 60 deg, 2x2 supersampling)
along a ~150 degree hand-held-style arc around the objects.  Every 6th frame starting at frame 3
is motion-blurred (average of sub-renders along the camera motion plus a small hand shake).

Outputs (in ``mg3d/data/demo/``):
    demo.mp4      H.264 / yuv420p, 10 fps, 60 frames
    cameras.json  nerfstudio-style ground truth: PINHOLE intrinsics, per-frame camera-to-world
                  matrices (OpenGL axes: x right, y up, camera looks down -z), scene centre and
                  radius, and the indices of the blurred frames.

Everything is deterministic (seeded).  Regenerate from the repository root with::

    python scripts/make_demo.py
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import av
import numpy as np

OUT_DIR = Path(__file__).resolve().parent.parent / "mg3d" / "data" / "demo"
W, H, FPS, N_FRAMES = 320, 240, 10, 60
HFOV_DEG = 60.0
FOCAL = 0.5 * W / np.tan(np.radians(HFOV_DEG) / 2)
BLURRED = list(range(3, N_FRAMES, 6))
ROOM_MIN, ROOM_MAX = np.array([-4.0, -4.0, 0.0]), np.array([4.0, 4.0, 4.0])
LOOK_AT = np.array([0.0, 0.0, 0.45])
SCENE_RADIUS = 1.3
LIGHT = np.array([0.45, 0.3, 1.0]) / np.linalg.norm([0.45, 0.3, 1.0])  # direction towards light
AMBIENT, DIFFUSE = 0.5, 0.6
SEED = 1234

# Objects on the floor.
SPHERE_C, SPHERE_R = np.array([-0.55, 0.3, 0.5]), 0.5
BOX_C, BOX_HALF, BOX_ANGLE = np.array([0.55, -0.4, 0.4]), np.array([0.35, 0.3, 0.4]), np.radians(30)
CYL_C, CYL_R, CYL_H = np.array([0.35, 0.65]), 0.28, 1.05
BOX_ROT = np.array([[np.cos(BOX_ANGLE), -np.sin(BOX_ANGLE), 0.0],
                    [np.sin(BOX_ANGLE), np.cos(BOX_ANGLE), 0.0], [0.0, 0.0, 1.0]])

Array = np.ndarray
INF = np.float32(np.inf)


# ----------------------------------------------------------------------------- procedural texture
def _mix32(h: Array) -> Array:
    """Integer avalanche hash (lowbias32) on uint32 arrays."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * np.uint32(0x846CA68B)
    return h ^ (h >> 16)


def value_noise(p: Array, seed: int) -> Array:
    """Smooth 3D value noise in [0, 1] at points ``p`` (N, 3); non-periodic (hashed lattice)."""
    base = np.floor(p)
    f = (p - base).astype(np.float32)
    w = f * f * (3.0 - 2.0 * f)
    i = base.astype(np.int64).astype(np.uint32)  # wraps negatives, fine for hashing
    primes = (np.uint32(0x8DA6B343), np.uint32(0xD8163841), np.uint32(0xCB1AB31F))
    hs = [[(i[:, a] + np.uint32(d)) * primes[a] for d in (0, 1)] for a in range(3)]
    s = np.uint32(seed * 0x9E3779B1 & 0xFFFFFFFF)
    val = [(_mix32(hs[0][dx] ^ hs[1][dy] ^ hs[2][dz] ^ s) >> 8).astype(np.float32) / 2**24
           for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)]
    wx, wy, wz = w[:, 0], w[:, 1], w[:, 2]
    x = [val[k] + wx * (val[k + 1] - val[k]) for k in (0, 2, 4, 6)]
    y = [x[k] + wy * (x[k + 1] - x[k]) for k in (0, 2)]
    return y[0] + wz * (y[1] - y[0])


def fbm(p: Array, octaves: int, seed: int, gain: float = 0.5) -> Array:
    """Fractal sum of value noise, normalised to roughly [0, 1]."""
    total, amp, norm = np.zeros(len(p), np.float32), 1.0, 0.0
    for o in range(octaves):
        total += amp * value_noise(p * (2.03**o) + 17.31 * o, seed + 101 * o)
        norm, amp = norm + amp, amp * gain
    return total / norm


def palette(t: Array, phase: Array) -> Array:
    """Cosine colour palette (saturated, varied hues)."""
    return 0.5 + 0.5 * np.cos(2 * np.pi * (t[:, None] + phase[None, :]))


def smoothstep(a: float, b: float, x: Array) -> Array:
    t = np.clip((x - a) / (b - a), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def albedo(p: Array, mat: int) -> Array:
    """Colour of material ``mat`` at 3D points ``p``: noise-modulated hues, blobs and veins."""
    rng = np.random.default_rng(SEED + mat)
    scale = 1.0 if mat < 6 else 2.2  # objects are small: finer texture
    q = (p * scale + rng.uniform(-50, 50, 3)).astype(np.float32)
    phase = rng.uniform(0, 1, 3)
    col = palette(1.3 * fbm(q * 0.35, 2, 10 * mat), phase)
    detail = fbm(q * 2.5, 5, 10 * mat + 1, gain=0.65)
    col = col * np.clip(0.55 + 3.0 * (detail - 0.5), 0.05, 1.3)[:, None]
    for k, freq in enumerate((1.1, 2.9, 6.7)):  # sharp-edged coloured blobs at three scales
        blob = smoothstep(0.63, 0.66, fbm(q * freq, 2, 10 * mat + 2 + k))
        blob_col = palette(2.0 * value_noise(q * 0.6, 10 * mat + 5 + k), phase + 0.3 * k + 0.4)
        col = col + blob[:, None] * (blob_col - col)
    vein = 1.0 - smoothstep(0.006, 0.02, np.abs(fbm(q * 0.8, 2, 10 * mat + 8) - 0.5))
    vein += 1.0 - smoothstep(0.01, 0.03, np.abs(value_noise(q * 3.1, 10 * mat + 9) - 0.5))
    vein = np.clip(vein, 0.0, 1.0)
    return np.clip(col * (1.0 - 0.85 * vein)[:, None], 0.0, 1.0)


# ----------------------------------------------------------------------------- ray intersections
def hit_sphere(o: Array, d: Array) -> tuple[Array, Array]:
    oc = o - SPHERE_C
    b = np.einsum("ij,ij->i", oc, d)
    disc = b * b - (np.einsum("ij,ij->i", oc, oc) - SPHERE_R**2)
    sq = np.sqrt(np.maximum(disc, 0.0))
    t = np.where(-b - sq > 1e-4, -b - sq, -b + sq)
    t = np.where((disc > 0) & (t > 1e-4), t, INF)
    n = (o + t[:, None] * d - SPHERE_C) / SPHERE_R
    return t, n


def hit_box(o: Array, d: Array) -> tuple[Array, Array]:
    lo, ld = (o - BOX_C) @ BOX_ROT, d @ BOX_ROT  # into the box frame
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / np.where(np.abs(ld) < 1e-9, 1e-9, ld)
        t1, t2 = (-BOX_HALF - lo) * inv, (BOX_HALF - lo) * inv
    tmin3 = np.minimum(t1, t2)
    tnear, tfar = tmin3.max(axis=1), np.maximum(t1, t2).min(axis=1)
    t = np.where((tnear <= tfar) & (tnear > 1e-4), tnear, INF)
    axis = tmin3.argmax(axis=1)
    n_local = np.zeros_like(lo)
    n_local[np.arange(len(lo)), axis] = -np.sign(ld[np.arange(len(lo)), axis])
    return t, n_local @ BOX_ROT.T


def hit_cylinder(o: Array, d: Array) -> tuple[Array, Array]:
    ox, oy = o[:, 0] - CYL_C[0], o[:, 1] - CYL_C[1]
    a = d[:, 0] ** 2 + d[:, 1] ** 2 + 1e-12
    b = ox * d[:, 0] + oy * d[:, 1]
    disc = b * b - a * (ox**2 + oy**2 - CYL_R**2)
    t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
    z = o[:, 2] + t_side * d[:, 2]
    t_side = np.where((disc > 0) & (t_side > 1e-4) & (z >= 0) & (z <= CYL_H), t_side, INF)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_cap = (CYL_H - o[:, 2]) / d[:, 2]
    px, py = ox + t_cap * d[:, 0], oy + t_cap * d[:, 1]
    t_cap = np.where((t_cap > 1e-4) & (px**2 + py**2 <= CYL_R**2), t_cap, INF)
    t = np.minimum(t_side, t_cap)
    p = o + t[:, None] * d
    n = np.stack([p[:, 0] - CYL_C[0], p[:, 1] - CYL_C[1], np.zeros_like(t)], 1) / CYL_R
    n[t_cap <= t_side] = (0.0, 0.0, 1.0)
    return t, n


def hit_room(o: Array, d: Array) -> tuple[Array, Array, Array]:
    """Rays start inside the room: exit distance, inward normal and surface id (0..5)."""
    with np.errstate(divide="ignore"):
        t_axes = np.where(d > 0, (ROOM_MAX - o) / d, (ROOM_MIN - o) / d)
    t_axes = np.where(np.abs(d) < 1e-12, np.inf, t_axes)
    axis = t_axes.argmin(axis=1)
    rows = np.arange(len(o))
    n = np.zeros_like(o)
    n[rows, axis] = -np.sign(d[rows, axis])
    surface = 2 * axis + (d[rows, axis] > 0)
    return t_axes[rows, axis], n, surface


def shade(o: Array, d: Array) -> Array:
    """Trace rays (N, 3) and return linear RGB (N, 3)."""
    t, n, mat = hit_room(o, d)
    for k, fn in enumerate((hit_sphere, hit_box, hit_cylinder)):
        tk, nk = fn(o, d)
        closer = tk < t
        t[closer], n[closer], mat[closer] = tk[closer], nk[closer], 6 + k
    p = o + t[:, None] * d
    centres = {6: SPHERE_C, 7: BOX_C, 8: np.array([*CYL_C, 0.5])}
    col = np.zeros_like(p)
    for m in np.unique(mat):
        sel = mat == m
        col[sel] = albedo(p[sel] - centres.get(int(m), 0.0), int(m))
    # Hard shadows from the objects (the room itself never occludes the light).
    so, sd = p + 1e-3 * n, np.broadcast_to(LIGHT, p.shape)
    lit = np.ones(len(p), bool)
    for fn in (hit_sphere, hit_box, hit_cylinder):
        lit &= ~np.isfinite(fn(so, sd)[0])
    light = AMBIENT + DIFFUSE * np.clip(n @ LIGHT, 0.0, None) * lit
    return np.clip(col * light[:, None], 0.0, 1.0)


# ----------------------------------------------------------------------------- camera path
_JIT = np.random.default_rng(SEED).uniform(0, 2 * np.pi, (4, 3))


def _wobble(t: float, k: int) -> float:
    """Smooth pseudo-random signal in about [-1, 1] (sum of incommensurate sines)."""
    return float(np.mean(np.sin(np.array([0.21, 0.37, 0.59]) * t + _JIT[k])))


def camera_to_world(t: float, shake_yaw: float = 0.0) -> Array:
    """4x4 OpenGL camera-to-world pose at (fractional) frame time ``t``."""
    s = t / (N_FRAMES - 1)
    az = np.radians(200.0 + 150.0 * s + 2.0 * np.sin(2 * np.pi * s))
    radius = 2.8 + 0.1 * np.sin(np.pi * s) + 0.02 * _wobble(t, 0)
    eye = np.array([radius * np.cos(az), radius * np.sin(az),
                    1.4 + 0.12 * np.sin(2 * np.pi * 1.5 * s) + 0.015 * _wobble(t, 1)])
    target = LOOK_AT + 0.04 * np.array([_wobble(t, 2), _wobble(t, 3), 0.5 * _wobble(t, 1)])
    fwd = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(fwd, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, fwd)
    roll = np.radians(1.0) * _wobble(t, 2)
    right, up = np.cos(roll) * right + np.sin(roll) * up, np.cos(roll) * up - np.sin(roll) * right
    if shake_yaw:  # extra rotation about the camera's up axis (hand shake during exposure)
        right, fwd = (np.cos(shake_yaw) * right + np.sin(shake_yaw) * fwd,
                      np.cos(shake_yaw) * fwd - np.sin(shake_yaw) * right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, -fwd, eye
    return c2w


def camera_rays(c2w: Array, offset: tuple[float, float]) -> tuple[Array, Array]:
    """One ray per pixel, through sub-pixel position ``offset`` (0.5, 0.5 = pixel centre)."""
    u, v = np.meshgrid(np.arange(W) + offset[0], np.arange(H) + offset[1])
    d_cam = np.stack([(u - W / 2) / FOCAL, -(v - H / 2) / FOCAL, -np.ones_like(u)], -1)
    d = d_cam.reshape(-1, 3) @ c2w[:3, :3].T
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return np.broadcast_to(c2w[:3, 3], d.shape).copy(), d


SUBPIX = [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)]


def render_frame(i: int) -> Array:
    """Render frame ``i`` as uint8 (H, W, 3): 2x2 supersampled, motion-blurred if in BLURRED."""
    if i in BLURRED:  # 12 sub-exposures spanning the motion to the neighbouring frames + shake
        ts = np.linspace(-0.6, 0.6, 12)
        samples = [(camera_to_world(i + dt, np.radians(2.0) * dt), SUBPIX[k % 4])
                   for k, dt in enumerate(ts)]
    else:
        samples = [(camera_to_world(i), off) for off in SUBPIX]
    rays = [camera_rays(c2w, off) for c2w, off in samples]
    o, d = np.concatenate([r[0] for r in rays]), np.concatenate([r[1] for r in rays])
    rgb = shade(o, d).reshape(len(samples), H, W, 3).mean(axis=0)
    return (np.clip(rgb, 0, 1) ** (1 / 1.1) * 255 + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------- outputs
def write_video(frames: list[Array], path: Path) -> None:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"crf": "19", "preset": "slow"}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def ground_truth() -> dict:
    return {
        "camera_model": "PINHOLE",
        "fl_x": FOCAL, "fl_y": FOCAL, "cx": W / 2, "cy": H / 2, "w": W, "h": H,
        "fps": FPS,
        "scene": {"center": LOOK_AT.tolist(), "radius": SCENE_RADIUS},
        "blurred_frames": BLURRED,
        "frames": [{"frame_index": i, "time_s": i / FPS,
                    "transform_matrix": np.round(camera_to_world(i), 7).tolist()}
                   for i in range(N_FRAMES)],
    }


def main() -> None:
    start = time.perf_counter()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    workers = max(1, min(4, os.cpu_count() or 1))
    with ProcessPoolExecutor(workers) as pool:
        frames = list(pool.map(render_frame, range(N_FRAMES)))
    write_video(frames, OUT_DIR / "demo.mp4")
    (OUT_DIR / "cameras.json").write_text(json.dumps(ground_truth(), indent=1) + "\n")
    print(f"wrote {OUT_DIR} ({N_FRAMES} frames) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
