"""Held-out evaluation of the student: PSNR/SSIM against the ground truth and against the teacher's renders
of the same cameras, render speed of both, and side-by-side pictures (truth | teacher | student)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mg3d.metrics import psnr, ssim
from mg3d.scene import Scene
from mg3d.student.model import NeLF
from mg3d.workspace import Workspace


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def camera_at(scene: Scene, i: int, width: int, height: int) -> tuple[torch.Tensor, list[float]]:
    """Camera i's c2w [4, 4] and its intrinsics scaled to width x height."""
    sx, sy = width / scene.width[i], height / scene.height[i]
    return torch.from_numpy(scene.c2w[i].astype(np.float32)), [scene.fx[i] * sx, scene.fy[i] * sy, scene.cx[i] * sx, scene.cy[i] * sy]


def truth_at(scene: Scene, i: int, width: int, height: int) -> np.ndarray:
    """Image i as float RGB [H, W, 3] in [0, 1] at width x height (RGBA on white)."""
    rgb = scene.rgb(i)
    if rgb.shape[:2] != (height, width):
        rgb = np.asarray(Image.fromarray(rgb).resize((width, height), Image.LANCZOS))
    return rgb.astype(np.float32) / 255.0


@torch.no_grad()
def evaluate(model: NeLF, workspace: Workspace, scene: Scene, indices: np.ndarray, config: Any, out_dir: Path, with_teacher: bool = True) -> dict[str, Any]:
    """Student and teacher on the held-out views at the student's resolution (the student alone when
    ``with_teacher`` is False: the teacher's renders cost a minute per view on a CPU)."""
    from mg3d.teacher.model import Teacher
    from mg3d.ui import progress

    device = next(model.parameters()).device
    source = json.loads((workspace.stage_dir("distill") / "distill.json").read_text()).get("source", "teacher")
    teacher = Teacher.load(workspace.stage_dir(source), device=device) if with_teacher else None
    if teacher is not None and device.type == "cuda":
        teacher.compile_kernels()
    spec = model.spec
    w, h = spec.width_px, spec.height_px
    indices = indices[: config.eval_views] if config.eval_views else indices
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and config.mixed_precision)
    scores: dict[str, list[float]] = {k: [] for k in ("psnr", "ssim", "teacher_psnr", "teacher_ssim", "psnr_vs_teacher")}
    student_s = teacher_s = 0.0
    with progress() as bar:
        task = bar.add_task("evaluating student", total=len(indices))
        for k, i in enumerate(indices):
            c2w, intr = camera_at(scene, int(i), w, h)
            c2w = c2w.to(device)
            t = _sync(device)
            with autocast:
                pred = model(c2w[None], torch.tensor([intr], device=device)).float().clamp(0, 1)  # [1, 3, H, W]
            student_s += _sync(device) - t
            gt = torch.from_numpy(truth_at(scene, int(i), w, h)).to(device).permute(2, 0, 1)[None]
            scores["psnr"].append(float(psnr(pred, gt)[0]))
            scores["ssim"].append(float(ssim(pred, gt)[0]))
            ref = gt
            if teacher is not None:
                t = _sync(device)
                ref = teacher.render(c2w[None], *intr, w, h)["rgb"].permute(0, 3, 1, 2).float()
                teacher_s += _sync(device) - t
                scores["teacher_psnr"].append(float(psnr(ref, gt)[0]))
                scores["teacher_ssim"].append(float(ssim(ref, gt)[0]))
                scores["psnr_vs_teacher"].append(float(psnr(pred, ref)[0]))
            if k < config.save_views:
                row = [(x[0].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8) for x in (gt, ref, pred)]
                Image.fromarray(np.concatenate(row, 1)).save(out_dir / f"test_{k:03d}.png")
            bar.advance(task)
    model.train()
    metrics = {name: round(float(np.mean(v)), 4 if "ssim" in name else 3) for name, v in scores.items() if v}
    metrics.update({"eval_views": len(indices), "eval_student_fps": round(len(indices) / max(student_s, 1e-9), 2)})
    if teacher is not None:
        metrics.update({"psnr_gap_to_teacher": round(metrics["teacher_psnr"] - metrics["psnr"], 3), "eval_teacher_fps": round(len(indices) / max(teacher_s, 1e-9), 2)})
    return metrics
