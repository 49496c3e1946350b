"""mg3d: from a phone video and a text instruction to an edited 3D model that runs on phones and in browsers.

Importing ``mg3d`` is cheap: it pulls in neither torch, diffusers nor coremltools. Heavy parts are imported
by the stages that need them.
"""

__version__ = "0.1.0"

from mg3d.errors import Mg3dError  # noqa: E402  (re-exported for callers: `except mg3d.Mg3dError`)

__all__ = ["Mg3dError", "__version__"]
