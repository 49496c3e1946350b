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
        from mg3d.ui import console

        # rich wraps at 80 columns off a terminal, and a message that holds a temporary path broke wherever that
        # path's length put the edge ("is up\nto date" failed a CI run): no wrapping here
        width = console._width
        console.width = 1000
        try:
            return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        finally:
            console._width = width

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


@pytest.fixture(scope="session")
def tiny_demo_teacher(tiny_demo_capture: Path) -> tuple[Path, str]:
    """A copy of the tiny demo capture with the tiny teacher trained on it (about a minute on 2 cores), once
    per session, and the command's output. Tests must leave it as it is; later stages work on copies."""
    import shutil

    from mg3d.cli import main

    ws = tiny_demo_capture.parent / "learned"
    shutil.copytree(tiny_demo_capture, ws)
    result = CliRunner().invoke(main, ["teacher", str(ws), "--preset", "tiny"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return ws, result.output


@pytest.fixture(scope="session")
def distilled(tiny_demo_teacher: tuple[Path, str]) -> Path:
    """A copy of the tiny teacher's workspace with tiny pseudo data (48 views of 64x48, ~40 s on 2 cores)."""
    import shutil

    from mg3d.cli import main

    ws = tiny_demo_teacher[0].parent / "distilled"
    shutil.copytree(tiny_demo_teacher[0], ws)
    result = CliRunner().invoke(main, ["distill", str(ws), "--preset", "tiny"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return ws


@pytest.fixture(scope="session")
def trained(distilled: Path) -> tuple[Path, str]:
    """The pseudo data plus the tiny student trained on it (~40 s), and the command's output, once per
    session. Tests must leave it as it is; the export tests work on copies."""
    import shutil

    from mg3d.cli import main

    ws = distilled.parent / "trained"
    shutil.copytree(distilled, ws)
    result = CliRunner().invoke(main, ["student", str(ws), "--preset", "tiny"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return ws, result.output


def read_manifest(ws: Path, stage: str = "capture") -> dict:
    return json.loads((ws / stage / "manifest.json").read_text())


def one_line_error(result: Result, *needles: str) -> str:
    """The single ``error: ...`` line of a failed command (no traceback), containing every needle."""
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def interrupt_at(monkeypatch: pytest.MonkeyPatch, module_name: str, at_step: int) -> None:
    """Make training in ``module_name`` stop like Ctrl-C right after it saved the checkpoint of ``at_step``."""
    import importlib

    module = importlib.import_module(module_name)
    real = module.save_checkpoint

    def save_then_interrupt(folder, model, optimizer, meta):
        real(folder, model, optimizer, meta)
        if meta["step"] == at_step:
            raise KeyboardInterrupt

    monkeypatch.setattr(module, "save_checkpoint", save_then_interrupt)
