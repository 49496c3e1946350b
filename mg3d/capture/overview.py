"""``overview.png``: a contact sheet of the frames and a top view of cameras and sparse points."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mg3d.scene import Scene

_TRAIN, _TEST, _BG = (40, 120, 220), (235, 120, 20), (250, 250, 250)


def draw_overview(scene: Scene, path: Path, title: str = "", thumbs: int = 12, panel: int = 480) -> None:
    """Left: up to ``thumbs`` frames (blue border: train, orange: test). Right: the x-y plane seen from
    above (z is up after normalization): points in their colours, cameras as dots with viewing rays,
    and the unit circle the region of interest was scaled into."""
    test = set(scene.splits.get("test", np.empty(0, dtype=int)).tolist())
    pick = np.linspace(0, len(scene) - 1, min(thumbs, len(scene))).round().astype(int)
    cols = 3
    rows = -(-len(pick) // cols)
    cell = panel // cols
    canvas = Image.new("RGB", (panel * 2, max(panel, rows * cell) + 28), _BG)
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 8), title, fill=(0, 0, 0))
    for k, i in enumerate(pick):
        thumb = Image.open(scene.image_paths[i]).convert("RGB")
        thumb.thumbnail((cell - 8, cell - 8))
        x, y = (k % cols) * cell + 4, (k // cols) * cell + 28
        canvas.paste(thumb, (x, y))
        draw.rectangle([x - 2, y - 2, x + thumb.width + 1, y + thumb.height + 1], outline=_TEST if i in test else _TRAIN, width=2)

    cams = scene.centers[:, :2]
    pts = scene.points[:, :2] if scene.points is not None and len(scene.points) else np.zeros((0, 2))
    extent = max(1.2, float(np.abs(cams).max()) * 1.1)
    to_px = lambda xy: (panel + panel / 2 + xy[..., 0] / extent * panel * 0.45, 28 + panel / 2 - xy[..., 1] / extent * panel * 0.45)  # noqa: E731
    r = 0.45 * panel / extent
    cx, cy = panel + panel / 2, 28 + panel / 2
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(180, 180, 180))
    inside = np.all(np.abs(pts) < extent, axis=1)
    colors = scene.point_colors if scene.point_colors is not None else np.full((len(pts), 3), 90, np.uint8)
    for (px, py), color in zip(zip(*to_px(pts[inside])), colors[inside]):
        draw.point((px, py), fill=tuple(int(c) for c in color))
    forward = -scene.c2w[:, :2, 2]
    for i, (start, end) in enumerate(zip(cams, cams + forward * 0.15 * extent)):
        color = _TEST if i in test else _TRAIN
        (x0, y0), (x1, y1) = to_px(start), to_px(end)
        draw.line([x0, y0, x1, y1], fill=color, width=1)
        draw.ellipse([x0 - 2, y0 - 2, x0 + 2, y0 + 2], fill=color)
    draw.text((panel + 8, 8), "top view (x right, y up): cameras, viewing rays, sparse points, unit circle", fill=(0, 0, 0))
    canvas.save(path)
