"""Profile teacher rendering on a GPU: train briefly, then time renders under several chunk sizes and
candidate budgets, and print the CUDA ops that dominate one render (torch.profiler).

    python scripts/profile_teacher.py ../shared/data/lego-400 --train-time 60
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def timed(fn, repeats: int = 5) -> float:
    """Median milliseconds of ``fn()`` after one warm-up, CUDA-synchronised."""
    fn()
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(1000 * (time.perf_counter() - t))
    return statistics.median(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("source", type=Path)
    parser.add_argument("--train-time", type=float, default=60)
    parser.add_argument("--compile", action="store_true", help="also time a torch.compile'd hash encoding")
    opts = parser.parse_args()

    import mg3d.teacher.model as model_mod
    from mg3d.capture import CaptureConfig
    from mg3d.capture import run as capture
    from mg3d.config import resolve_config
    from mg3d.formats import load_scene
    from mg3d.teacher import TeacherConfig
    from mg3d.teacher import run as teach
    from mg3d.teacher.model import Teacher
    from mg3d.workspace import Workspace

    ws = Path(tempfile.mkdtemp()) / "ws"
    capture(opts.source, CaptureConfig(), Workspace(ws))
    config = resolve_config(TeacherConfig, "teacher", "default", overrides={"max_time_s": opts.train_time, "steps": 100000, "eval_views": 3})
    print(teach(Workspace(ws), config).manifest["metrics"])
    scene = load_scene(ws)
    model = Teacher.load(ws, "cuda")
    i = int(scene.splits["test"][0])
    args = (scene.c2w[i][None], scene.fx[i], scene.fy[i], scene.cx[i], scene.cy[i], int(scene.width[i]), int(scene.height[i]))
    print(f"candidates per ray {len(model.t_seq)}, occupied cells {model.grid.mask.float().mean():.4f}")
    for budget, chunk in ((1 << 22, 1 << 16), (1 << 23, 1 << 18), (1 << 24, 1 << 18)):
        model_mod.CANDIDATE_BUDGET = budget  # the GPU takes 16 times this
        print(f"budget {budget:>10} chunk {chunk:>7}: {timed(lambda: model.render(*args, chunk=chunk)):8.1f} ms")
    model_mod.CANDIDATE_BUDGET = 1 << 22
    if opts.compile:  # experiment: fuse the hash encoding's elementwise work with torch.compile
        eager = model.field.encoding.forward
        x = torch.rand(100_000, 3, device="cuda")
        compiled = torch.compile(eager, dynamic=True)
        t = time.perf_counter()
        ref, fast = eager(x), compiled(x)
        print(f"compile {time.perf_counter() - t:.1f} s; max |compiled - eager| = {(ref - fast).abs().max().item():.2e}")
        model.field.encoding.forward = compiled
        print(f"compiled encoding: {timed(lambda: model.render(*args, chunk=1 << 18)):8.1f} ms")
        model.field.encoding.forward = eager
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model.render(*args, chunk=1 << 16)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
