"""``mg3d build``: the whole pipeline on the demo scene (tiny preset, deterministic editor), interrupted in
the student stage and resumed without redoing capture and teacher; every artifact and the report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mg3d.cli import main
from tests.conftest import interrupt_at, one_line_error, read_manifest

pytest.importorskip("onnxruntime")


def test_build_resumes_after_ctrl_c_and_writes_every_artifact(tiny_demo_teacher: tuple[Path, str], tmp_path: Path) -> None:
    # the demo workspace with capture and teacher done, as a first build would have left them
    ws = Path(shutil.copytree(tiny_demo_teacher[0], tmp_path / "ws"))
    finished = {s: read_manifest(ws, s)["finished"] for s in ("capture", "teacher")}
    args = ["build", "--demo", "--prompt", "recolour the scene", "--edit-model", "builtin:color", "--out", str(ws),
            "--targets", "onnx,android,ios,web", "--set", "edit.rounds=1", "--set", "bench.runs=3"]
    with pytest.MonkeyPatch.context() as patch:
        interrupt_at(patch, "mg3d.student.train", 200)  # Ctrl-C in the student stage
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 130
    assert "run the same command again to resume" in result.output
    assert (ws / ".student.partial" / "checkpoint.json").is_file() and not (ws / "student").exists()

    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    build = json.loads((ws / "build.json").read_text())
    stages = build["stages"]
    assert [s for s, d in stages.items() if d["skipped"]] == ["capture", "teacher", "edit", "distill"]
    for stage in ("student", "export", "bench"):  # a stage's own record of its time covers its work
        assert read_manifest(ws, stage)["metrics"]["duration_s"] >= 0.5 * stages[stage]["seconds"], stage
    assert {s: read_manifest(ws, s)["finished"] for s in ("capture", "teacher")} == finished  # not redone
    student = read_manifest(ws, "student")["metrics"]
    assert student["resumed_from_step"] == 200 and student["psnr_vs_teacher"] > 0
    assert student["surface"] is False and student["surface_why"] == "surface is off"  # the tiny preset's MobileR2L form
    assert read_manifest(ws, "distill")["metrics"]["source"] == "edit/recolour-the-scene"
    # every artifact
    for target, files in {"onnx": ["model.onnx", "model.fp16.onnx", "model.int8.onnx"], "android": ["model.ort"],
                          "ios": ["model.mlpackage"], "web": ["model.onnx", "model.fp16.onnx"]}.items():
        for name in files:
            assert (ws / "export" / target / name).exists(), (target, name)
    assert (ws / "bench" / "host.json").is_file() and (ws / "bench" / "report.html").is_file()
    assert (ws / "edit" / "recolour-the-scene" / "teacher.safetensors").is_file()
    # the report: command, prompt, stages, original | edited, turntable, exports and devices
    page = (ws / "report.html").read_text()
    for needle in ("recolour the scene", "builtin:color", "Stages", "Edit:", "turntable.gif", "Exports", "model.int8.onnx", "Devices", "host", "Versions", "torch", "no surface texture"):
        assert needle in page, needle
    # stages the rerun found up to date still show the time they took when they ran
    assert page.count("up to date") == 4 and "stage times add up to" in page
    assert f'<td class="num">{read_manifest(ws, "teacher")["metrics"]["duration_s"]:.4g}</td><td>up to date</td>' in page
    assert (ws / "report" / "turntable.gif").is_file()
    for src in __import__("re").findall(r'src="([^"]+)"', page):
        assert (ws / src).is_file(), src  # every picture the page shows is there
    # the report can be written again on its own
    (ws / "report.html").unlink()
    assert CliRunner().invoke(main, ["report", str(ws)]).exit_code == 0 and (ws / "report.html").is_file()


def test_build_refuses_bad_input_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = tmp_path / "ws"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # no editor weights: said before training, with the way to run the rest
    line = one_line_error(CliRunner().invoke(main, ["build", "--demo", "--prompt", "make it snowy", "--out", str(ws)]), "--no-edit", "timbrooks/instruct-pix2pix")
    assert "edit model" in line or "InstructPix2Pix" in line
    one_line_error(CliRunner().invoke(main, ["build", "--demo", "--prompt", " ", "--out", str(ws)]), "prompt is empty")
    one_line_error(CliRunner().invoke(main, ["build", "--demo", "--no-edit", "--targets", "onnx,tv", "--out", str(ws)]), "unknown target", "tv")
    one_line_error(CliRunner().invoke(main, ["build", "--demo", "--no-edit", "--set", "teacher.steps", "--out", str(ws)]), "STAGE.OPTION=VALUE")
    one_line_error(CliRunner().invoke(main, ["build", "--demo", "--no-edit", "--device", "toaster", "--out", str(ws)]), "toaster")
    one_line_error(CliRunner().invoke(main, ["build", str(tmp_path / "missing.mp4"), "--no-edit", "--out", str(ws)]), "does not exist")
    one_line_error(CliRunner().invoke(main, ["build", "--demo", "--no-edit", "--set", "teacher.steps=-1", "--out", str(ws)]), "steps must be positive")
    assert not ws.exists()  # nothing was written
