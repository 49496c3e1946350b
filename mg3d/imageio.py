"""Reading and writing images as uint8 arrays (Pillow), with EXIF orientation applied."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mg3d.errors import InputError

_ROTATING_EXIF = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def open_image(path: Path) -> Image.Image:
    """Open an image upright (EXIF orientation applied), as RGB or RGBA."""
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
    except FileNotFoundError:
        raise InputError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"cannot read image {path} ({exc.__class__.__name__})", hint="remove or re-export that file") from None
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale: keep the high byte
        im = Image.fromarray((np.asarray(im, dtype=np.uint32) >> 8).astype(np.uint8))
    return im.convert("RGBA" if has_alpha else "RGB")


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image as :func:`mg3d.imageio.read_image` returns it, reading only the header.

    EXIF rotations by a quarter turn swap the two, as ``read_image`` applies them.
    """
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except FileNotFoundError:
        raise InputError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"cannot read image {path} ({exc.__class__.__name__})", hint="remove or re-export it") from None
    return (h, w) if orientation in _ROTATING_EXIF else (w, h)


def read_image(path: Path) -> np.ndarray:
    """uint8 [H, W, 3] or [H, W, 4]."""
    return np.asarray(open_image(Path(path)))


def write_image(path: Path, image: np.ndarray) -> None:
    """Write uint8 [H, W, 3|4] (format from the suffix; JPEG at quality 95)."""
    im = Image.fromarray(np.ascontiguousarray(image))
    if Path(path).suffix.lower() in (".jpg", ".jpeg"):
        im.convert("RGB").save(path, quality=95)
    else:
        im.save(path)


def resize_long_side(image: Image.Image, max_size: int) -> Image.Image:
    """Shrink (never enlarge) so that the longer side is at most ``max_size`` pixels (Lanczos)."""
    w, h = image.size
    if max_size <= 0 or max(w, h) <= max_size:
        return image
    s = max_size / max(w, h)
    return image.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)


def shrink(image: np.ndarray, factor: int) -> np.ndarray:
    """uint8 [H, W, C] shrunk by an integer ``factor`` (box filter, sizes rounded down; 1: unchanged)."""
    if factor <= 1:
        return image
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((max(1, w // factor), max(1, h // factor)), Image.Resampling.BOX))


def sharpness(gray: np.ndarray) -> float:
    """Variance of the Laplacian of a float greyscale image [H, W]: higher is sharper."""
    lap = -4.0 * gray[1:-1, 1:-1] + gray[:-2, 1:-1] + gray[2:, 1:-1] + gray[1:-1, :-2] + gray[1:-1, 2:]
    return float(lap.var())
