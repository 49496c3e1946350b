"""Access to mg3d's built-in demo scene (a short synthetic video and its ground-truth cameras).

The demo is a 60-frame, 320x240, 10 fps hand-held-style video of a textured room with a few
objects, rendered by ``scripts/make_demo.py`` (regenerate with ``python scripts/make_demo.py``).
``cameras.json`` holds the ground truth in nerfstudio convention: PINHOLE intrinsics
(``fl_x, fl_y, cx, cy, w, h``), per-frame camera-to-world ``transform_matrix`` with OpenGL camera
axes (x right, y up, looking down -z) in a z-up world, ``scene`` (centre and radius of the object
region) and ``blurred_frames`` (indices of deliberately motion-blurred frames).

This module only uses the standard library so that importing it is cheap.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

__all__ = ["DEMO_DIR", "video_path", "ground_truth"]

#: Folder holding ``demo.mp4`` and ``cameras.json``.
DEMO_DIR: Path = Path(str(resources.files("mg3d") / "data" / "demo"))


def video_path() -> Path:
    """Return the path of the demo video (``demo.mp4``: H.264, 320x240, 10 fps, 60 frames)."""
    return DEMO_DIR / "demo.mp4"


def ground_truth() -> dict:
    """Return the parsed ``cameras.json`` (a fresh dict on every call).

    Keys: ``camera_model`` ("PINHOLE"), ``fl_x``, ``fl_y``, ``cx``, ``cy``, ``w``, ``h``, ``fps``,
    ``scene`` (``center``, ``radius``), ``blurred_frames`` (list of frame indices) and ``frames``
    (one ``{"frame_index", "time_s", "transform_matrix"}`` per video frame; ``transform_matrix`` is
    a 4x4 camera-to-world matrix, OpenGL camera axes, world z-up).
    """
    return json.loads((DEMO_DIR / "cameras.json").read_text(encoding="utf-8"))
