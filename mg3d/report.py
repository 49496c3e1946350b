"""``WS/report.html``: what a build made, for a person to look at.

Input frames, the original and the edited scene side by side at the same held-out views, a turntable
of the student, quality (teacher, student, every export variant), sizes, latency per device and the
sweep's choice, the time each stage took, and the exact command and versions. Pictures are files in
``WS/report/`` and in the stages' folders, linked relatively, so the workspace folder can be moved.

    write_report(Workspace("ws"))      # also: mg3d report ws
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from mg3d.errors import WorkspaceError
from mg3d.workspace import Workspace

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1 { margin-bottom: .2rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .5rem 0; } td, th { border: 1px solid #ddd; padding: .25rem .6rem; text-align: left; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; image-rendering: auto; } .grid { display: flex; flex-wrap: wrap; gap: .4rem; } .grid img { height: 140px; }
.pairs img { width: 100%; max-width: 540px; } code { background: #f4f4f4; padding: .1rem .3rem; } .muted { color: #777; }
"""


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f'<td class="num">{v:.4g}</td>'
        if isinstance(v, int):
            return f'<td class="num">{v}</td>'
        return f"<td>{html.escape('' if v is None else str(v))}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    return f"<table><tr>{head}</tr>" + "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows) + "</table>"


def _img(ws: Workspace, path: Path, alt: str) -> str:
    return f'<img src="{html.escape(str(path.relative_to(ws.root)))}" alt="{html.escape(alt)}" loading="lazy">'


def turntable(ws: Workspace, out: Path, frames: int = 36) -> Path | None:
    """A GIF of the student along the training cameras' orbit (or path)."""
    import torch
    from PIL import Image

    from mg3d.formats.nerfstudio import load_nerfstudio
    from mg3d.student.cameras import camera_kind
    from mg3d.student.model import NeLF

    if ws.manifest("student") is None:
        return None
    scene = load_nerfstudio(ws.stage_dir("capture") / "transforms.json")
    c2w = scene.c2w[scene.splits["train"]].astype(np.float64)
    poses = _orbit_poses(c2w, frames) if camera_kind(c2w) == "orbit" else _path_poses(c2w, frames)
    model = NeLF.load(ws.stage_dir("student")).eval()
    with torch.no_grad():
        images = [model(torch.from_numpy(p.astype(np.float32))[None])[0].permute(1, 2, 0).clamp(0, 1).numpy() for p in poses]
    pictures = [Image.fromarray((im * 255).round().astype(np.uint8)) for im in images]
    pictures[0].save(out, save_all=True, append_images=pictures[1:], duration=80, loop=0)
    return out


def _orbit_poses(c2w: np.ndarray, n: int) -> np.ndarray:
    """``n`` cameras around the focus point at the median training radius and elevation (within the covered arc)."""
    from mg3d.scene import look_at_rotation
    from mg3d.student.cameras import orbit_frame, orbit_position

    f = orbit_frame(c2w)
    if f["arc"]:  # an arc: sweep it there and back
        start, span = f["arc"]
        half = np.linspace(0, 1, n // 2)
        az = start + span * np.concatenate([half, half[::-1]])
    else:
        az = np.linspace(-np.pi, np.pi, n, endpoint=False)
    pos = orbit_position(f, np.full(len(az), np.median(f["radius"])), np.full(len(az), np.median(f["elevation"])), az)
    out = np.tile(np.eye(4), (len(az), 1, 1))
    for i in range(len(az)):
        out[i, :3, :3] = look_at_rotation(f["center"] - pos[i], f["up"])
        out[i, :3, 3] = pos[i]
    return out


def _path_poses(c2w: np.ndarray, n: int) -> np.ndarray:
    """``n`` cameras along the training path (linear positions, nearest rotation), there and back."""
    t = np.concatenate([np.linspace(0, 1, n // 2), np.linspace(1, 0, n // 2)]) * (len(c2w) - 1)
    i = np.minimum(np.floor(t).astype(int), len(c2w) - 2) if len(c2w) > 1 else np.zeros(len(t), int)
    w = (t - i)[:, None]
    out = c2w[np.clip(np.round(t).astype(int), 0, len(c2w) - 1)].copy()
    if len(c2w) > 1:
        out[:, :3, 3] = c2w[i, :3, 3] * (1 - w) + c2w[i + 1, :3, 3] * w
    return out


def write_report(ws: Workspace) -> Path:
    """Write ``WS/report.html`` (and ``WS/report/``); returns the HTML's path."""
    if not ws.stages():
        raise WorkspaceError(f"{ws.root} has no finished stages to report on", hint=f"run mg3d build INPUT --out {ws.root} first")
    folder = ws.root / "report"
    folder.mkdir(exist_ok=True)
    build = json.loads((ws.root / "build.json").read_text()) if (ws.root / "build.json").is_file() else {}
    manifests = {s: ws.manifest(s) or {} for s in ws.stages()}
    parts = [f"<h1>mg3d report</h1><p class=muted>{html.escape(str(ws.root.resolve()))}</p>"]
    if build.get("command"):
        parts.append(f"<p>command: <code>{html.escape(build['command'])}</code></p>")
    if build.get("prompt"):
        parts.append(f"<p>prompt: <b>{html.escape(build['prompt'])}</b></p>")

    # stages and their times
    from mg3d.build import key_figure

    rows = []
    for name, m in manifests.items():
        stage = name.split("/")[0]
        timing = build.get("stages", {}).get(stage) if stage != "edit" or name == f"edit/{ws.active_edit()}" else None
        status = ("up to date" if timing["skipped"] else "done") if timing else ""
        # the last build's time, or the stage's own record of it: a stage found up to date ran earlier
        took = timing["seconds"] if timing and not timing["skipped"] else m.get("metrics", {}).get("duration_s")
        rows.append([name, took, status, key_figure(ws, stage) if timing or stage != "edit" else "", m.get("device", {}).get("kind", "")])
    parts.append("<h2>Stages</h2>" + _table(["stage", "seconds", "last build", "key figure", "device"], rows))
    counted = [r[1] for r in rows if isinstance(r[1], (int, float)) and (r[2] or not r[0].startswith("edit/"))]
    if counted:
        parts.append(f"<p>stage times add up to {sum(counted):.0f} s ({sum(counted) / 60:.1f} min)"
                     + (f"; the last build ran {build['total_s']:.0f} s and finished {html.escape(build.get('finished', ''))}" if build.get("total_s") else "") + "</p>")

    # input frames
    capture = ws.stage_dir("capture")
    if "capture" in manifests:
        images = sorted((capture / "images").glob("*"))[:12] if (capture / "images").is_dir() else []
        parts.append("<h2>Input</h2><div class=grid>" + "".join(_img(ws, p, p.name) for p in images) + "</div>")
        if (capture / "overview.png").is_file():
            parts.append(_img(ws, capture / "overview.png", "cameras and points"))

    # original | edited
    active = ws.active_edit()
    if active:
        edit_dir = ws.stage_dir(f"edit/{active}")
        info = json.loads((edit_dir / "edit.json").read_text()) if (edit_dir / "edit.json").is_file() else {}
        parts.append(f"<h2>Edit: {html.escape(info.get('prompt', active))}</h2><p class=muted>held-out views, original | edited "
                     f"(editor {html.escape(str(info.get('editor')))}, mode {html.escape(str(info.get('mode')))})</p><div class=pairs>"
                     + "".join(_img(ws, p, p.name) for p in sorted((edit_dir / "renders").glob("*.png"))) + "</div>")

    # teacher and student quality
    quality = []
    for stage, keys in (("teacher", ("psnr", "ssim")), ("student", ("psnr", "ssim", "psnr_vs_teacher", "teacher_psnr"))):
        m = manifests.get(stage, {}).get("metrics", {})
        quality += [[stage, k, m[k]] for k in keys if k in m]
    student_metrics = manifests.get("student", {}).get("metrics", {})
    if "surface" in student_metrics:  # which student form --surface chose, and why
        form = "per-pixel surface texture" if student_metrics["surface"] else "MobileR2L's form (no surface texture)"
        quality.append(["student", "form", f"{form}: {student_metrics.get('surface_why', '')}"])
    if quality:
        parts.append("<h2>Quality</h2>" + _table(["model", "metric", "value"], quality))
    student = ws.stage_dir("student")
    if "student" in manifests:
        gif = turntable(ws, folder / "turntable.gif")
        if gif:
            parts.append("<h3>Student turntable</h3>" + _img(ws, gif, "student turntable"))
        renders = sorted((student / "renders").glob("*.png"))[:4] if (student / "renders").is_dir() else []
        if renders:
            parts.append("<h3>Held-out views (truth | teacher | student)</h3><div class=pairs>" + "".join(_img(ws, p, p.name) for p in renders) + "</div>")

    # exports
    export = manifests.get("export", {}).get("metrics", {}).get("targets", {})
    rows = []
    for target in export:
        meta_path = ws.stage_dir("export") / target / "model.json"
        if meta_path.is_file():
            for v in json.loads(meta_path.read_text()).get("variants", []):
                note = (f"{v['resolution'][0]}x{v['resolution'][1]} px; {v['psnr_vs_full_downsampled']} dB vs the full-size model downsampled"
                        if "psnr_vs_full_downsampled" in v else "")
                rows.append([target, v.get("file"), v.get("precision"), v.get("mb"), v.get("psnr"), v.get("psnr_loss_db"), note])
    if rows:
        parts.append("<h2>Exports</h2>" + _table(["target", "file", "precision", "MB", "PSNR (dB)", "loss vs fp32 (dB)", "note"], rows))

    # devices
    bench = ws.stage_dir("bench")
    if "bench" in manifests:
        rows = []
        for path in sorted(bench.glob("*.json")):
            if path.name in ("manifest.json", "report.json"):
                continue
            result = json.loads(path.read_text())
            if path.name.startswith("choice-"):
                rows.append([path.stem[7:], "sweep choice", f"{result.get('depth')}x{result.get('width')} at {result.get('resolution')} px", result.get("fps"), "", result.get("psnr")])
                continue
            for r in result.get("rows", []):
                rows.append([result.get("device"), "estimate" if r.get("estimate") else "measured", r.get("file"), r.get("fps"), r.get("median_ms"), r.get("psnr_vs_torch", r.get("error", ""))])
        parts.append("<h2>Devices</h2>" + _table(["device", "kind", "model", "FPS", "median ms", "PSNR vs torch / note"], rows))
        if (bench / "report.html").is_file():
            parts.append(f'<p><a href="{html.escape(str((bench / "report.html").relative_to(ws.root)))}">latency vs quality plot</a></p>')

    # versions
    versions = next((m.get("versions") for m in reversed(list(manifests.values())) if m.get("versions")), {})
    if versions:
        parts.append("<h2>Versions</h2>" + _table(["package", "version"], [[k, v] for k, v in versions.items()]))
    page = f"<!doctype html><html><head><meta charset=utf-8><title>mg3d report</title><style>{_CSS}</style></head><body>{''.join(parts)}</body></html>\n"
    tmp = ws.root / "report.html.tmp"
    tmp.write_text(page)
    tmp.replace(ws.root / "report.html")
    return ws.root / "report.html"

