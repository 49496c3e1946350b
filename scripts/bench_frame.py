"""CPU frame time of exported students in onnxruntime, several ONNX files timed in turn (interleaved rounds:
a 2-core host's speed drifts by 10-20% over minutes, so two files timed minutes apart do not compare).

``export`` writes a student of a given spec as ONNX, with seeded random weights and a sphere's occupancy
grid (a frame's cost does not depend on the weights: every pixel runs the same ops, the march its fixed
steps). ``time`` times files in turn and gives each one's median, and the median of its per-round ratio to
the first file. To compare the forms of two commits, export at each (the same command), then time both:

    git checkout OLD -- student export && python scripts/bench_frame.py export /tmp/old.onnx
    git checkout HEAD -- student export && python scripts/bench_frame.py export /tmp/new.onnx
    python scripts/bench_frame.py time /tmp/old.onnx /tmp/new.onnx --rounds 40

``gpu`` (on a CUDA machine) times the spec as it ships to a GPU (BatchNorm folded, fp16, channels-last,
compiled under CUDA graphs), each ``--variant`` beside it (their differences price a part of the frame:
``detail=0`` drops the texture branch), and lists the CUDA kernels of one compiled frame that take the most
time (inductor's fused kernels are named after the ops they fuse):

    python scripts/bench_frame.py gpu --variant detail_points=1 --variant detail=0,occupancy=0 --json $OUT/gpu.json

The default spec is the lego student of the box march and coarse-once texture (400x400, 28x256, 8 samples,
x8, 3-scale product planes read at 3 points, occupancy 256, 64 box steps, head 2x64, view 2); ``--set
KEY=VALUE`` changes any StudentSpec field.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

LEGO_FAST = dict(width_px=400, height_px=400, fx=555.555, fy=555.555, cx=200.0, cy=200.0, near=2.0, far=6.0, detail=8, detail_resolution=512,
                 occupancy=256, march_box=True, march_steps=64, head_layers=2, head_width=64, detail_view=2, detail_scales=3, detail_product=True,
                 detail_points=3, detail_coarse_once=True)


def student(sets: list[str], option: str = "--set"):
    """The default spec changed by ``sets`` (KEY=VALUE), seeded random weights, a sphere's occupancy grid."""
    import numpy as np
    import torch

    from mg3d.errors import Mg3dError
    from mg3d.student.model import NeLF, StudentSpec
    from mg3d.student.synthetic import sphere_occupancy

    from bench_student import _pairs  # the other benchmarks' KEY=VALUE reading (YAML values); this folder is on sys.path

    changes = _pairs(sets)
    unknown = sorted(set(changes) - {f.name for f in fields(StudentSpec)})
    if unknown:
        raise SystemExit(f"{option}: {', '.join(unknown)} is no StudentSpec field")
    try:
        spec = replace(StudentSpec(**LEGO_FAST), **changes)
    except Mg3dError as exc:  # a spec that does not hold together: its one line
        raise SystemExit(f"{option}: {exc}") from None
    torch.manual_seed(0)
    model = NeLF(spec).eval()
    if spec.occupancy:  # a sphere shell of radius 0.5 in the unit cube: rays hit, pass and miss
        model.detail.set_occupancy(torch.from_numpy(sphere_occupancy(((np.zeros(3), 0.5),), spec.occupancy)))
    return model


def pose_np():
    """The timed camera: 4 units out on +z, looking at the centre ([1, 4, 4] fp32)."""
    import numpy as np

    pose = np.eye(4, dtype=np.float32)[None]
    pose[0, 2, 3] = 4.0
    return pose


def export(path: Path, sets: list[str]) -> dict:
    import onnx

    from mg3d.export.onnxmodel import export_fp32
    from mg3d.student.model import fold_batchnorm

    model = student(sets)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(export_fp32(fold_batchnorm(model)), str(path))
    return {"file": str(path), "mb": round(path.stat().st_size / 1e6, 2), "set": sets}


def time_files(paths: list[Path], rounds: int, repeats: int, threads: int) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = threads, 3
    sessions = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in paths]
    pose = pose_np()
    for s in sessions:
        s.run(None, {"c2w": pose})
    times: list[list[float]] = [[] for _ in paths]
    for _ in range(rounds):
        for k, s in enumerate(sessions):
            run = []
            for _ in range(repeats):
                t = time.perf_counter()
                s.run(None, {"c2w": pose})
                run.append(1000 * (time.perf_counter() - t))
            times[k].append(statistics.median(run))
    return {str(p): {"median_ms": round(statistics.median(t), 1), "min_ms": round(min(t), 1),
                     "median_ratio_to_first": round(statistics.median([a / b for a, b in zip(t, times[0])]), 4)} for p, t in zip(paths, times)}


def gpu(sets: list[str], variants: list[str], repeats: int, rows: int, out: Path | None) -> dict:
    """Frame times (ms) of the spec and its variants as they ship to a GPU, and the costliest kernels of one
    compiled frame of the spec (without CUDA graphs, which the profiler does not see into; the kernels are the
    same). ``out``: the result so far is written there after each form (a run cut off keeps what it had)."""
    import torch

    from bench_student import _kernels, _shipped, _timed

    if not torch.cuda.is_available():
        raise SystemExit("gpu: no CUDA device on this machine: run it on the GPU machine (the device tool)")
    pose = torch.from_numpy(pose_np()).cuda()  # fp32: the model computes positions in fp32
    result: dict = {"device": torch.cuda.get_device_name(), "set": sets}
    with torch.no_grad():
        for k, variant in enumerate(["", *variants]):
            model = _shipped(student([*sets, *filter(None, variant.split(","))], "--variant" if variant else "--set").cuda())
            graphed = torch.compile(model, mode="reduce-overhead")
            key = f"variant{k}" if k else "spec"
            result[key] = {"ms": round(1000 * _timed(lambda graphed=graphed: graphed(pose), repeats, True), 3)} | ({"set": variant} if k else {})
            print(key, json.dumps(result[key]), flush=True)
            if k == 0:
                compiled = torch.compile(model)
                result["kernels"], result["kernels_total_us"] = _kernels(lambda: compiled(pose), rows)
            torch._dynamo.reset()  # every variant compiles anew
            if out:
                out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write a student of the spec as ONNX (random weights, a sphere's occupancy)")
    e.add_argument("out", type=Path)
    e.add_argument("--set", action="append", default=[], help="KEY=VALUE: a StudentSpec field changed from the default spec")
    t = sub.add_parser("time", help="time ONNX files in turn")
    t.add_argument("files", type=Path, nargs="+")
    t.add_argument("--rounds", type=int, default=20)
    t.add_argument("--repeats", type=int, default=1, help="runs per file and round (their median counts)")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--json", type=Path, help="also write the result here")
    g = sub.add_parser("gpu", help="time the spec (and variants) as shipped to a GPU and list its costliest kernels")
    g.add_argument("--set", action="append", default=[], help="KEY=VALUE: a StudentSpec field changed from the default spec")
    g.add_argument("--variant", action="append", default=[], help="KEY=VALUE,KEY=VALUE: also time the spec changed so")
    g.add_argument("--repeats", type=int, default=50)
    g.add_argument("--rows", type=int, default=25, help="kernels listed")
    g.add_argument("--json", type=Path, help="also write the result here")
    opts = parser.parse_args()
    if opts.command == "export":
        result = export(opts.out, opts.set)
    elif opts.command == "gpu":
        result = gpu(opts.set, opts.variant, opts.repeats, opts.rows, opts.json)
    else:
        missing = [str(p) for p in opts.files if not p.is_file()]
        if missing:
            raise SystemExit(f"no such ONNX file: {', '.join(missing)} (write one with: python scripts/bench_frame.py export FILE)")
        result = time_files(opts.files, opts.rounds, opts.repeats, opts.threads)
        if opts.json:
            opts.json.write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
