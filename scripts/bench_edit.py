"""Benchmark the edit stage: time and peak GPU memory per mode, and (with builtin:color) how well the
edit reached held-out views that were never edited.

    # woman-512 at 512 px, the full-size InstructPix2Pix architecture with random weights (same compute)
    python scripts/bench_edit.py ws-woman --teacher-time 150 --edit-model builtin:random-full --modes rounds,idu --out results/
    # lego-400, the deterministic editor: held-out renders vs the colour transform of the original renders
    python scripts/bench_edit.py ../shared/data/lego-400 --teacher-time 150 --edit-model builtin:color --out results/

SOURCE is an mg3d workspace (its teacher is trained first when it has none) or a dataset (imported).
Writes ``<out>/edit_<name>_<mode>.json`` and the before | after pictures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/mg3d-edit-ws"), help="workspace copy to run in")
    parser.add_argument("--teacher-time", type=float, default=150.0)
    parser.add_argument("--edit-model", default="builtin:random-full")
    parser.add_argument("--prompt", default="Turn her into a Van Gogh painting")
    parser.add_argument("--modes", default="rounds", help="comma-separated: rounds, idu")
    parser.add_argument("--set", action="append", default=[], help="edit option KEY=VALUE (YAML value), for every mode")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    opts = parser.parse_args()
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as mg3d edit sets it

    import torch

    from mg3d.config import resolve_config
    from mg3d.edit import EditConfig
    from mg3d.edit import run as edit
    from mg3d.teacher import TeacherConfig
    from mg3d.teacher import run as teach
    from mg3d.workspace import Workspace

    opts.out.mkdir(parents=True, exist_ok=True)
    ws = Workspace(opts.work)
    if not (opts.work / "teacher" / "manifest.json").is_file():
        shutil.rmtree(opts.work, ignore_errors=True)
        if (opts.source / "workspace.json").is_file():
            shutil.copytree(opts.source, opts.work)
        else:
            from mg3d.capture import CaptureConfig
            from mg3d.capture import run as capture

            capture(opts.source, resolve_config(CaptureConfig, "capture", "default", None, {}), ws)
        teacher_config = resolve_config(TeacherConfig, "teacher", "default", None, {"max_time_s": opts.teacher_time, "steps": 100000, "save_views": 2})
        t = time.perf_counter()
        teach(ws, teacher_config)
        print(f"teacher: {time.perf_counter() - t:.1f} s, PSNR {ws.manifest('teacher')['metrics'].get('psnr')}", flush=True)
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in opts.set)}
    for mode in opts.modes.split(","):
        values = {"prompt": opts.prompt, "edit_model": opts.edit_model, "mode": mode, "name": mode, **overrides}
        config = resolve_config(EditConfig, "edit", "default", None, values)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        print(f"edit {mode}: starting at {time.strftime('%H:%M:%S')}", flush=True)
        t = time.perf_counter()
        result = edit(ws, config, force=True)
        wall = time.perf_counter() - t
        m = result.manifest["metrics"]
        row = {
            "what": f"edit {opts.source.name} ({mode})", "editor": opts.edit_model, "mode": mode, "wall_s_incl_editor_load": round(wall, 2),
            "peak_gpu_gb_process": round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None,
            "peak_gpu_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 3) if torch.cuda.is_available() else None,
            "metrics": m, "config": result.manifest["config"], "teacher": ws.manifest("teacher")["metrics"],
            "machine": f"{platform.node()} {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, torch {torch.__version__}",
            "date": time.strftime("%Y-%m-%d"),
        }
        (opts.out / f"edit_{opts.source.name}_{mode}.json").write_text(json.dumps(row, indent=2) + "\n")
        shutil.copytree(opts.work / "edit" / mode / "renders", opts.out / f"renders_{opts.source.name}_{mode}", dirs_exist_ok=True)
        print(json.dumps({k: row[k] for k in ("what", "wall_s_incl_editor_load", "peak_gpu_gb_process", "peak_gpu_reserved_gb")}),
              {k: m.get(k) for k in ("edits", "edit_s", "render_for_edit_s", "train_time_s", "wall_s", "peak_gpu_gb",
                                     "train_view_psnr_vs_edits", "held_out_psnr_vs_transform", "held_out_psnr_unedited_vs_transform")}, flush=True)


if __name__ == "__main__":
    main()
