"""How well does a student's occupancy grid, baked from a teacher, cut the silhouettes, and what does its
resolution cost? For each grid size: bake it from the teacher (``mg3d.student.train.bake_occupancy``), march
every pixel of a few held-out views (``SurfaceDetail.march_cameras``) and compare the rays that hit a cell with
the alpha of the dataset's RGBA test images; optionally export a student of that spec to ONNX and time it.

    python scripts/bench_occupancy.py --teacher T --workspace WS --student-json S/student.json --cells 128 256
    python scripts/bench_occupancy.py ... --cells 128 256 --onnx-cost     # + fp32 ONNX size and CPU latency

T: a folder with teacher.json and teacher.safetensors; WS: a workspace whose capture holds the dataset
(RGBA images with transparent background, such as the Blender scenes); S: a trained student's spec.
Prints one JSON line per grid size.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--student-json", type=Path, required=True)
    parser.add_argument("--cells", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--views", type=int, default=3, help="held-out views to compare")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--onnx-cost", action="store_true", help="also export a student with this grid (random weights) and time it on onnxruntime")
    opts = parser.parse_args()

    import torch
    from PIL import Image

    from mg3d.formats.nerfstudio import load_nerfstudio
    from mg3d.student.model import NeLF, StudentSpec
    from mg3d.student.train import bake_occupancy

    torch.set_num_threads(opts.threads)
    spec = json.loads(opts.student_json.read_text())["spec"]
    spec["center"] = tuple(spec["center"])
    capture = opts.workspace / "capture"
    scene = load_nerfstudio(capture / "transforms.json")
    views = [int(i) for i in scene.splits["test"][: opts.views]]
    for cells in opts.cells:
        model = NeLF(StudentSpec(**{**spec, "occupancy": cells}))
        start = time.perf_counter()
        occupied = bake_occupancy(model, opts.teacher, torch.device("cpu"))
        bake_s = time.perf_counter() - start
        counts = np.zeros(4)  # agree, false hits, missed, pixels
        for i in views:
            hit = model.detail.march_cameras(torch.from_numpy(scene.c2w[i].astype(np.float32))[None])[0][0, 0].numpy()
            rgba = Image.open(scene.image_paths[i]).convert("RGBA").resize((spec["width_px"], spec["height_px"]))
            alpha = np.asarray(rgba)[..., 3] > 127
            counts += [(hit == alpha).sum(), (hit & ~alpha).sum(), (~hit & alpha).sum(), alpha.size]
        row = {"cells": cells, "occupied": round(occupied, 5), "bake_s": round(bake_s, 1), "agree": round(counts[0] / counts[3], 4),
               "false_hits": round(counts[1] / counts[3], 4), "missed": round(counts[2] / counts[3], 5)}
        if opts.onnx_cost:
            row.update(onnx_cost(model, opts.threads))
        print(json.dumps(row), flush=True)


def onnx_cost(model, threads: int, runs: int = 10) -> dict:
    """fp32 ONNX size and median onnxruntime latency of ``model`` (BatchNorm folded) on this CPU."""
    import tempfile

    import onnx

    from mg3d.bench.runners import latency_stats, time_runs
    from mg3d.export.onnxmodel import export_fp32, session
    from mg3d.student.model import fold_batchnorm

    graph = export_fp32(fold_batchnorm(model))
    c2w = np.eye(4, dtype=np.float32)[None]
    c2w[0, 2, 3] = (model.spec.near + model.spec.far) / 2
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(graph, f"{tmp}/model.onnx")
        sess = session(Path(tmp) / "model.onnx", threads)
        _, times = time_runs(lambda: sess.run(None, {"c2w": c2w}), warmup=3, runs=runs)
    return {"onnx_mb": round(graph.ByteSize() / 1e6, 2), "onnx_ms": latency_stats(times)["median_ms"]}


if __name__ == "__main__":
    main()
