"""CPU frame time of exported students in onnxruntime, several ONNX files timed in turn (interleaved rounds:
a 2-core host's speed drifts by 10-20% over minutes, so two files timed minutes apart do not compare).

``export`` writes a student of a given spec as ONNX, with seeded random weights and a sphere's occupancy
grid (a frame's cost does not depend on the weights: every pixel runs the same ops, the march its fixed
steps). ``time`` times files in turn and gives each one's median, and the median of its per-round ratio to
the first file. To compare the forms of two commits, export at each (the same command), then time both:

    git checkout OLD -- student export && python scripts/bench_frame.py export /tmp/old.onnx
    git checkout HEAD -- student export && python scripts/bench_frame.py export /tmp/new.onnx
    python scripts/bench_frame.py time /tmp/old.onnx /tmp/new.onnx --rounds 40

``profile`` gives onnxruntime's own profile of a file's frame: milliseconds per op type and for the costliest
nodes, with their output shapes (``python scripts/bench_frame.py profile /tmp/new.onnx``).

``gpu`` (on a CUDA machine) times the spec as it ships to a GPU in several forms (``--form``: BatchNorm
folded, fp16, channels-last, compiled under CUDA graphs; with the residual stack and the texture reads as
Triton kernels, mg3d.student.gpu; captured whole into one CUDA graph; the form ``mg3d bench --device cuda``
times), each ``--variant`` beside it (their differences price a part of the frame: ``detail=0`` drops the
texture branch), each form's PSNR against the fp32 model, and the CUDA kernels of one compiled frame that
take the most time (inductor's fused kernels are named after the ops they fuse):

    python scripts/bench_frame.py gpu --form plain --form fused-captured --variant detail=0,occupancy=0 --json $OUT/gpu.json

The default spec is the lego student of the box march and coarse-once texture (400x400, 28x256, 8 samples,
x8, 3-scale product planes read at 3 points, occupancy 256, 64 box steps, head 2x64, view 2); ``--set
KEY=VALUE`` changes any StudentSpec field.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
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


def profile(path: Path, runs: int, threads: int, rows: int) -> dict:
    """onnxruntime's own profile of ``runs`` frames of an ONNX file (after 2 warm-up runs): milliseconds a frame
    per op type and for the costliest nodes (with their output shapes)."""
    import collections
    import shutil

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level, options.enable_profiling = threads, 3, True
    folder = Path(tempfile.mkdtemp())
    options.profile_file_prefix = str(folder / "ort")
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"c2w": pose_np()}
    for _ in range(2):
        sess.run(None, feed)
    t = time.perf_counter()
    for _ in range(runs):
        sess.run(None, feed)
    frame_ms = 1000 * (time.perf_counter() - t) / runs
    trace = Path(sess.end_profiling())
    events = [e for e in json.loads(trace.read_text()) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    shutil.rmtree(folder, ignore_errors=True)
    per_op, per_node, shapes = collections.Counter(), collections.Counter(), {}
    for e in events:  # the warm-up runs are in the trace too: every figure is divided by all the runs
        per_op[e["args"]["op_name"]] += e["dur"]
        per_node[e["name"].removesuffix("_kernel_time")] += e["dur"]
        shapes[e["name"].removesuffix("_kernel_time")] = " ".join(f"{t}{list(v)}" for d in e["args"].get("output_type_shape", []) for t, v in d.items())
    total, n = sum(per_op.values()), runs + 2
    return {"file": str(path), "frame_ms": round(frame_ms, 1), "kernels_ms": round(total / n / 1000, 1),
            "ops": {k: [round(v / n / 1000, 1), f"{100 * v / total:.1f}%"] for k, v in per_op.most_common(rows)},
            "nodes": [[k, round(v / n / 1000, 2), shapes[k]] for k, v in per_node.most_common(rows)]}


def gpu(sets: list[str], variants: list[str], repeats: int, rows: int, out: Path | None, forms: list[str], configs: list[str]) -> dict:
    """Frame times (ms) of the spec and its variants as they ship to a GPU, in each of ``forms``, and the
    costliest kernels of one compiled frame of the spec in each form (without CUDA graphs, which the profiler
    does not see into; the kernels are the same). Forms:

    - ``plain``: BatchNorm folded, fp16, channels-last, compiled in inductor's reduce-overhead mode (its CUDA
      graphs);
    - ``fused``: the same with the residual stack and the texture reads as Triton kernels
      (:mod:`mg3d.student.gpu`); ``fused-blocks``: the stack's kernel alone;
    - ``gather`` / ``fused-gather``: the texture read with Gather (the exports' form) instead of ``grid_sample``;
    - ``captured`` / ``fused-captured``: compiled, then captured into one CUDA graph
      (:func:`mg3d.student.gpu.graphed`: no guards to check per frame);
    - ``bench``: what ``mg3d bench --device cuda`` times (the fused form compiled and captured, GPU time
      from CUDA events).

    ``configs``: "BM,BK,WARPS" of the stack's kernel, each timed in the fused-captured form. Each form's PSNR
    against the fp32 model is reported. ``out``: the result so far is written there after each form (a run
    cut off keeps what it had)."""
    import math

    import torch

    from bench_student import _kernels, _timed
    from mg3d.student import model as nelf
    from mg3d.student.gpu import gpu_form
    from mg3d.student.gpu import graphed as captured

    if not torch.cuda.is_available():
        raise SystemExit("gpu: no CUDA device on this machine: run it on the GPU machine (the device tool)")
    pose = torch.from_numpy(pose_np()).cuda()  # fp32: the model computes positions in fp32
    result: dict = {"device": torch.cuda.get_device_name(), "set": sets}
    sampled = nelf.sampled_plane_features
    runs = [(k, v, form, None) for k, v in enumerate(["", *variants]) for form in forms]
    runs += [(0, "", "fused-captured", tuple(int(n) for n in c.split(","))) for c in configs]  # the steadiest form
    with torch.no_grad():
        for k, variant, form, config in runs:
            model = student([*sets, *filter(None, variant.split(","))], "--variant" if variant else "--set").cuda()
            reference = model(pose)
            nelf.sampled_plane_features = nelf.gathered_plane_features if "gather" in form else sampled
            key = (f"variant{k}" if k else "spec") + f"_{form}" + (f"_{'x'.join(map(str, config))}" if config else "")
            try:
                if form == "bench":  # mg3d bench --device cuda's runner: gpu_form compiled and captured, CUDA-event times
                    from mg3d.bench.runners import run_torch_cuda

                    row = run_torch_cuda(model, pose_np(), reference.cpu().numpy(), 10, repeats, "fp16")
                    result[key] = {"ms": row["median_ms"], "psnr_vs_fp32": row["psnr_vs_torch"], "kernels": row["kernels"]} | ({"set": variant} if k else {})
                    print(key, json.dumps(result[key]), flush=True)
                    continue
                shipped = gpu_form(model, fuse="fused" in form, **({"config": config} if config else {}))
                if "blocks" in form and shipped.spec.detail:  # the stack's kernel alone
                    shipped.detail.read_planes, shipped.kernels["texture"] = None, "not asked"
                graphed = captured(shipped, pose) if "captured" in form else torch.compile(shipped, mode="reduce-overhead")
                error = torch.mean((graphed(pose).float() - reference) ** 2).item()
                result[key] = {"ms": round(1000 * _timed(lambda graphed=graphed: graphed(pose), repeats, True), 3),
                               "psnr_vs_fp32": round(-10 * math.log10(max(error, 1e-12)), 2)}
                result[key] |= ({"set": variant} if k else {}) | ({"kernels": shipped.kernels} if "fused" in form else {})
                print(key, json.dumps(result[key]), flush=True)
                if k == 0 and config is None:
                    compiled = torch.compile(shipped)
                    result[f"kernels_{form}"], result[f"kernels_{form}_total_us"] = _kernels(lambda: compiled(pose), rows)
            except Exception as exc:  # noqa: BLE001 - a form the compiler cannot take loses its row, not the run
                result[key] = {"error": f"{exc.__class__.__name__}: {str(exc)[:300]}"}
                print(key, json.dumps(result[key]), flush=True)
            finally:
                nelf.sampled_plane_features = sampled
                torch._dynamo.reset()  # every form compiles anew
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
    p = sub.add_parser("profile", help="onnxruntime's profile of an ONNX file's frame: time per op type and node")
    p.add_argument("file", type=Path)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=15)
    g = sub.add_parser("gpu", help="time the spec (and variants) as shipped to a GPU and list its costliest kernels")
    g.add_argument("--set", action="append", default=[], help="KEY=VALUE: a StudentSpec field changed from the default spec")
    g.add_argument("--variant", action="append", default=[], help="KEY=VALUE,KEY=VALUE: also time the spec changed so")
    g.add_argument("--repeats", type=int, default=50)
    g.add_argument("--rows", type=int, default=25, help="kernels listed")
    g.add_argument("--form", action="append", choices=["plain", "fused", "fused-blocks", "gather", "fused-gather", "captured", "fused-captured", "bench"],
                   help="forms timed (default: plain, fused and fused-captured)")
    g.add_argument("--fused-config", action="append", default=[], help="BM,BK,WARPS: also time the spec fused and captured with this configuration of the stack's kernel")
    g.add_argument("--json", type=Path, help="also write the result here")
    opts = parser.parse_args()
    if opts.command == "export":
        result = export(opts.out, opts.set)
    elif opts.command == "profile":
        if not opts.file.is_file():
            raise SystemExit(f"no such ONNX file: {opts.file} (write one with: python scripts/bench_frame.py export FILE)")
        result = profile(opts.file, opts.runs, opts.threads, opts.rows)
    elif opts.command == "gpu":
        result = gpu(opts.set, opts.variant, opts.repeats, opts.rows, opts.json, opts.form or ["plain", "fused", "fused-captured"], opts.fused_config)
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
