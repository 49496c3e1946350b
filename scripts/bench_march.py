"""Would a distance-skipping march pay on the CPU? A study against the student's fixed-step occupancy march.

``SurfaceDetail.march`` tests all ``march_steps`` points of every pixel's ray against the occupancy grid (20 M
points for a 400x400 view at 128 steps), and that march is most of an exported student's CPU frame. Here each
grid cell holds its Chebyshev distance (in cells, capped) to the nearest occupied cell, and a ray jumps from
its current step over every step that this distance proves empty: the same first hit as the fixed-step march,
in far fewer reads, but in a fixed number of rounds (an exported graph has no data-dependent loop).

Reported: how many rounds the rays of held-out cameras need (quantiles, and the share left unresolved after
each ``--iterations`` count), whether the result equals the fixed-step march, and the onnxruntime time (CPU,
``--threads``) of both marches exported alone.

    python scripts/bench_march.py .gpudata/speed25/ws/student_c4p3 .gpudata/speed25/ws/capture/transforms.json \
        --views 20 --iterations 48 --iterations 64

``--form KIND:STEPS`` (repeatable; KIND plain or box, as ``--march-box``) studies the fixed-step march's forms
instead: against a 4,096-step march (the first occupied point to a sixteenth of a cell), the share of true
hits each form finds, its false hits, the share of true hits whose window (the learned depth's range) holds
that point, the window's mean width in cells, and the onnxruntime time of that march alone:

    python scripts/bench_march.py STUDENT TRANSFORMS --views 10 --form plain:128 --form box:64 --form box:32
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def dilate(grid: Tensor) -> Tensor:
    """bool [X, Y, Z] grown by one cell in every direction (a 3x3x3 cube, as three 1-D passes)."""
    for dim in range(3):
        size = grid.shape[dim]
        grown = grid.clone()
        grown.narrow(dim, 1, size - 1).logical_or_(grid.narrow(dim, 0, size - 1))
        grown.narrow(dim, 0, size - 1).logical_or_(grid.narrow(dim, 1, size - 1))
        grid = grown
    return grid


def chebyshev(occupied: Tensor, cap: int) -> Tensor:
    """uint8 [X, Y, Z]: each cell's Chebyshev distance in cells to the nearest occupied one (0: occupied), at most cap."""
    dist = torch.full(occupied.shape, cap, dtype=torch.uint8)
    grid = occupied
    for k in range(cap):
        dist.masked_fill_(grid & (dist == cap), k)
        grid = dilate(grid)
    return dist


class FixedMarch(nn.Module):
    """The student's own march (every step of every ray), alone: c2w [1, 4, 4] -> first occupied step [1, 1, 1, P]."""

    def __init__(self, detail: nn.Module) -> None:
        super().__init__()
        self.detail = detail

    def forward(self, c2w: Tensor) -> Tensor:
        return self.detail.march(*self.detail.rays(c2w))


class SkipMarch(nn.Module):
    """The same first hits by distance skipping, in ``rounds`` rounds of one read per ray.

    A ray at step i, in a cell whose distance is k >= 1, moves to step i + floor((k - 1) / dt) + 1 (dt: a step in
    cells): every point it passes lies within k - 1 cells of the current one, so in a cell within k - 1 of its
    cell, all empty. A point outside the grid reads the empty border's distance, which is no more than its own."""

    def __init__(self, detail: nn.Module, rounds: int, cap: int = 64) -> None:
        super().__init__()
        spec = detail.spec
        if spec.spacing != "linear" or spec.march_box:
            raise SystemExit("the skip study takes students with linear spacing (object-centric scenes) and the plain march (no --march-box)")
        r = spec.occupancy
        self.detail, self.rounds, self.r, self.n = detail, rounds, r, spec.march_steps
        self.cells = 0.5 * r / spec.radius
        self.dt = float(detail.march_t[1] - detail.march_t[0]) * self.cells  # one step, in cells
        self.register_buffer("dist", chebyshev(detail.bordered.view(r + 2, r + 2, r + 2) > 0, cap).reshape(-1))

    def forward(self, c2w: Tensor) -> Tensor:
        return self.march(c2w, self.rounds)[0]

    def march(self, c2w: Tensor, rounds: int) -> tuple[Tensor, Tensor]:
        """(first occupied step [B, 1, 1, P] after ``rounds`` rounds, the rounds each ray needed: 1 + the last
        round that moved it)."""
        r, n, det = self.r, self.n, self.detail
        origin, d = det.rays(c2w)
        o = (origin - det.center.view(1, 3, 1, 1)) * self.cells + (0.5 * r + 1)  # bordered cell coordinates
        v = d * self.cells
        step = torch.zeros_like(d[:, :1], dtype=torch.long)  # [B, 1, 1, P]
        needed = torch.zeros_like(step)
        for i in range(rounds):
            t = det.march_t[step.clamp(max=n - 1)]
            g = (o + v * t).floor().clamp(0, r + 1).int()
            k = self.dist[(g[:, 0:1] * (r + 2) + g[:, 1:2]) * (r + 2) + g[:, 2:3]].float()
            jump = torch.where(k > 0, torch.floor((k - 1) / self.dt) + 1, torch.zeros_like(k)).long()
            moved = (step + jump).clamp(max=n)
            if not torch.jit.is_tracing():
                needed = torch.where(moved != step, i + 1, needed)
            step = moved
        return step, needed


def ort_ms(module: nn.Module, pose: Tensor, threads: int, repeats: int = 5) -> float:
    import onnxruntime as ort

    from mg3d.export.onnxmodel import quiet

    buffer = io.BytesIO()
    with quiet(), torch.no_grad():
        torch.onnx.export(module, (pose,), buffer, opset_version=17, dynamo=False, input_names=["c2w"])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = threads, 3
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    feed = {"c2w": pose.numpy()}
    session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def window_study(student: nn.Module, scene, cameras: list[int], forms: list[str], threads: int, fine_steps: int = 4096, chunk: int = 16384) -> dict:
    """Each march form ("plain:128", "box:64", ...) on the student's grid against a ``fine_steps`` march (see
    the module docstring), pooled over the ``cameras`` of ``scene``."""
    import dataclasses

    from mg3d.student.evaluate import camera_at
    from mg3d.student.model import SurfaceDetail

    spec = student.spec

    def detail(kind: str, steps: int) -> SurfaceDetail:
        if kind not in ("plain", "box"):
            raise SystemExit(f"march form {kind!r} is unknown: use plain:STEPS or box:STEPS")
        module = SurfaceDetail(dataclasses.replace(spec, march_steps=steps, march_box=kind == "box"), 8)
        module.set_occupancy(student.detail.occupied)
        return module.eval()

    fine = detail("plain", fine_steps)
    parsed = [(form, *form.split(":")) for form in forms]
    marches = {form: detail(kind, int(steps)) for form, kind, steps in parsed}
    cell = 2 * spec.radius / spec.occupancy
    counts = {form: {"found": 0, "false": 0, "holds": 0, "width": 0.0, "hits": 0} for form in marches}
    rays = true_hits = 0
    with torch.no_grad():
        for i in cameras:
            pose = camera_at(scene, i, spec.width_px, spec.height_px)[0][None]
            origin, d = fine.rays(pose)
            first = torch.cat([fine.march(origin, d[..., k : k + chunk]) for k in range(0, d.shape[-1], chunk)], -1)  # [1, 1, 1, P]
            true_hit, true_t = first < fine_steps, fine.march_t[first.clamp(max=fine_steps - 1)]
            rays, true_hits = rays + true_hit.numel(), true_hits + int(true_hit.sum())
            for form, march in marches.items():
                hit, lo, hi = march.window(march.march(origin, d), origin, d)
                c = counts[form]
                c["found"] += int((hit & true_hit).sum())
                c["false"] += int((hit & ~true_hit).sum())
                c["holds"] += int((hit & true_hit & (lo <= true_t + 1e-4) & (true_t <= hi)).sum())
                c["width"] += float((hi - lo)[hit].sum()) / cell
                c["hits"] += int(hit.sum())
    pose = camera_at(scene, cameras[0], spec.width_px, spec.height_px)[0][None]
    result: dict = {"views": len(cameras), "rays": rays, "true_hits": true_hits, "fine_steps": fine_steps}
    for form, march in marches.items():
        c = counts[form]
        result[form] = {"found": round(c["found"] / true_hits, 5), "false_of_rays": round(c["false"] / rays, 5), "window_holds_surface": round(c["holds"] / true_hits, 4),
                        "window_cells": round(c["width"] / max(c["hits"], 1), 2), "ort_march_ms": round(ort_ms(FixedMarch(march), pose, threads), 1)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("student", type=Path, help="a trained occupancy student's folder (student.json + weights)")
    parser.add_argument("transforms", type=Path, help="the capture's transforms.json (its test cameras are used)")
    parser.add_argument("--views", type=int, default=20, help="test cameras, spread over the split")
    parser.add_argument("--iterations", type=int, action="append", default=[], help="rounds of the exported skip march to time (repeatable; 64 if none)")
    parser.add_argument("--form", action="append", default=[], help="KIND:STEPS (plain or box): study these forms of the fixed march instead (repeatable)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    opts = parser.parse_args()

    from mg3d.formats.nerfstudio import load_nerfstudio
    from mg3d.student.evaluate import camera_at
    from mg3d.student.model import NeLF

    torch.set_num_threads(opts.threads)
    student = NeLF.load(opts.student).eval()
    if not student.spec.occupancy:
        raise SystemExit(f"{opts.student} has no occupancy grid: train one with --occupancy")
    scene = load_nerfstudio(opts.transforms)
    test = scene.splits["test"]
    cameras = [int(test[i * len(test) // opts.views]) for i in range(opts.views)]
    w, h = student.spec.width_px, student.spec.height_px
    if opts.form:
        result = window_study(student, scene, cameras, opts.form, opts.threads)
        opts.out.mkdir(parents=True, exist_ok=True)
        (opts.out / "march_forms.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result))
        return
    fixed = FixedMarch(student.detail)
    start = time.perf_counter()
    skip = SkipMarch(student.detail, 0)
    result = {"distance_grid_s": round(time.perf_counter() - start, 2), "views": opts.views}
    most = student.spec.march_steps  # each round moves an unresolved ray one step at least: exact after this many
    needed, equal = [], True
    with torch.no_grad():
        for i in cameras:
            pose = camera_at(scene, i, w, h)[0][None]
            step, rounds = skip.march(pose, most)
            needed.append(rounds.flatten())
            equal &= bool((step.flatten() == fixed(pose).flatten()).all())
    needed = torch.cat(needed).float()
    q = torch.quantile(needed, torch.tensor([0.5, 0.99, 0.999, 0.9999, 1.0])).tolist()
    result.update({"rays": needed.numel(), "equal_to_fixed_march_after_128_rounds": equal, "rounds_mean": round(float(needed.mean()), 2),
                   "rounds_p50_p99_p999_p9999_max": q})
    pose = camera_at(scene, cameras[0], w, h)[0][None]
    result["ort_fixed_march_ms"] = round(ort_ms(fixed, pose, opts.threads), 1)
    for rounds in opts.iterations or [64]:
        skip.rounds = rounds
        result[f"unresolved_after_{rounds}_rounds"] = int((needed > rounds).sum())
        result[f"ort_skip_march_{rounds}_rounds_ms"] = round(ort_ms(skip, pose, opts.threads), 1)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "march.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
