"""``mg3d build``: every stage in one command, from a video (or photos, or a posed dataset) and a prompt to
phone-ready models and a report.

    capture -> teacher -> edit -> distill -> student -> export (each target) -> bench -> report

Each stage is the same ``run`` the stage's own command calls, so a stage whose manifest matches its
config and inputs is skipped: a rerun after an interruption picks up where it stopped (the teacher,
edit and student resume from their checkpoints), and a new prompt redoes only edit and what follows.
What can fail early fails before any training: an empty prompt, missing editor weights, an unknown
target or device.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mg3d import __version__
from mg3d.errors import ConfigError, Mg3dError
from mg3d.workspace import Workspace, _write_json_atomic

STAGES = ("capture", "teacher", "edit", "distill", "student", "export", "bench", "report")
TARGETS = ("onnx", "android", "ios", "web")


@dataclass
class BuildOptions:
    source: Path
    out: Path
    prompt: str = ""
    edit: bool = True
    preset: str | None = "default"
    targets: tuple[str, ...] = ("onnx", "android", "ios", "web")
    devices: tuple[str, ...] = ()  # besides host: measured when connected, else estimated
    config_file: Path | None = None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> {option: value}
    force: bool = False
    command: str = ""


class BuildError(Mg3dError):
    """A stage of the build failed; the message names the stage."""


def _config(cls: Any, section: str, opts: BuildOptions, extra: dict[str, Any] | None = None) -> Any:
    from mg3d.config import resolve_config

    return resolve_config(cls, section, opts.preset, opts.config_file, {**(extra or {}), **opts.overrides.get(section, {})})


def check(opts: BuildOptions) -> None:
    """Everything that can be known wrong before any work starts."""
    from mg3d.bench.profiles import resolve

    unknown = [t for t in opts.targets if t not in TARGETS]
    if unknown:
        raise ConfigError(f"unknown target(s) {', '.join(unknown)}", hint=f"use some of {', '.join(TARGETS)}")
    for device in opts.devices:
        resolve(device)  # an unknown device name fails with the list of known ones
    unknown_sections = set(opts.overrides) - set(STAGES)
    if unknown_sections:
        raise ConfigError(f"--set names unknown stage(s) {', '.join(sorted(unknown_sections))}", hint=f"use STAGE.OPTION=VALUE with a stage among {', '.join(STAGES[:-1])}")
    from mg3d.bench import BenchConfig
    from mg3d.capture import CaptureConfig
    from mg3d.export import ExportConfig
    from mg3d.student import StudentConfig
    from mg3d.student.distill import DistillConfig
    from mg3d.teacher import TeacherConfig

    # a bad option value fails now, not after an hour of training
    configs = {section: _config(cls, section, opts) for cls, section in (
        (CaptureConfig, "capture"), (TeacherConfig, "teacher"), (DistillConfig, "distill"), (StudentConfig, "student"), (BenchConfig, "bench"))}
    for target in opts.targets:
        _config(ExportConfig, "export", opts, {"target": target})
    if not opts.source.exists():
        raise ConfigError(f"{opts.source} does not exist", hint="give a video file, a folder of photos or a posed dataset, or --demo")
    if opts.edit:
        from mg3d.edit import EditConfig, check_prompt
        from mg3d.edit.editors import BUILTIN_COLOR, BUILTIN_RANDOM, EditError, check_weights

        check_prompt(opts.prompt)
        config = _config(EditConfig, "edit", opts, {"prompt": opts.prompt})
        if config.edit_model not in (BUILTIN_COLOR, *BUILTIN_RANDOM):
            try:
                check_weights(config.edit_model)
            except EditError as exc:
                raise EditError(exc.message, hint=exc.hint.replace("--no-edit skips the edit", "or run the rest with --no-edit")) from None


def build(opts: BuildOptions) -> dict[str, Any]:
    """Run every stage into ``opts.out``; returns {stage: {"seconds", "skipped", "figure"}}."""
    from rich.rule import Rule

    from mg3d.ui import console

    check(opts)
    ws = Workspace(opts.out)
    stages = [s for s in STAGES if (s != "edit" or opts.edit) and s != "report"]
    done: dict[str, Any] = {}
    t_start = time.perf_counter()
    for n, stage in enumerate(stages, 1):
        console.print(Rule(f"[bold]{n}/{len(stages)} {stage}[/]", style="cyan"))
        t = time.perf_counter()
        try:
            skipped = _STEPS[stage](ws, opts)
        except Mg3dError as exc:
            raise type(exc)(f"{stage} stage: {exc.message}", hint=exc.hint) from None
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise BuildError(f"{stage} stage: the disk is full", hint=f"free space and run the same command again; the stages before {stage} are kept") from None
            raise
        done[stage] = {"seconds": round(time.perf_counter() - t, 2), "skipped": bool(skipped), "figure": key_figure(ws, stage)}
        _summary(done, stages, time.perf_counter() - t_start)
    record = {"schema": 1, "command": opts.command, "mg3d": __version__, "python": sys.version.split()[0], "stages": done,
              "total_s": round(time.perf_counter() - t_start, 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "prompt": opts.prompt if opts.edit else None, "preset": opts.preset, "targets": list(opts.targets), "devices": list(opts.devices)}
    history = json.loads((opts.out / "build.json").read_text()).get("runs", []) if (opts.out / "build.json").is_file() else []
    _write_json_atomic(opts.out / "build.json", {**record, "runs": [*history[-9:], {k: record[k] for k in ("finished", "total_s", "command")}]})
    from mg3d.report import write_report

    console.print(Rule("[bold]report[/]", style="cyan"))
    path = write_report(ws)
    console.print(f"[green]done[/] in {time.perf_counter() - t_start:.0f} s; report: {path}")
    return done


def _summary(done: dict[str, Any], stages: list[str], elapsed: float) -> None:
    from rich.table import Table

    from mg3d.ui import console

    table = Table(title=f"mg3d build: {len(done)}/{len(stages)} stages, {elapsed:.0f} s", header_style="bold", title_justify="left")
    for col in ("stage", "status", "time", "key figure"):
        table.add_column(col)
    for stage in stages:
        d = done.get(stage)
        if d is None:
            table.add_row(stage, "[dim]waiting[/]", "", "")
        else:
            table.add_row(stage, "[dim]up to date[/]" if d["skipped"] else "[green]done[/]", f"{d['seconds']:.1f} s", d["figure"])
    console.print(table)


def key_figure(ws: Workspace, stage: str) -> str:
    """One line per stage for the progress table and the report."""
    if stage == "edit":
        name = ws.active_edit()
        m = (ws.manifest(f"edit/{name}") or {}).get("metrics", {}) if name else {}
        return f"{name}: {m.get('edits')} edits, renders vs edits {m.get('train_view_psnr_vs_edits')} dB" if m else ""
    if stage == "report":
        return "report.html"
    m = (ws.manifest(stage) or {}).get("metrics", {})
    if stage == "capture":
        return f"{m.get('frames_registered', m.get('train_images', '?'))} frames registered" + (f", {m['mean_reprojection_error_px']:.2f} px" if "mean_reprojection_error_px" in m else "")
    if stage in ("teacher",):
        return f"PSNR {m.get('psnr')} dB" if "psnr" in m else f"{m.get('steps')} steps"
    if stage == "distill":
        return f"{m.get('views')} pseudo views of {m.get('source', 'teacher')}"
    if stage == "student":
        return f"PSNR {m.get('psnr')} dB ({m.get('psnr_vs_teacher', '?')} vs teacher), {m.get('size_mb_fp16')} MB fp16"
    if stage == "export":
        targets = m.get("targets", {})
        return ", ".join(f"{t}: {len(v.get('variants', []))} models" for t, v in targets.items())
    if stage == "bench":
        devices = m.get("devices", {})
        return ", ".join(f"{d}: {v.get('best_fps')} FPS{' (est.)' if v.get('estimate') else ''}" for d, v in devices.items())
    return ""


# ---- the steps: each returns True when the stage was already up to date ------------------------------
def _capture(ws: Workspace, opts: BuildOptions) -> bool:
    from mg3d.capture import CaptureConfig, run

    return run(opts.source, _config(CaptureConfig, "capture", opts), ws, force=opts.force).skipped


def _teacher(ws: Workspace, opts: BuildOptions) -> bool:
    from mg3d.teacher import TeacherConfig, run

    return run(ws, _config(TeacherConfig, "teacher", opts), force=opts.force).skipped


def _edit(ws: Workspace, opts: BuildOptions) -> bool:
    from mg3d.edit import EditConfig, run

    return run(ws, _config(EditConfig, "edit", opts, {"prompt": opts.prompt}), force=opts.force).skipped


def _distill(ws: Workspace, opts: BuildOptions) -> bool:
    from mg3d.student.distill import DistillConfig, run

    # with --no-edit the teacher itself, whatever edit a workspace may hold
    return run(ws, _config(DistillConfig, "distill", opts, {"source": "auto" if opts.edit else "teacher"}), force=opts.force).skipped


def _student(ws: Workspace, opts: BuildOptions) -> bool:
    from mg3d.student import StudentConfig, run

    return run(ws, _config(StudentConfig, "student", opts), force=opts.force).skipped


def _export(ws: Workspace, opts: BuildOptions) -> bool:
    from mg3d.export import ExportConfig, run

    skipped = True
    for target in opts.targets:
        skipped &= run(ws, _config(ExportConfig, "export", opts, {"target": target}), force=opts.force).skipped
    return skipped


def _bench(ws: Workspace, opts: BuildOptions) -> bool:
    from mg3d.bench import BenchConfig, run
    from mg3d.bench.profiles import reachable, resolve

    if "onnx" in opts.targets:  # this machine runs the onnx export: every precision
        run(ws, _config(BenchConfig, "bench", opts, {"device": "host", "precision": "all"}))
    for name in opts.devices:  # connected devices are measured; the others get labelled estimates
        ok, _ = reachable(resolve(name))
        run(ws, _config(BenchConfig, "bench", opts, {"device": name, "estimate": not ok}))
    return False


_STEPS: dict[str, Callable[[Workspace, BuildOptions], bool]] = {
    "capture": _capture, "teacher": _teacher, "edit": _edit, "distill": _distill, "student": _student,
    "export": _export, "bench": _bench,
}


def parse_sets(values: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``("teacher.steps=300", "edit.rounds=1")`` -> {"teacher": {"steps": 300}, "edit": {"rounds": 1}} (YAML values)."""
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for item in values:
        key, sep, value = item.partition("=")
        stage, dot, option = key.partition(".")
        if not sep or not dot or not option:
            raise ConfigError(f"--set {item!r} is not STAGE.OPTION=VALUE", hint="e.g. --set teacher.steps=5000")
        out.setdefault(stage, {})[option.replace("-", "_")] = yaml.safe_load(value)
    return out


def command_line() -> str:
    """The command as typed (for the report), with the program name shortened to ``mg3d``."""
    args = [os.path.basename(sys.argv[0]) if i == 0 else a for i, a in enumerate(sys.argv)]
    if args and args[0] in ("__main__.py", "-m"):
        args[0] = "mg3d"
    return " ".join(json.dumps(a) if " " in a else a for a in args)
