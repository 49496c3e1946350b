"""Student training: pseudo views (and, at the end, the real training images), AdamW with warm-up + cosine,
bf16 autocast and channels-last on CUDA, checkpoints that a later run resumes from, DDP under torchrun."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mg3d.checkpoint import CHECKPOINT, CHECKPOINT_META, check_finite, load_checkpoint, save_checkpoint
from mg3d.scene import Scene
from mg3d.student.distill import PseudoData
from mg3d.student.model import NeLF, StudentError, StudentSpec, macs_per_frame, parameter_count
from mg3d.workspace import Workspace


def distributed() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) for a plain run."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def setup_device(name: str) -> torch.device:
    """The training device; under torchrun also joins the process group (NCCL on GPUs, gloo on CPU;
    ``MG3D_DIST_BACKEND`` names another, for example gloo for several processes on one GPU)."""
    from mg3d.teacher import _device

    device = _device(name)
    rank, world = distributed()
    if world > 1:
        import torch.distributed as dist

        backend = os.environ.get("MG3D_DIST_BACKEND") or ("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            gpus, local = torch.cuda.device_count(), int(os.environ.get("LOCAL_WORLD_SIZE", world))
            if backend == "nccl" and local > gpus:
                raise StudentError(f"torchrun started {local} processes on this host, which has {gpus} GPU(s): NCCL needs a GPU for each process",
                                   hint=f"run torchrun --nproc_per_node {gpus} (or set MG3D_DIST_BACKEND=gloo to share GPUs, slower)")
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % gpus)  # gloo may share a GPU
            torch.cuda.set_device(device)
        if not dist.is_backend_available(backend):  # a typo, or nccl without CUDA: say so before torch's own traceback
            usable = ", ".join(b for b in ("gloo", "nccl", "mpi", "ucc") if dist.is_backend_available(b))
            source = "MG3D_DIST_BACKEND" if os.environ.get("MG3D_DIST_BACKEND") else f"the default on {device.type}"
            raise StudentError(f"the distributed backend {backend!r} ({source}) is not available in this torch",
                               hint=f"set MG3D_DIST_BACKEND to one of: {usable}, or unset it")
        if not dist.is_initialized():
            dist.init_process_group(backend)
    return device


def is_table(name: str) -> bool:
    """Whether the student's parameter ``name`` is a feature table (planes, lines): trained at the plane rate,
    without weight decay, like a hash table."""
    return name in ("planes", "detail.planes", "detail.lines") or name.startswith("detail.coarse")


def build_spec(meta: dict[str, Any], config: Any) -> StudentSpec:
    """The student's spec from the pseudo data's metadata and the options (the surface texture's as
    :func:`mg3d.student.surface_choice` decides: off, the spec keeps MobileR2L's form)."""
    from mg3d.student import SURFACE_OPTIONS, output_size, surface_choice

    w, h = output_size(config.resolution, meta["width"], meta["height"], config.sr_factor)
    sx, sy = w / meta["width"], h / meta["height"]
    unbounded = bool(meta["unbounded"])
    texture, _ = surface_choice(config, meta)
    head_layers = config.head_layers if config.head_layers >= 0 else (2 if texture else 0)
    form = {name: getattr(config, name) for name in SURFACE_OPTIONS if name != "depth_weight"} if texture else {}
    if form:  # options that only refine another: moot (not an error) when that one is off
        form["march_box"] = config.march_box and config.occupancy > 0
        form["detail_coarse_once"] = config.detail_coarse_once and config.detail_points > 1 and config.detail_scales > 1
    return StudentSpec(
        width_px=w, height_px=h, fx=meta["fx"] * sx, fy=meta["fy"] * sy, cx=meta["cx"] * sx, cy=meta["cy"] * sy,
        near=float(meta["near"]), far=float(meta["far"]), spacing="disparity" if unbounded else "linear",
        radius=1.0 if unbounded else float(meta["bound"]), samples=config.samples, frequencies=config.frequencies,
        planes=config.planes, plane_resolution=config.plane_resolution, head_layers=head_layers, head_width=config.head_width,
        **form,
        depth=config.depth, width=config.width, sr_factor=config.sr_factor, upsample=config.upsample, activation=config.activation, norm=config.norm,
    )


@torch.no_grad()
def bake_occupancy(model: NeLF, field_folder: Path, device: torch.device, alpha: float = 0.3, samples: int = 8) -> float:
    """Fill the student's occupancy grid from the radiance field in ``field_folder`` (the teacher, or an edit
    of it): a cell is occupied where any of ``samples`` random points in it has an opacity over one cell's
    width of at least ``alpha``. Returns the occupied fraction of the grid.

    On lego-400 (a 33 dB teacher, 128 cells) 3% of the cells are occupied and the rays that hit one agree with
    the true silhouettes on 98.3% of the pixels. A foggy field does not suit it: on the tiny demo teacher 8% of
    the rays that hit a cell have its surface inside their window (BENCHMARKS.md)."""
    from mg3d.teacher.model import Teacher

    spec = model.spec
    teacher = Teacher.load(field_folder, device)
    r, size = spec.occupancy, 2.0 * spec.radius / spec.occupancy
    center = torch.tensor(spec.center, dtype=torch.float32, device=device)
    cells = torch.arange(r**3, device=device)
    corner = torch.stack([cells // (r * r), (cells // r) % r, cells % r], -1).float()  # [R^3, 3], x slowest (as the march reads)
    occupied = torch.zeros(r**3, dtype=torch.uint8, device=device)
    generator = torch.Generator(device=device).manual_seed(0)  # every process of a DDP run bakes the same grid
    for start in range(0, r**3, 1 << 18):
        c = corner[start : start + (1 << 18)]
        sigma = torch.zeros(len(c), device=device)
        for _ in range(samples):
            u = (c + torch.rand(c.shape, generator=generator, device=device)) / r * 2 - 1  # [-1, 1]^3
            sigma = torch.maximum(sigma, teacher.field.density_and_features(center + u * spec.radius)[0].float())
        occupied[start : start + len(c)] = (1 - torch.exp(-sigma * size) >= alpha).to(torch.uint8)
    model.detail.set_occupancy(occupied.to(model.detail.occupied.device))
    return float(occupied.float().mean())


def march_dtype(spec: StudentSpec) -> torch.dtype:
    """How :func:`first_hits` stores a march's first occupied step (``march_steps`` for none)."""
    return torch.uint8 if spec.march_steps < 255 else torch.int16


@torch.no_grad()
def first_hits(model: NeLF, c2w: Tensor, intrinsics: Tensor | None, store: torch.device) -> Tensor:
    """The occupancy march of every pixel of cameras c2w [N, 4, 4] (intrinsics [N, 4] or None: the baked
    ones): first occupied steps [N, 1, H, W] in :func:`march_dtype`, kept on ``store``."""
    spec = model.spec
    chunk = max(1, (1 << 26) // (spec.width_px * spec.height_px * spec.march_steps))  # views at once: ~0.8 GB of march positions [views, 3, steps, pixels]
    parts = [model.detail.first_hits(c2w[i : i + chunk], None if intrinsics is None else intrinsics[i : i + chunk]).to(march_dtype(spec)).to(store) for i in range(0, len(c2w), chunk)]
    return torch.cat(parts)


def real_views(scene: Scene, indices: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images [M, H, W, 3] uint8 resized to the student's size, their cameras [M, 4, 4] and intrinsics [M, 4]."""
    from PIL import Image

    images, intr = [], []
    for i in indices:
        rgb = scene.rgb(int(i))
        if rgb.shape[:2] != (height, width):
            rgb = np.asarray(Image.fromarray(rgb).resize((width, height), Image.LANCZOS))
        images.append(rgb)
        sx, sy = width / scene.width[i], height / scene.height[i]
        intr.append([scene.fx[i] * sx, scene.fy[i] * sy, scene.cx[i] * sx, scene.cy[i] * sy])
    return np.stack(images), scene.c2w[indices].astype(np.float32), np.asarray(intr, np.float32)


def lr_factor(step: int, progress: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to 0.01 over the progress in [0, 1]."""
    if step < warmup:
        return 0.01 + 0.99 * step / warmup
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _as_target(images: Tensor, height: int, width: int) -> Tensor:
    """[B, H', W', 3] uint8/float16 -> [B, 3, height, width] float in [0, 1] (resized when sizes differ)."""
    x = images.permute(0, 3, 1, 2).float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    return x


def _as_surface(surface: Tensor, height: int, width: int) -> Tensor:
    """[B, H', W'] float16 surface distances -> [B, 1, height, width] float (nearest: no blend of near and far)."""
    x = surface[:, None].float()
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="nearest")
    return x


def depth_loss(spec: StudentSpec, depth: Tensor, surface: Tensor) -> Tensor:
    """Mean L1 distance, as a fraction of the sample range, between the detail branch's depth [B, 1, H, W] and
    the teacher's surface [B, 1, H, W] over the pixels that have one (surface > 0); 0 when none has."""
    from mg3d.student.model import fraction_at

    valid = surface > 0
    diff = (fraction_at(spec, depth.float()) - fraction_at(spec, surface.clamp(min=1e-3))).abs()
    return torch.where(valid, diff, 0.0).sum() / valid.sum().clamp(min=1)


def train_stage(workspace: Workspace, config: Any, out: Path, key: str, run_: Any, with_teacher: bool = True) -> dict[str, Any]:
    """Train (every process), then save and evaluate (rank 0). ``run_`` is None on other ranks (and for the
    bench sweep's candidates, which are evaluated without the teacher: ``with_teacher`` False)."""
    from mg3d.formats.nerfstudio import load_nerfstudio
    from mg3d.student import surface_choice
    from mg3d.student.evaluate import evaluate
    from mg3d.ui import console

    rank, world = distributed()
    device = setup_device(config.device)
    torch.manual_seed(config.seed)
    data = PseudoData(workspace.stage_dir("distill"))
    spec = build_spec(data.meta, config)
    texture, why = surface_choice(config, data.meta)
    if run_ is not None:
        console.print(f"student: {'surface texture' if texture else 'MobileR2L form, no surface texture'} ({why})")
        name = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"
        run_.device = name + (f" x{world} processes" if world > 1 else "")
    scene = load_nerfstudio(workspace.stage_dir("capture") / "transforms.json")
    source = data.meta.get("source", "teacher")
    # the fine-tune learns from the photos, or from the edited images when the field is an edit
    real_scene = scene if source == "teacher" else load_nerfstudio(workspace.stage_dir(source) / "transforms.json")
    real = real_views(real_scene, real_scene.splits["train"], spec.width_px, spec.height_px) if config.finetune_fraction > 0 else None
    model = NeLF(spec).to(device)
    occupied = bake_occupancy(model, workspace.stage_dir(source), device) if spec.occupancy else None
    try:
        metrics = train(model, data, real, config, out, key, device, rank, world)
    except torch.cuda.OutOfMemoryError:
        raise StudentError(
            f"the student ({spec.depth} blocks x {spec.width}, {spec.width_px}x{spec.height_px}, batch {config.batch}) does not fit in the GPU's memory",
            hint=f"lower --batch (now {config.batch}), --width or --resolution",
        ) from None
    # after a failure the process exits without tearing the group down: under NCCL that can hang while another
    # process still waits in a collective, and torchrun stops the others once this one has exited
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # no process tears gloo down while another still talks to it (that aborted 1 run in 5)
        dist.destroy_process_group()
    if rank != 0:
        return metrics
    model.save(out, extra={"distill": {k: data.meta[k] for k in ("kind", "near", "far", "unbounded", "background")}})
    metrics.update({
        "parameters": parameter_count(model), "size_mb_fp16": round(parameter_count(model) * 2 / 1e6, 2),
        "gmacs_per_frame": round(macs_per_frame(spec) / 1e9, 3), "resolution": [spec.width_px, spec.height_px],
        "depth": spec.depth, "width": spec.width, "world_size": world, "surface": texture, "surface_why": why,
        **({"occupied_fraction": round(occupied, 4)} if occupied is not None else {}),
    })
    # a line before the evaluation (minutes on a CPU, with the teacher's renders): what training reached
    console.print(f"student trained: {metrics['steps']} steps in {metrics['train_time_s']:.0f} s ({metrics['images_per_s']} img/s), "
                  f"train PSNR {metrics['train_psnr']} dB")
    eval_split = next((s for s in ("test", "val") if len(scene.splits.get(s, [])) > 0), None)
    if eval_split is None:
        console.print("[yellow]note:[/] the capture has no held-out views; PSNR/SSIM are not measured")
    else:
        metrics.update(evaluate(model, workspace, scene, scene.splits[eval_split], config, out / "renders", with_teacher))
        if source != "teacher":  # held-out photos show the scene before the edit; the edited teacher is the reference
            metrics["field"] = source
            metrics["psnr_note"] = "psnr/ssim compare with the unedited photos; psnr_vs_teacher with the edited field"
        metrics["eval_split"] = eval_split
    for name in (CHECKPOINT, CHECKPOINT_META):  # only now: a failed evaluation leaves the last checkpoint to resume from
        (out / name).unlink(missing_ok=True)
    return metrics


def train(
    model: NeLF, data: PseudoData, real: tuple[np.ndarray, np.ndarray, np.ndarray] | None, config: Any, folder: Path,
    key: str, device: torch.device, rank: int = 0, world: int = 1,
) -> dict[str, Any]:
    """Train ``model`` in place; rank 0 checkpoints to ``folder``. Returns training metrics."""
    from rich.progress import TextColumn

    from mg3d.ui import progress

    spec = model.spec
    cuda = device.type == "cuda"
    if cuda and config.mixed_precision:
        model.to(memory_format=torch.channels_last)
    planes = [p for name, p in model.named_parameters() if is_table(name)]
    groups = [{"params": [p for name, p in model.named_parameters() if not is_table(name)], "lr": config.lr, "base_lr": config.lr}]
    if planes:  # the feature planes: a higher rate and no weight decay, like a hash table
        groups.append({"params": planes, "lr": config.plane_lr, "base_lr": config.plane_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.99), weight_decay=config.weight_decay, fused=cuda or None)  # fused: a few kernels per step on CUDA
    flag = torch.zeros(1, device=device)  # under DDP: what the processes agree on (:func:`_all_max`)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # rank 0 has removed a stale partial folder (--force) before any process reads it
    meta = load_checkpoint(folder, model, optimizer, key, StudentError, required=("key", "step", "elapsed_s"))
    step, elapsed = (meta["step"], meta["elapsed_s"]) if meta else (0, 0.0)
    if world > 1:  # every process has read the checkpoint before rank 0 may write one, and all read the same one
        latest, earliest = _all_max(flag, step), -_all_max(flag, -step)
        if latest != earliest:  # say, nodes that do not share the workspace folder
            raise StudentError(f"the {world} processes found different checkpoints in {folder} (steps {earliest:.0f} to {latest:.0f})",
                               hint="give every process the same workspace folder, or start over with --force")
    for group, base in zip(optimizer.param_groups, (config.lr, config.plane_lr)):
        group["base_lr"] = base  # a resumed run takes the rates given now (a checkpoint restores its own)
    last_good = step
    net: torch.nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    if config.compile == "on" or (config.compile == "auto" and cuda):
        net = torch.compile(net)  # fuses the GELUs and residual adds; same weights, same maths

    march_nbytes = len(data) * spec.width_px * spec.height_px * march_dtype(spec).itemsize if spec.occupancy else 0  # :func:`first_hits`
    preload = data.nbytes + (data.surface_nbytes if spec.detail else 0) + march_nbytes < config.preload_gb * 1e9  # what goes to the device
    pseudo = torch.from_numpy(data.all_images()).to(device) if preload else None
    surfaces = torch.from_numpy(data.all_surfaces()).to(device) if preload and spec.detail else None
    cameras = torch.from_numpy(data.cameras).to(device)
    if real is not None:
        real_images, real_c2w, real_intr = (torch.from_numpy(a).to(device) for a in real)
    baked = torch.tensor([[spec.fx, spec.fy, spec.cx, spec.cy]], device=device)
    hits = real_hits = None
    if spec.occupancy:  # the cameras are fixed, so is their march: once per view (~30% of each step on lego otherwise)
        hits = first_hits(model, cameras, None, device if preload else torch.device("cpu"))
        if real is not None:
            real_hits = first_hits(model, real_c2w, real_intr, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and config.mixed_precision)
    generator = torch.Generator()
    n = len(data)
    agreed: float | None = None  # under DDP with a time limit: the share of it the slowest process has used

    bar = progress() if rank == 0 else None
    task = None
    if bar is not None:
        bar.columns = (*bar.columns, TextColumn("loss {task.fields[loss]:.5f}  PSNR {task.fields[psnr]:.2f}"))
        bar.start()
        task = bar.add_task("student", total=config.steps, completed=step, loss=float("nan"), psnr=float("nan"))
    t_start = time.perf_counter() - elapsed
    loss_value, images_seen = float("nan"), 0
    net.train()
    try:
        while step < config.steps:
            done = step / config.steps
            if config.max_time_s:
                timed = (time.perf_counter() - t_start) / config.max_time_s
                if world > 1:  # every process must agree on the schedule and on when to stop: the slowest clock,
                    # every 16 steps (a wait for the GPU at each step would cost it its queue of kernels)
                    if step % 16 == 0 or agreed is None:
                        agreed = _all_max(flag, timed)
                    timed = agreed
                done = max(done, timed)
            if config.max_time_s and done >= 1.0:
                break
            generator.manual_seed((config.seed * 1_000_003 + rank) * 1_000_003 + step)  # resumable, distinct per rank
            n_real = int(round(config.batch * config.finetune_real)) if real is not None and done >= 1 - config.finetune_fraction else 0
            idx = torch.randint(n, (config.batch - n_real,), generator=generator)
            on = _to_device(idx, device)
            images = pseudo[on] if pseudo is not None else torch.from_numpy(data.images(idx.numpy())).to(device)
            c2w = cameras[on]
            target = _as_target(images, spec.height_px, spec.width_px)
            intr = None
            first = (hits[idx].to(device) if hits.device.type == "cpu" else hits[on]) if hits is not None else None
            if spec.detail:
                surface = surfaces[on] if surfaces is not None else torch.from_numpy(data.surface(idx.numpy())).to(device)
                surface = _as_surface(surface, spec.height_px, spec.width_px)
            if n_real:
                ridx = _to_device(torch.randint(len(real_images), (n_real,), generator=generator), device)
                target = torch.cat([target, _as_target(real_images[ridx], spec.height_px, spec.width_px)])
                c2w = torch.cat([c2w, real_c2w[ridx]])
                intr = torch.cat([baked.expand(config.batch - n_real, 4), real_intr[ridx]])
                if first is not None:
                    first = torch.cat([first, real_hits[ridx]])
                if spec.detail:  # the photos have no depth: their pixels do not count in the depth loss
                    surface = torch.cat([surface, surface.new_zeros((n_real, *surface.shape[1:]))])
            if cuda and config.mixed_precision:
                target = target.contiguous(memory_format=torch.channels_last)
            with autocast:
                pred, depth = net(c2w, intr, with_depth=True, first=first) if spec.detail else (net(c2w, intr), None)
            loss = F.mse_loss(pred.float(), target)
            if depth is not None and config.depth_weight > 0:
                loss = loss + config.depth_weight * depth_loss(spec, depth, surface)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(step, done, config.warmup)
            optimizer.step()
            step += 1
            images_seen += config.batch
            if step % 16 == 0 or step == config.steps or step % config.checkpoint_every == 0:
                loss_value = loss.item()
                if world > 1:  # all stop together, before rank 0 checkpoints weights that another process's loss spoilt
                    loss_value = _agreed_loss(flag, loss_value)
                check_finite(loss_value, step, last_good, config.lr, StudentError)
                if bar is not None:
                    bar.update(task, completed=step, loss=loss_value, psnr=-10 * math.log10(max(loss_value, 1e-10)))
            if step % config.checkpoint_every == 0 and step < config.steps:
                _check_weights(model, step, last_good, config.lr)  # an inf gradient spoils the weights, not the loss read before it
                if rank == 0:
                    save_checkpoint(folder, model, optimizer, {"key": key, "step": step, "elapsed_s": time.perf_counter() - t_start})
                last_good = step  # on every process: any may be the one to report a divergence
    finally:
        if bar is not None:
            bar.stop()
    if images_seen:  # the last step's loss (a time limit stops between the reads, every 16 steps) and weights
        loss_value = loss.item()
        if world > 1:
            loss_value = _agreed_loss(flag, loss_value)
        check_finite(loss_value, step, last_good, config.lr, StudentError)
        _check_weights(model, step, last_good, config.lr)
    train_time = time.perf_counter() - t_start
    return {
        "steps": step,
        "train_time_s": round(train_time, 2),
        "final_loss": round(loss_value, 6),
        "train_psnr": round(-10 * math.log10(max(loss_value, 1e-10)), 3) if math.isfinite(loss_value) else None,
        "images_per_s": round(images_seen * world / max(train_time - elapsed, 1e-9), 1),
        "resumed_from_step": meta["step"] if meta else 0,
        "pseudo_views": n,
        "pseudo_on_device": preload,
    }


def _check_weights(model: torch.nn.Module, step: int, last_good: int, lr: float) -> None:
    """The divergence error when a weight is NaN or infinite (under DDP every process holds the same weights,
    so each finds the same answer without talking to the others)."""
    finite = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()
    check_finite(0.0 if bool(finite) else float("nan"), step, last_good, lr, StudentError, what="a weight")


def _agreed_loss(flag: Tensor, loss: float) -> float:
    """Under DDP: NaN when any process's loss is not finite, else this process's ``loss``."""
    return float("nan") if _all_max(flag, not math.isfinite(loss)) else loss


def _to_device(x: Tensor, device: torch.device) -> Tensor:
    """A step's few indices on ``device``. On CUDA through pinned memory, without blocking: a plain copy from
    the host makes the CPU wait for every kernel queued so far (the last step's backward and optimizer), and
    the GPU then idles while the next step's kernels are launched."""
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)


def _all_max(flag: Tensor, value: float) -> float:
    """Under DDP: the largest of every process's ``value`` (every process calls this at the same steps)."""
    import torch.distributed as dist

    flag.fill_(float(value))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return float(flag.item())
