"""Workspaces: manifests written last and atomically, up-to-date checks, failures leave nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mg3d.config import config_from_dict, load_preset, read_config_file, resolve_config
from mg3d.errors import ConfigError, WorkspaceError
from mg3d.workspace import MANIFEST, Workspace, hash_input


def _write_stage(ws: Workspace, text: str, config: dict | None = None, inputs: dict | None = None) -> dict:
    with ws.begin("capture", config or {"a": 1}, inputs or {"x": {"sha256": "1"}}) as run:
        (run.path / "out.txt").write_text(text)
        run.metrics["value"] = len(text)
        run.outputs["text"] = "out.txt"
    return run.manifest


def test_stage_commits_manifest_and_is_up_to_date(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    manifest = _write_stage(ws, "hello")
    assert (tmp_path / "ws" / "capture" / "out.txt").read_text() == "hello"
    on_disk = json.loads((tmp_path / "ws" / "capture" / MANIFEST).read_text())
    assert on_disk == manifest
    assert on_disk["metrics"]["value"] == 5 and on_disk["metrics"]["duration_s"] >= 0
    assert on_disk["versions"]["mg3d"] and on_disk["started"] <= on_disk["finished"]
    assert ws.stages() == ["capture"] and ws.partial_stages() == []
    assert ws.is_up_to_date("capture", {"a": 1}, {"x": {"sha256": "1"}})
    assert not ws.is_up_to_date("capture", {"a": 2}, {"x": {"sha256": "1"}})  # config changed
    assert not ws.is_up_to_date("capture", {"a": 1}, {"x": {"sha256": "2"}})  # input changed
    (tmp_path / "ws" / "capture" / "out.txt").unlink()
    assert not ws.is_up_to_date("capture", {"a": 1}, {"x": {"sha256": "1"}})  # output gone


def test_failed_stage_leaves_previous_result_and_no_partial(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    _write_stage(ws, "good")
    with pytest.raises(RuntimeError):
        with ws.begin("capture", {"a": 2}, {}) as run:
            (run.path / "out.txt").write_text("half")
            raise RuntimeError("boom")
    assert (tmp_path / "ws" / "capture" / "out.txt").read_text() == "good"
    assert ws.manifest("capture")["config"] == {"a": 1}
    assert ws.partial_stages() == [] and not list((tmp_path / "ws").glob(".*"))


def test_failed_resumable_stage_keeps_its_partial_only_with_something_to_resume(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    _write_stage(ws, "ok")
    with pytest.raises(RuntimeError):  # failed before its first checkpoint: nothing to resume, nothing left
        with ws.begin("teacher", {}, {}, resumable=True):
            raise RuntimeError("bad input")
    assert ws.partial_stages() == [] and not (tmp_path / "ws" / ".teacher.partial").exists()
    with pytest.raises(RuntimeError):
        with ws.begin("teacher", {}, {}, resumable=True) as run:
            (run.path / "checkpoint.json").write_text("{}")
            raise RuntimeError("diverged")
    assert ws.partial_stages() == ["teacher"] and (tmp_path / "ws" / ".teacher.partial" / "checkpoint.json").is_file()


def test_interrupted_first_stage_removes_the_workspace_it_created(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "new-ws")
    with pytest.raises(KeyboardInterrupt):
        with ws.begin("capture", {}, {}) as run:
            (run.path / "x").write_text("x")
            raise KeyboardInterrupt
    assert not (tmp_path / "new-ws").exists()


def test_partial_folder_is_not_a_finished_stage(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    _write_stage(ws, "ok")
    (tmp_path / "ws" / ".teacher.partial").mkdir()  # what a killed process leaves
    assert ws.stages() == ["capture"] and ws.partial_stages() == ["teacher"]
    with pytest.raises(WorkspaceError, match="no finished teacher stage"):
        ws.require("teacher", how="run mg3d teacher")


def test_interrupted_swap_is_recovered(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    _write_stage(ws, "ok")
    (tmp_path / "ws" / "capture").rename(tmp_path / "ws" / ".capture.old")  # crash between the two renames
    assert Workspace(tmp_path / "ws").stages() == ["capture"]


def test_refuses_foreign_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    with pytest.raises(WorkspaceError, match="not an mg3d workspace"):
        Workspace(tmp_path / "home").begin("capture", {}, {})
    assert (tmp_path / "home" / "thesis.tex").read_text() == "precious"


def test_corrupt_manifest_is_a_clear_error(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    _write_stage(ws, "ok")
    (tmp_path / "ws" / "capture" / MANIFEST).write_text("{not json")
    with pytest.raises(WorkspaceError, match="corrupt"):
        ws.manifest("capture")


def test_hash_input_follows_content(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"1")
    first = hash_input(folder)["sha256"]
    (folder / "a.jpg").write_bytes(b"2")
    assert hash_input(folder)["sha256"] != first
    assert hash_input(folder / "a.jpg")["bytes"] == 1


def test_config_layers_and_validation(tmp_path: Path) -> None:
    from mg3d.capture import CaptureConfig

    assert load_preset("tiny")["capture"]["max_frames"] == 24
    file = tmp_path / "c.yaml"
    file.write_text("capture:\n  max_frames: 40\n  max_size: 300\n")
    config = resolve_config(CaptureConfig, "capture", "tiny", file, {"max_size": 200})
    assert (config.max_frames, config.max_size) == (40, 200)  # preset < file < command line
    with pytest.raises(ConfigError, match="unknown option"):
        config_from_dict(CaptureConfig, {"frame": 3})
    with pytest.raises(ConfigError, match="must be int"):
        config_from_dict(CaptureConfig, {"max_size": "big"})
    with pytest.raises(ConfigError, match="matcher"):
        config_from_dict(CaptureConfig, {"matcher": "magic"})
    file.write_text("capture: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_config_file(file)
    file.write_text("!!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError):  # safe_load refuses to construct Python objects
        read_config_file(file)


def test_leftover_partial_from_a_killed_first_run_does_not_block(tmp_path: Path) -> None:
    (tmp_path / "ws" / ".capture.partial").mkdir(parents=True)  # a process killed before any stage finished
    ws = Workspace(tmp_path / "ws")
    _write_stage(ws, "ok")
    assert ws.stages() == ["capture"] and ws.partial_stages() == []
