"""Frames for structure-from-motion: from a video (PyAV) or a folder of photos.

Frames are spread over time and, within each time window, the sharpest one is kept (variance of the
Laplacian), so motion-blurred frames from a hand-held phone are avoided. Images are shrunk so the long
side is at most ``max_size`` (InstructPix2Pix edits best around 512 px).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from mg3d.errors import CaptureError, InputError
from mg3d.imageio import open_image, resize_long_side, sharpness
from mg3d.scene import IMAGE_SUFFIXES

MIN_FRAMES = 5
VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".avi", ".mkv", ".webm", ".3gp", ".mts")


@dataclass
class Frame:
    """One chosen frame: its pixels, where it came from, and how sharp it is."""

    image: Image.Image
    source_index: int  # frame number in the video, or position in the sorted photo list
    time_s: float | None  # seconds into the video; None for photos
    sharpness: float
    source_name: str = ""


def _window_of(index: int, total: int, count: int) -> int:
    """Which of ``count`` equal windows over ``total`` items holds ``index``."""
    return min(index * count // total, count - 1)


def _score(image: Image.Image) -> float:
    gray = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    return sharpness(gray)


def _target(requested: int | None, available: int, default: int, what: str, hint: str) -> int:
    if available < MIN_FRAMES:
        raise CaptureError(f"{what} has only {available} frame(s); structure-from-motion needs at least {MIN_FRAMES}", hint=hint)
    if requested is not None:
        if requested < MIN_FRAMES:
            raise CaptureError(f"--frames {requested} is too few", hint=f"ask for at least {MIN_FRAMES}")
        if requested > available:
            raise CaptureError(
                f"{what} has {available} frames but {requested} were requested",
                hint=f"pass --frames {available} or fewer, or film a longer video",
            )
        return requested
    return min(default, available)


def probe_video(path: Path) -> tuple[int, float]:
    """(number of frames, frames per second) of a video, from its container without decoding."""
    import av

    if path.stat().st_size == 0:
        raise CaptureError(f"video {path} is empty (0 bytes)", hint="copy the file again from the phone")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise CaptureError(f"{path} has no video stream", hint="pass a video file or a folder of photos")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0) or 30.0
            count = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
    except av.error.FFmpegError as exc:
        raise CaptureError(f"cannot read video {path} ({exc.__class__.__name__})", hint="check that it plays, or re-encode it (e.g. with ffmpeg)") from None
    if count == 0:
        raise CaptureError(f"video {path} has no frames", hint="check that it plays")
    return count, fps


def _decoded(path: Path) -> Iterator[tuple[int, float, Image.Image]]:
    """(index, seconds, upright PIL image) for every frame; display rotation from phones is applied."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for index, frame in enumerate(container.decode(stream)):
                image = frame.to_image()
                angle = int(round(getattr(frame, "rotation", 0) or 0))
                if angle % 360:
                    image = image.rotate(angle, expand=True)  # PyAV: counter-clockwise degrees, as PIL
                yield index, float(frame.time if frame.time is not None else 0.0), image
    except av.error.FFmpegError as exc:
        raise CaptureError(f"cannot decode video {path} ({exc.__class__.__name__}: {exc})", hint="check that it plays, or re-encode it (e.g. with ffmpeg)") from None


def select_video_frames(
    path: Path, count: int | None, max_size: int, default: int = 100, on_frame: Callable[[int, int], None] | None = None
) -> list[Frame]:
    """Decode ``path`` once and keep the sharpest frame of each of ``count`` equal time windows.

    Args:
        count: frames wanted; None means ``default`` or all the video has, whichever is fewer.
        on_frame: called with (frames decoded, frames in the video) to drive a progress bar.
    """
    total, fps = probe_video(path)
    target = _target(count, total, default, f"video {path.name}", "film a longer video, or use a folder of photos")
    best: dict[int, Frame] = {}
    decoded = 0
    for index, time_s, image in _decoded(path):
        decoded += 1
        window = _window_of(index, max(total, index + 1), target)
        small = resize_long_side(image, max_size)
        score = _score(small)
        if window not in best or score > best[window].sharpness:
            best[window] = Frame(small, index, time_s, score, f"{path.name}#{index}")
        if on_frame:
            on_frame(decoded, total)
    if decoded == 0:
        raise CaptureError(f"video {path} decoded to no frames", hint="check that it plays, or re-encode it")
    frames = [best[w] for w in sorted(best)]
    if len(frames) < target:  # the container promised more frames than it holds: check against what decoded
        _target(count, len(frames), default, f"video {path.name}", "film a longer video")
    return frames


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def list_photos(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, in natural order (IMG_2 before IMG_10)."""
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    if not files:
        raise InputError(f"folder {folder} is empty", hint="put the photos (or a video) of the scene there")
    photos = sorted((p for p in files if p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: _natural_key(p.name))
    if not photos:
        examples = ", ".join(p.name for p in sorted(files)[:3])
        raise InputError(
            f"folder {folder} holds no images ({len(files)} other file(s), e.g. {examples})",
            hint=f"mg3d reads {', '.join(IMAGE_SUFFIXES)} photos or one video file",
        )
    return photos


def select_photos(
    folder: Path, count: int | None, max_size: int, default: int = 100, on_frame: Callable[[int, int], None] | None = None
) -> list[Frame]:
    """The photos in ``folder`` (upright, shrunk): the sharpest of each of ``count`` windows over the
    name-sorted list (``default`` or all of them, whichever is fewer, when ``count`` is None)."""
    photos = list_photos(folder)
    target = _target(count, len(photos), default, f"folder {folder.name}", "add more photos of the scene")
    best: dict[int, Frame] = {}
    for i, path in enumerate(photos):
        image = resize_long_side(open_image(path), max_size).convert("RGB")
        window = _window_of(i, len(photos), target)
        score = _score(image)
        if window not in best or score > best[window].sharpness:
            best[window] = Frame(image, i, None, score, path.name)
        if on_frame:
            on_frame(i + 1, len(photos))
    return [best[w] for w in sorted(best)]


def is_video(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES
