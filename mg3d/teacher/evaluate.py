"""Held-out evaluation of the teacher: PSNR and SSIM ([N, C, H, W]) and side-by-side pictures."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mg3d.imageio import shrink
from mg3d.metrics import psnr, ssim
from mg3d.scene import Scene
from mg3d.teacher.model import Teacher


def depth_picture(depth: np.ndarray, opacity: np.ndarray) -> np.ndarray:
    """Depth [H, W] as a uint8 RGB picture (near bright, far dark; empty pixels black)."""
    valid = opacity > 0.5
    if not valid.any():
        return np.zeros((*depth.shape, 3), np.uint8)
    lo, hi = np.percentile(depth[valid], [2, 98])
    inv = 1.0 - np.clip((depth - lo) / max(hi - lo, 1e-6), 0, 1)
    gray = (inv * valid * 255).astype(np.uint8)
    return np.stack([gray, gray, gray], -1)


def ground_truth(scene: Scene, i: int, downscale: int) -> np.ndarray:
    """Image i as float RGB [H, W, 3] in [0, 1], RGBA composited on white, shrunk like the training images."""
    return shrink(scene.rgb(i), downscale).astype(np.float32) / 255.0


def evaluate(model: Teacher, scene: Scene, indices: np.ndarray, config: Any, out_dir: Path) -> dict[str, Any]:
    """Render held-out views; mean PSNR/SSIM, render speed, and ``save_views`` PNGs (truth | render | depth)."""
    from mg3d.ui import progress

    device = model.t_seq.device
    out_dir.mkdir(parents=True, exist_ok=True)
    indices = indices[: config.eval_views] if config.eval_views else indices
    psnrs, ssims, render_s = [], [], 0.0
    with progress() as bar:
        task = bar.add_task("evaluating teacher", total=len(indices))
        for k, i in enumerate(indices):
            gt = ground_truth(scene, int(i), config.downscale)
            h, w = gt.shape[:2]
            sx, sy = w / scene.width[i], h / scene.height[i]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            out = model.render(scene.c2w[i][None], scene.fx[i] * sx, scene.fy[i] * sy, scene.cx[i] * sx, scene.cy[i] * sy, w, h, chunk=config.chunk)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            render_s += time.perf_counter() - t
            pred = out["rgb"][0].permute(2, 0, 1)[None].float()  # [1, 3, H, W]
            target = torch.from_numpy(gt).to(device).permute(2, 0, 1)[None]
            psnrs.append(float(psnr(pred, target)[0]))
            ssims.append(float(ssim(pred, target)[0]))
            if k < config.save_views:
                render = (pred[0].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
                depth = depth_picture(out["depth"][0].cpu().numpy(), out["opacity"][0].cpu().numpy())
                Image.fromarray(np.concatenate([(gt * 255).round().astype(np.uint8), render, depth], 1)).save(out_dir / f"test_{k:03d}.png")
            bar.advance(task)
    return {
        "psnr": round(float(np.mean(psnrs)), 3),
        "ssim": round(float(np.mean(ssims)), 4),
        "eval_views": len(indices),
        "eval_resolution": [int(w), int(h)],
        "eval_render_fps": round(len(indices) / max(render_s, 1e-9), 2),
    }
