"""Typed errors. Library code raises these; the CLI prints them as one line and exits non-zero.

Each error carries what is wrong (``message``) and what to do about it (``hint``), so a person reading
``error: ...`` knows the next step without a traceback.
"""

from __future__ import annotations


class Mg3dError(Exception):
    """Base class of every error mg3d raises on purpose.

    Example:
        >>> str(Mg3dError("no images in photos/", hint="add .jpg or .png files"))
        'no images in photos/; add .jpg or .png files'
    """

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class InputError(Mg3dError):
    """A path given by the user is missing, empty, unreadable or of the wrong kind."""


class DatasetError(Mg3dError):
    """A dataset file (transforms.json, poses_bounds.npy, a COLMAP model) is malformed or unsafe."""


class CaptureError(Mg3dError):
    """Frames could not be taken from a video or a folder of photos."""


class SfMError(Mg3dError):
    """Structure-from-motion failed or registered too few frames."""


class WorkspaceError(Mg3dError):
    """A workspace is missing a stage, or a stage's files are inconsistent."""


class ConfigError(Mg3dError):
    """A config file or option value is invalid."""
