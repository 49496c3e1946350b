"""Teacher training: random rays from the training images, Adam, occupancy-grid updates, checkpoints
that a later run resumes from, and clear stops on divergence or out-of-memory."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from mg3d.imageio import shrink
from mg3d.scene import Scene
from mg3d.checkpoint import check_finite, load_checkpoint, save_checkpoint
from mg3d.teacher.model import Teacher, TeacherError, candidate_budget
from mg3d.teacher.rendering import camera_rays, grid_threshold



@dataclass
class Views:
    """Posed images on the training device. Images are padded to the largest size."""

    images: Tensor  # [N, H, W, C] uint8, C = 3 or 4
    size: Tensor  # [N, 2] width, height
    c2w: Tensor  # [N, 4, 4]
    intrinsics: Tensor  # [N, 4] fx, fy, cx, cy
    has_alpha: bool


def load_views(scene: Scene, indices: np.ndarray, downscale: int, device: torch.device) -> Views:
    """Read the chosen images (shrunk by ``downscale``) and their cameras onto ``device``."""
    arrays = [shrink(scene.image(int(i)), downscale) for i in indices]
    channels = max(a.shape[2] for a in arrays)
    hmax, wmax = max(a.shape[0] for a in arrays), max(a.shape[1] for a in arrays)
    images = np.zeros((len(arrays), hmax, wmax, channels), np.uint8)
    for j, a in enumerate(arrays):
        images[j, : a.shape[0], : a.shape[1], : a.shape[2]] = a
        if a.shape[2] < channels:
            images[j, ..., 3] = 255
    size = np.array([[a.shape[1], a.shape[0]] for a in arrays], np.float32)
    scale = size / np.stack([scene.width[indices], scene.height[indices]], 1)
    intr = np.stack([scene.fx[indices] * scale[:, 0], scene.fy[indices] * scale[:, 1], scene.cx[indices] * scale[:, 0], scene.cy[indices] * scale[:, 1]], 1)
    as_t = lambda a: torch.as_tensor(np.ascontiguousarray(a), device=device)  # noqa: E731
    return Views(as_t(images), as_t(size), as_t(scene.c2w[indices].astype(np.float32)), as_t(intr.astype(np.float32)), channels == 4)


def lr_factor(step: int, progress: float, warmup: int = 100) -> float:
    """Linear warm-up over ``warmup`` steps, then x0.33 at 50%, 75% and 90% of training (instant-NGP /
    nerfacc practice). ``progress`` in [0, 1] is the larger of the step and the time budget fractions."""
    if step < warmup:
        return 0.01 + 0.99 * step / warmup
    return 0.33 ** sum(progress >= f for f in (0.5, 0.75, 0.9))


def make_optimizer(model: Teacher, lr: float) -> torch.optim.Optimizer:
    groups = [
        {"params": [model.field.encoding.table], "lr": lr, "weight_decay": 0.0},
        {"params": list(model.field.density_net.parameters()) + list(model.field.color_net.parameters()), "lr": lr, "weight_decay": 1e-6},
    ]
    extra = [p for p in (model.background_logit,) if p is not None]
    if model.field.appearance is not None:
        extra.append(model.field.appearance.weight)
    if extra:
        groups.append({"params": extra, "lr": lr, "weight_decay": 0.0})
    if model.pose_delta is not None:
        groups.append({"params": [model.pose_delta], "lr": lr * 0.01, "weight_decay": 0.0})
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15)


def train(model: Teacher, views: Views, config: Any, folder: Path, key: str, progress: Any, hook: Callable[[int], None] | None = None,
          label: str = "teacher") -> dict[str, Any]:
    """Train ``model`` in place; checkpoints go to ``folder``. Returns training metrics.

    ``hook(step)`` runs after every step; the edit stage replaces ``views.images`` there (IN2N's dataset update).
    """
    device = views.images.device
    optimizer = make_optimizer(model, config.lr)
    meta = load_checkpoint(folder, model, optimizer, key, TeacherError, required=("key", "step", "elapsed_s", "rays"))
    step, elapsed, rays = (meta["step"], meta["elapsed_s"], meta["rays"]) if meta else (0, 0.0, config.rays)
    last_good = step
    threshold = grid_threshold(model.spec.dt_min)
    n = views.images.shape[0]
    task = progress.add_task(label, total=config.steps, completed=step, loss=float("nan"), psnr=float("nan"))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and config.mixed_precision)
    samples_seen, loss_value, t_start = 0.0, float("nan"), time.perf_counter() - elapsed
    image_ids = torch.arange(n, device=device)
    max_rays = max(64, candidate_budget(device) // len(model.t_seq))
    model.train()
    while step < config.steps:
        done = step / config.steps
        if config.max_time_s:
            done = max(done, (time.perf_counter() - t_start) / config.max_time_s)
            if done >= 1.0:
                break
        if step % config.grid_update_every == 0:
            model.grid.update(lambda u: model.field.density_unit(u)[0], threshold, all_cells=step < 256)
        b = torch.randint(n, (rays,), device=device)
        wh = views.size[b]
        u, v = torch.rand(rays, device=device) * wh[:, 0], torch.rand(rays, device=device) * wh[:, 1]
        pixel = views.images[b, v.long(), u.long()].float() / 255.0
        c2w = model.refine(views.c2w[b], image_ids[b])
        origins, dirs = camera_rays(c2w, *views.intrinsics[b].unbind(-1), u, v)
        background = None
        target = pixel[:, :3]
        if views.has_alpha:
            background = torch.rand(rays, 3, device=device) if config.random_background else torch.ones(rays, 3, device=device)
            target = target * pixel[:, 3:] + background * (1 - pixel[:, 3:])
        try:
            with autocast:
                out = model.render_rays(
                    origins, dirs, image_ids[b], background, jitter=torch.rand(rays, device=device),
                    max_samples=4 * config.target_samples if config.target_samples else 0, with_distortion=config.distortion > 0,
                )
            used = out["used"]
            loss = torch.nn.functional.mse_loss(out["rgb"][used], target[used])
            if config.distortion > 0:
                loss = loss + config.distortion * out["distortion"][used].mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(step, done)
            optimizer.step()
        except torch.cuda.OutOfMemoryError:
            raise TeacherError(
                f"the GPU ran out of memory at step {step} ({rays} rays per batch)",
                hint=f"lower --target-samples (now {config.target_samples}) or --log2-size (now {config.log2_size})",
            ) from None
        step += 1
        if hook is not None:
            hook(step)
        samples = int(out["samples"])
        samples_seen += samples
        if config.target_samples and samples > 0:
            rays = int(min(max(rays * config.target_samples / max(samples, 1), 64), max_rays))
        if step % 16 == 0 or step == config.steps or step % config.checkpoint_every == 0:
            loss_value = loss.item()
            check_finite(loss_value, step, last_good, config.lr, TeacherError)
            progress.update(task, completed=step, loss=loss_value, psnr=-10 * math.log10(max(loss_value, 1e-10)))
        if step % config.checkpoint_every == 0 and step < config.steps:
            save_checkpoint(folder, model, optimizer, {"key": key, "step": step, "elapsed_s": time.perf_counter() - t_start, "rays": rays})
            last_good = step
    train_time = time.perf_counter() - t_start
    return {
        "steps": step,
        "train_time_s": round(train_time, 2),
        "final_loss": round(loss_value, 6),
        "final_rays_per_batch": rays,
        "resumed_from_step": meta["step"] if meta else 0,
    }
