"""Shared fixtures: the CLI runner, small generated videos and photo folders, and the shared real data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data(name: str) -> Path:
    """A folder of ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"shared data {path} is absent (see ../shared/data/README.md)")
    return path


@pytest.fixture
def cli():
    """Run ``mg3d ARGS...`` in-process; returns click's Result (output holds stdout and stderr)."""
    from mg3d.cli import main

    def run(*args: str | Path) -> Result:
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    return run


def textured_frames(n: int, size: tuple[int, int] = (160, 120), seed: int = 0) -> list[np.ndarray]:
    """``n`` frames panning across one random texture (uint8 [H, W, 3]): decodable, SfM is not the point."""
    w, h = size
    rng = np.random.default_rng(seed)
    canvas = rng.integers(0, 255, (h, w + 4 * n, 3), dtype=np.uint8)
    return [canvas[:, 4 * i : 4 * i + w] for i in range(n)]


def write_video(path: Path, frames: list[np.ndarray], fps: int = 10) -> Path:
    """Encode frames as H.264 with PyAV."""
    import av

    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def demo_frames(indices: list[int]) -> list[np.ndarray]:
    """Decoded frames of the built-in demo video (uint8 [H, W, 3])."""
    import av

    from mg3d.demo import video_path

    wanted, out = set(indices), {}
    with av.open(str(video_path())) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                out[i] = frame.to_ndarray(format="rgb24")
    return [out[i] for i in indices]


@pytest.fixture(scope="session")
def tiny_demo_capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in demo captured with the tiny preset (24 of 60 frames, long side 256), once per session.
    Tests may re-run capture on it but must leave it as it is; teacher tests work on copies."""
    from mg3d.cli import main

    ws = tmp_path_factory.mktemp("demo") / "ws"
    result = CliRunner().invoke(main, ["capture", "--demo", "--out", str(ws), "--preset", "tiny"])
    assert result.exit_code == 0, result.output
    return ws


def read_manifest(ws: Path, stage: str = "capture") -> dict:
    return json.loads((ws / stage / "manifest.json").read_text())
