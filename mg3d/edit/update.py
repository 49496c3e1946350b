"""The dataset update: the teacher trains on its training images while they are replaced by edits of
its own renders (rounds of all views, or IN2N's one view every k steps). Edited images are saved as
they are made, so an interrupted edit resumes with them."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from mg3d.edit.editors import noise_range
from mg3d.imageio import read_image, write_image
from mg3d.workspace import Workspace


def edit_field(workspace: Workspace, editor: Any, config: Any, run_: Any, key: str) -> dict[str, Any]:
    from mg3d.formats.nerfstudio import load_nerfstudio
    from mg3d.teacher import _device
    from mg3d.teacher.model import Teacher
    from mg3d.teacher.train import load_views, train
    from mg3d.ui import progress

    device = _device(config.device)
    run_.device = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out: Path = run_.path
    teacher_manifest = workspace.manifest("teacher") or {}
    teacher_config = dict(teacher_manifest.get("config", {}))
    downscale = config.downscale or int(teacher_config.get("downscale", 1))
    scene = load_nerfstudio(workspace.stage_dir("capture") / "transforms.json")
    train_idx = scene.splits["train"]
    held_out = next((scene.splits[s] for s in ("test", "val") if len(scene.splits.get(s, [])) > 0), np.array([], int))
    torch.manual_seed(config.seed)
    views = load_views(scene, train_idx, downscale, device)
    if views.has_alpha:  # edits are RGB pictures: train on the white-composited images (the teacher's background)
        rgba = views.images.float() / 255.0
        views.images = ((rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])) * 255).round().to(torch.uint8)
        views.has_alpha = False
    originals = views.images.clone()
    model = Teacher.load(workspace.stage_dir("teacher"), device=device)
    occupied_before = float(model.grid.mask.float().mean())
    allowed = model.grid.limit_to_dilated(config.grow_cells) if config.grow_cells >= 0 else 1.0
    if device.type == "cuda" and teacher_config.get("compile", "auto") != "off":
        model.compile_kernels()
    state = _State(out, key, config.prompt, len(train_idx))
    for j in state.edited():  # a resumed edit starts from the images it had edited
        pixels = torch.from_numpy(np.array(read_image(out / "images" / _name(j))[..., :3]))
        views.images[j, : pixels.shape[0], : pixels.shape[1]] = pixels.to(device)
    eval_idx = held_out[: config.eval_views] if config.eval_views else held_out
    before = _render_views(model, scene, eval_idx, downscale, config.chunk)
    generator = torch.Generator().manual_seed(config.seed + state.edits)
    order = np.random.default_rng(config.seed).permutation(len(train_idx))
    t0 = time.perf_counter()
    timing = {"edit_s": 0.0, "render_s": 0.0}

    def edit_views(indices: list[int], noise: tuple[float, float], bar: Any, task: Any) -> None:
        for s in range(0, len(indices), config.edit_batch if config.mode == "rounds" else 1):
            batch = indices[s : s + config.edit_batch]
            t = time.perf_counter()
            renders = _render_train(model, views, batch, config.chunk)
            timing["render_s"] += time.perf_counter() - t
            t = time.perf_counter()
            edited = editor.edit(renders, originals[batch].float() / 255.0, config.prompt, noise=noise, generator=generator)
            timing["edit_s"] += time.perf_counter() - t
            for j, image in zip(batch, edited):
                pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8)
                views.images[j, : pixels.shape[0], : pixels.shape[1]] = pixels.to(device)
                state.save_image(j, pixels.cpu().numpy())
            state.commit(len(batch))
            if bar is not None:
                bar.advance(task, len(batch))

    cfg = SimpleNamespace(**{**teacher_config, "downscale": downscale, "steps": config.steps, "max_time_s": config.max_time_s, "lr": config.lr,
                             "checkpoint_every": config.checkpoint_every, "random_background": False, "distortion": config.distortion,
                             "mixed_precision": teacher_config.get("mixed_precision", True)})
    bar = progress()
    with bar:
        every = max(1, config.steps // config.rounds)
        if config.mode == "rounds":
            task = bar.add_task(f"editing views ({config.rounds} rounds)", total=config.rounds * len(train_idx), completed=state.edits)
            if state.rounds_done == 0:
                edit_views(list(range(len(train_idx))), noise_range(config.noise_min, config.noise_max, 0, config.rounds), bar, task)
                state.finish_round()

            def hook(step: int) -> None:
                r = step // every
                if step % every == 0 and r < config.rounds and r >= state.rounds_done:
                    edit_views(list(range(len(train_idx))), noise_range(config.noise_min, config.noise_max, r, config.rounds), bar, task)
                    state.finish_round()
        else:
            task = bar.add_task("editing views (one every %d steps)" % config.edit_every, total=config.steps // config.edit_every, completed=state.edits)

            def hook(step: int) -> None:
                if step % config.edit_every == 0 and step // config.edit_every > state.edits:
                    edit_views([int(order[state.edits % len(order)])], (config.noise_min, config.noise_max), bar, task)

        metrics = train(model, views, cfg, out, key, bar, hook=hook, label="training the edited field")
    model.save(out)
    for name in ("checkpoint.safetensors", "checkpoint.json"):
        (out / name).unlink(missing_ok=True)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    after = _render_views(model, scene, eval_idx, downscale, config.chunk)
    agreement = _agreement(model, views, config.chunk)
    _write_outputs(out, scene, train_idx, downscale, views, before, after, config, editor)
    metrics.update({
        "editor": editor.name, "mode": config.mode, "edits": state.edits, "edit_s": round(timing["edit_s"], 2),
        "render_for_edit_s": round(timing["render_s"], 2), "wall_s": round(time.perf_counter() - t0, 2),
        "train_views": len(train_idx), "resolution": [int(views.size[0, 0]), int(views.size[0, 1])],
        "train_view_psnr_vs_edits": round(agreement, 3), "held_out_views": len(eval_idx),
        "grid_occupied_teacher": round(occupied_before, 4), "grid_allowed": round(allowed, 4),
        "grid_occupied_edited": round(float(model.grid.mask.float().mean()), 4),
    })
    if peak is not None:
        metrics["peak_gpu_gb"] = round(peak, 3)
    transform = getattr(editor, "transform", None)
    if transform is not None and len(eval_idx):  # a known edit: how well did it reach views never edited?
        from mg3d.metrics import mean_psnr

        expected = transform(torch.from_numpy(before)).numpy()
        metrics["held_out_psnr_vs_transform"] = round(mean_psnr(after.transpose(0, 3, 1, 2), expected.transpose(0, 3, 1, 2)), 3)
        metrics["held_out_psnr_unedited_vs_transform"] = round(mean_psnr(before.transpose(0, 3, 1, 2), expected.transpose(0, 3, 1, 2)), 3)
    (out / "progress.json").unlink(missing_ok=True)
    return metrics


class _State:
    """What an edit in progress has done, in ``progress.json`` (rewritten atomically after every batch)."""

    def __init__(self, folder: Path, key: str, prompt: str, count: int) -> None:
        self.path, self.key, self.prompt = folder / "progress.json", key, prompt
        (folder / "images").mkdir(exist_ok=True)
        saved = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.done: list[int] = sorted(set(saved.get("edited", [])))
        self.edits, self.rounds_done = int(saved.get("edits", 0)), int(saved.get("rounds_done", 0))
        self._pending: list[int] = []
        self.commit(0)

    def edited(self) -> list[int]:
        return list(self.done)

    def save_image(self, j: int, pixels: np.ndarray) -> None:
        path = self.path.parent / "images" / _name(j)
        tmp = path.with_suffix(".tmp.png")
        write_image(tmp, pixels)
        os.replace(tmp, path)
        self._pending.append(j)

    def commit(self, edits: int) -> None:
        self.done = sorted(set(self.done) | set(self._pending))
        self._pending, self.edits = [], self.edits + edits
        self._write()

    def finish_round(self) -> None:
        self.rounds_done += 1
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": self.key, "prompt": self.prompt, "edits": self.edits, "rounds_done": self.rounds_done, "edited": self.done}))
        os.replace(tmp, self.path)


def _name(j: int) -> str:
    return f"frame_{j:05d}.png"


def _render_train(model: Any, views: Any, batch: list[int], chunk: int) -> torch.Tensor:
    """Renders of training views ``batch`` at their image size: [B, H, W, 3] (views share one size)."""
    w, h = (int(v) for v in views.size[batch[0]])
    fx, fy, cx, cy = views.intrinsics[batch].unbind(-1)
    return model.render(views.c2w[batch], fx, fy, cx, cy, w, h, chunk=chunk)["rgb"]


def _render_views(model: Any, scene: Any, indices: np.ndarray, downscale: int, chunk: int) -> np.ndarray:
    """Renders of the scene's cameras ``indices`` at the training scale: float [N, H, W, 3]."""
    frames = []
    for i in indices:
        w, h = int(scene.width[i]) // downscale, int(scene.height[i]) // downscale
        sx, sy = w / scene.width[i], h / scene.height[i]
        out = model.render(scene.c2w[i][None], scene.fx[i] * sx, scene.fy[i] * sy, scene.cx[i] * sx, scene.cy[i] * sy, w, h, chunk=chunk)
        frames.append(out["rgb"][0].float().cpu().numpy())
    return np.stack(frames) if frames else np.zeros((0, 1, 1, 3), np.float32)


def _agreement(model: Any, views: Any, chunk: int, count: int = 8) -> float:
    """PSNR of the edited field's renders against the edited training images (do 3D and 2D agree?)."""
    from mg3d.metrics import mean_psnr

    picks = np.linspace(0, len(views.images) - 1, min(count, len(views.images))).round().astype(int).tolist()
    w, h = (int(v) for v in views.size[picks[0]])
    renders = torch.cat([_render_train(model, views, [j], chunk) for j in picks]).cpu().numpy()
    targets = views.images[picks, :h, :w, :3].float().cpu().numpy() / 255.0
    return mean_psnr(renders.transpose(0, 3, 1, 2), targets.transpose(0, 3, 1, 2))


def _write_outputs(out: Path, scene: Any, train_idx: np.ndarray, downscale: int, views: Any, before: np.ndarray, after: np.ndarray,
                   config: Any, editor: Any) -> None:
    """transforms.json over the edited images, side-by-side renders, and edit.json."""
    frames = []
    for j, i in enumerate(train_idx):
        w, h = int(views.size[j, 0]), int(views.size[j, 1])
        fx, fy, cx, cy = (float(v) for v in views.intrinsics[j])
        if not (out / "images" / _name(j)).is_file():  # a view no round reached yet keeps its (composited) photo
            write_image(out / "images" / _name(j), views.images[j, :h, :w, :3].cpu().numpy())
        frames.append({"file_path": f"images/{_name(j)}", "transform_matrix": scene.c2w[i].tolist(), "w": w, "h": h,
                       "fl_x": fx, "fl_y": fy, "cx": cx, "cy": cy, "source_index": int(i)})
        if scene.near is not None and scene.far is not None:
            frames[-1].update({"mg3d_near": float(scene.near[i]), "mg3d_far": float(scene.far[i])})
    meta = {"camera_model": "OPENCV", "frames": frames, "train_filenames": [f["file_path"] for f in frames]}
    (out / "transforms.json").write_text(json.dumps(meta, indent=1) + "\n")
    (out / "renders").mkdir(exist_ok=True)
    for k in range(min(config.save_views, len(after))):
        pair = np.concatenate([before[k], after[k]], 1)
        write_image(out / "renders" / f"view_{k:03d}.png", (pair * 255).round().astype(np.uint8))
    info = {"schema": 1, "prompt": config.prompt, "editor": editor.name, "mode": config.mode,
            "guidance_scale": config.guidance_scale, "image_guidance_scale": config.image_guidance_scale,
            "downscale": downscale}
    (out / "edit.json").write_text(json.dumps(info, indent=2) + "\n")
