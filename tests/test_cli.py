"""The command line: help, version, info (table and JSON), up-to-date/force, option layering, errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import read_manifest


def _posed_dataset(root: Path, n: int = 10) -> Path:
    """A tiny nerfstudio dataset (cameras on a circle looking at the origin), imported without SfM."""
    from mg3d.scene import look_at_rotation

    root.mkdir()
    frames = []
    for i in range(n):
        angle = 2 * np.pi * i / n
        pose = np.eye(4)
        pose[:3, 3] = [3 * np.cos(angle), 3 * np.sin(angle), 1.0]
        pose[:3, :3] = look_at_rotation(-pose[:3, 3], np.array([0.0, 0, 1]))
        Image.fromarray(np.full((48, 64, 3), 20 * i, np.uint8)).save(root / f"{i}.png")
        frames.append({"file_path": f"{i}.png", "transform_matrix": pose.tolist()})
    (root / "transforms.json").write_text(json.dumps({"fl_x": 60.0, "w": 64, "h": 48, "camera_model": "PINHOLE", "frames": frames}))
    return root


def test_help_and_version(cli) -> None:
    from mg3d import __version__

    result = cli("--help")
    assert result.exit_code == 0 and "capture" in result.output and "info" in result.output
    assert __version__ in cli("--version").output
    assert "--frames" in cli("capture", "--help").output


def test_import_up_to_date_force_and_changed_options(tmp_path: Path, cli) -> None:
    data, ws = _posed_dataset(tmp_path / "data"), tmp_path / "ws"
    assert cli("capture", data, "--out", ws).exit_code == 0
    first = read_manifest(ws)
    assert first["metrics"]["imported_format"] == "nerfstudio"
    assert first["metrics"]["train_images"] == 8 and first["metrics"]["test_images"] == 2  # every 8th held out
    assert "up to date" in cli("capture", data, "--out", ws).output
    assert read_manifest(ws)["finished"] == first["finished"]
    time.sleep(1.1)  # manifests carry times to the second
    assert cli("capture", data, "--out", ws, "--force").exit_code == 0
    assert read_manifest(ws)["finished"] > first["finished"]
    assert cli("capture", data, "--out", ws, "--max-size", "32").exit_code == 0  # new option: redone
    again = read_manifest(ws)
    assert again["config"]["max_size"] == 32 and again["metrics"]["image_size"] == [32, 24]
    assert again["metrics"]["focal_px"] == 30.0  # intrinsics scale with the image (60 at 64 px)
    (data / "0.png").write_bytes((data / "1.png").read_bytes())  # input changed: redone
    assert "up to date" not in cli("capture", data, "--out", ws, "--max-size", "32").output


def test_config_file_and_preset_with_command_line_winning(tmp_path: Path, cli) -> None:
    data, ws = _posed_dataset(tmp_path / "data"), tmp_path / "ws"
    config = tmp_path / "my.yaml"
    config.write_text("capture:\n  holdout_every: 5\n  max_size: 40\n")
    assert cli("capture", data, "--out", ws, "--preset", "tiny", "--config", config, "--max-size", "32").exit_code == 0
    saved = read_manifest(ws)["config"]
    assert (saved["holdout_every"], saved["max_size"], saved["max_frames"]) == (5, 32, 24)


def test_info_table_and_json(tmp_path: Path, cli) -> None:
    data, ws = _posed_dataset(tmp_path / "data"), tmp_path / "ws"
    cli("capture", data, "--out", ws)
    result = cli("info", ws)
    assert result.exit_code == 0 and "capture" in result.output and "10/10 frames" in result.output
    parsed = json.loads(cli("info", ws, "--json").output)
    assert parsed["stages"]["capture"]["metrics"]["frames_registered"] == 10
    assert parsed["unfinished"] == []


def test_info_errors(tmp_path: Path, cli) -> None:
    result = cli("info", tmp_path / "nope")
    assert result.exit_code == 1 and result.output.startswith("error: workspace") and "mg3d capture" in result.output
    (tmp_path / "plain").mkdir()
    assert "not an mg3d workspace" in cli("info", tmp_path / "plain").output


def test_usage_errors_are_one_line(tmp_path: Path, cli) -> None:
    result = cli("capture", "--out", tmp_path / "ws")
    assert result.exit_code == 1 and "either SOURCE or --demo" in result.output
    config = tmp_path / "bad.yaml"
    config.write_text("capture:\n  frame: 3\n")
    result = cli("capture", "--demo", "--out", tmp_path / "ws", "--config", config)
    assert result.exit_code == 1 and "unknown option(s) frame" in result.output
    assert not (tmp_path / "ws").exists()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    import pytest
    from click.testing import CliRunner

    from mg3d.cli import main
    from mg3d.errors import InputError

    with pytest.raises(InputError):
        CliRunner().invoke(main, ["--debug", "capture", str(tmp_path / "none"), "--out", str(tmp_path / "ws")], catch_exceptions=False)


def test_progress_prints_plain_lines_off_a_terminal() -> None:
    """Off a terminal (logs, CI, background jobs) rich draws nothing until a bar ends: progress bars print a
    plain line per task every so often instead, with the task's fields; on a terminal they do not."""
    import io

    from rich.console import Console

    from mg3d.ui import LoggedProgress

    for terminal in (False, True):
        out = io.StringIO()
        with LoggedProgress(console=Console(file=out, force_terminal=terminal, width=100), every=0.0) as bar:
            task = bar.add_task("student", total=10, loss=float("nan"))
            bar.update(task, completed=3, loss=0.25)
            bar.advance(task)
        lines = [line for line in out.getvalue().splitlines() if line.startswith("student: ")]
        if terminal:
            assert not lines
        else:
            assert lines[0].startswith("student: 3/10, ") and "loss 0.25" in lines[0] and lines[1].startswith("student: 4/10, "), lines
