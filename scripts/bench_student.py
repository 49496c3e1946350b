"""Benchmark distillation: teacher -> pseudo views -> student, quality on the held-out views, and render
speed of student vs teacher measured side by side (same cameras, same resolution, same device).

Phases run in order on one workspace, so a long job can be split over several calls:

    python scripts/bench_student.py ws --dataset ../shared/data/lego-400 --phases teacher --teacher-time 240
    python scripts/bench_student.py ws --phases distill --views 2000
    python scripts/bench_student.py ws --phases student,speed --tag r2l --student-time 480
    python scripts/bench_student.py ws --phases student,speed --tag small --set depth=8 --set width=64

Writes ``<out>/<phase>[_<tag>].json`` and a few side-by-side PNGs.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import yaml


def _timed(fn, repeats: int, cuda: bool) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after 3 warm-up runs (CUDA-synchronised)."""
    import torch

    times = []
    for k in range(3 + repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        if k >= 3:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def _student_times(model, pose, repeats: int, cuda: bool, prefix: str = "student", eager: bool = True, fns: dict | None = None, autotune: bool = False) -> dict:
    """Frame times (ms) of one student: on CUDA fp16 with BatchNorm folded into the convs under CUDA graphs
    (also with the Triton kernels of mg3d.student.gpu, and so captured into one CUDA graph: how it ships; also
    with ``torch.backends.cudnn.benchmark``, and with ``autotune`` compiled with max-autotune), and with
    ``eager`` also eager fp16 (unfolded), bf16 autocast and fp32; on a CPU fp32.
    ``fns``: filled with each timed form's callable, by its key (for :func:`_rounds`)."""
    import torch

    result, fns = {}, {} if fns is None else fns

    def timed(key: str, fn) -> None:
        result[key] = 1000 * _timed(fn, repeats, cuda)
        fns[key] = fn  # only forms that ran

    if cuda:
        # CUDA graphs (no per-layer launch cost); then the same with cuDNN choosing each convolution's
        # algorithm by timing them (the frame's shapes are fixed); then inductor's max-autotune (Triton matrix
        # products whose epilogues take the bias, GELU and residual add, also under CUDA graphs) with the 1x1
        # convolutions compiled as matrix products, so that the residual blocks' convolutions are among them
        # (minutes of autotuning per student, hence opt-in)
        from torch._dynamo import config as dynamo
        from torch._inductor import config as inductor

        from mg3d.student.gpu import gpu_form
        from mg3d.student.gpu import graphed as captured

        dynamo.recompile_limit = 64  # every form of every variant compiles the same forward anew
        # the fused forms (mg3d.student.gpu: the residual stack and the texture reads as Triton kernels) under
        # reduce-overhead's CUDA graphs, and compiled, then captured whole into one CUDA graph (graphed: one
        # launch a frame, none of reduce-overhead's per-call guards; the fastest form)
        forms = [("cudagraph", "reduce-overhead", False, False, False), ("fused_cudagraph", "reduce-overhead", False, False, True),
                 ("fused_captured", "captured", False, False, True), ("cudagraph_cudnn_benchmark", "reduce-overhead", True, False, False)]
        for name, mode, benchmark, as_mm, fuse in forms + ([("max_autotune_mm", "max-autotune", False, True, False)] if autotune else []):
            torch.backends.cudnn.benchmark, inductor.conv_1x1_as_mm = benchmark, as_mm
            try:
                shipped = gpu_form(model, fuse=fuse)
                if fuse:
                    result[f"{prefix}_fp16_{name}_kernels"] = shipped.kernels
                graphed = captured(shipped, pose) if mode == "captured" else torch.compile(shipped, mode=mode)
                timed(f"{prefix}_fp16_folded_{name}_ms", lambda graphed=graphed: graphed(pose))
                if name in ("cudagraph", "fused_cudagraph", "fused_captured"):  # the timed forms draw the fp32 student's image (fp16 weights, fp32 geometry)
                    error = torch.mean((graphed(pose).float() - model(pose).float()) ** 2).item()
                    result[f"{prefix}_fp16_psnr_vs_fp32" if name == "cudagraph" else f"{prefix}_fp16_{name}_psnr_vs_fp32"] = round(-10 * math.log10(max(error, 1e-12)), 2)
            except Exception as exc:  # noqa: BLE001 - a compiler failure loses one row, not the run
                result[f"{prefix}_fp16_{name}_error"] = f"{exc.__class__.__name__}: {str(exc)[:200]}"
            finally:
                torch.backends.cudnn.benchmark, inductor.conv_1x1_as_mm = False, False
        if not eager:
            return result
        half = copy.deepcopy(model).half().to(memory_format=torch.channels_last)
        timed(f"{prefix}_fp16_ms", lambda: half(pose))

        def bf16() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                model(pose)

        timed(f"{prefix}_bf16_autocast_ms", bf16)
    timed(f"{prefix}_fp32_ms", lambda: model(pose))
    print(prefix, json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}), flush=True)
    return result


def _rounds(student, teacher, rounds: int, repeats: int, cuda: bool) -> tuple[list[float], list[float]]:
    """Student and teacher frame times (ms), timed in turn ``rounds`` times: a GPU's clocks and a host's
    load drift over a run, and a ratio of two times taken minutes apart carries that drift."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        times[0].append(1000 * _timed(student, repeats, cuda))
        times[1].append(1000 * _timed(teacher, max(3, repeats // 4), cuda))
    return times


def _kernels(frame, rows: int = 15) -> tuple[list[list], float]:
    """The CUDA kernels of one call of ``frame`` (after 3 warm-up calls) that take the most time: rows of
    [name, calls, total µs], and all its kernels' µs."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        frame()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        frame()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    return [[e.key[:120], e.count, round(e.device_time_total, 1)] for e in events[:rows]], round(sum(e.device_time_total for e in events), 1)


def speed(ws: Path, student_dir: Path, repeats: int, threads: int, onnx_models: tuple[Path, ...] = (), variants: tuple[str, ...] = (), kernels: bool = False, rounds: int = 5, autotune: bool = False, onnx_variants: tuple[str, ...] = ()) -> dict:
    """Student vs teacher frame time at the student's resolution on one held-out camera (and the student's
    exported ONNX files ``onnx_models`` on onnxruntime). Every form of the student is timed once; then its
    fastest form and the teacher are timed in turn ``rounds`` times, and ``speedup`` is the median of the
    rounds' ratios (``student_ms``, ``teacher_ms``: the medians of their times). ``variants``
    ("key=value,key=value"): students of this spec changed so, random weights (a frame costs the same
    whatever the weights), timed alongside. ``onnx_variants``: the same, exported to fp32 ONNX (BatchNorm
    folded, the trained occupancy grid copied in) and timed on onnxruntime; "" is the trained student itself."""
    import dataclasses

    import torch

    from mg3d.formats.nerfstudio import load_nerfstudio
    from mg3d.student.evaluate import camera_at
    from mg3d.student.model import NeLF
    from mg3d.teacher.model import Teacher

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda and threads:
        torch.set_num_threads(threads)
    scene = load_nerfstudio(ws / "capture" / "transforms.json")
    split = next(s for s in ("test", "val", "train") if len(scene.splits.get(s, [])))
    i = int(scene.splits[split][0])
    student = NeLF.load(student_dir, device).eval()
    w, h = student.spec.width_px, student.spec.height_px
    c2w, intr = camera_at(scene, i, w, h)
    teacher = Teacher.load(ws / "teacher", device)
    if cuda:
        teacher.compile_kernels()
    pose = c2w[None].to(device)
    result = {"resolution": [w, h], "device": torch.cuda.get_device_name() if cuda else f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"}
    fns: dict = {}
    with torch.no_grad():
        result.update(_student_times(student, pose, repeats, cuda, fns=fns, autotune=autotune))
        tmp, others = Path(tempfile.mkdtemp()), set()
        exported = dict(zip(_export_variants(student, onnx_variants, tmp), onnx_variants))  # path: its change of spec
        for path in [*onnx_models, *exported]:  # exported variants on onnxruntime's CPU provider, same camera
            from mg3d.export.onnxmodel import session

            sess, feed = session(path, threads), {"c2w": pose.cpu().numpy()}
            key = f"student_ort_{path.stem.replace('.', '_')}_ms"
            if path in exported:
                result[f"{path.stem}_spec"] = exported[path] or "trained"
                if exported[path]:
                    others.add(key)  # a changed spec, not this student: timed, but not in the rounds
            fns[key] = lambda sess=sess, feed=feed: sess.run(None, feed)
            result[key] = 1000 * _timed(fns[key], repeats, False)
        shutil.rmtree(tmp, ignore_errors=True)  # the sessions hold their models
        fastest = min((k for k in fns if k not in others), key=lambda k: result[k])
        student_ms, teacher_ms = _rounds(fns[fastest], lambda: teacher.render(pose, *intr, w, h), rounds, repeats, cuda)
        result.update({"fastest": fastest, "student_ms_rounds": student_ms, "teacher_ms_rounds": teacher_ms})
        result["student_ms"], result["teacher_ms"] = statistics.median(student_ms), statistics.median(teacher_ms)
        if kernels and cuda:
            from mg3d.student.gpu import gpu_form

            folded = gpu_form(student, fuse=False)  # eager: each op its own kernels
            result["kernels"] = _kernels(lambda: folded(pose))[0]
        for k, variant in enumerate(variants):
            spec = dataclasses.replace(student.spec, **_pairs(variant.split(",")))
            result[f"variant{k}"] = variant
            result.update(_student_times(NeLF(spec).to(device).eval(), pose, repeats, cuda, prefix=f"variant{k}", eager=False, autotune=autotune))
    result["student_fps"] = round(1000 / result["student_ms"], 1)
    result["teacher_fps"] = round(1000 / result["teacher_ms"], 2)
    result["speedup"] = round(statistics.median(t / s for s, t in zip(student_ms, teacher_ms)), 1)
    for k in range(len(variants)):
        times = [v for key, v in result.items() if key.startswith(f"variant{k}_") and key.endswith("_ms")]
        if times:
            result[f"variant{k}_speedup"] = round(result["teacher_ms"] / min(times), 1)
    rounded = lambda v: round(v, 3) if isinstance(v, float) else [rounded(x) for x in v] if isinstance(v, list) else v  # noqa: E731
    return {k: rounded(v) for k, v in result.items()}


def _export_variants(student, variants: tuple[str, ...], folder: Path) -> list[Path]:
    """fp32 ONNX files (folder/onnx<k>.onnx, timed as student_ort_onnx<k>_ms) of the student's spec changed by
    each "key=value,..." in ``variants``, random weights with the trained occupancy grid ("": the trained
    student itself)."""
    import dataclasses

    import onnx

    from mg3d.export.onnxmodel import export_fp32
    from mg3d.student.model import NeLF, fold_batchnorm

    paths = []
    for k, variant in enumerate(variants):
        if not variant:  # a copy: the student itself may sit on the GPU for the other timings
            model = copy.deepcopy(student).cpu()
        else:
            model = NeLF(dataclasses.replace(student.spec, **_pairs(variant.split(","))))
            if model.spec.occupancy and model.spec.occupancy == student.spec.occupancy:
                model.detail.set_occupancy(student.detail.occupied.cpu())
        path = folder / f"onnx{k}.onnx"
        onnx.save(export_fp32(fold_batchnorm(model.eval())), str(path))
        paths.append(path)
    return paths


def _pairs(items: list[str]) -> dict:
    """["key=value", ...] -> {key: YAML value}."""
    return {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in items)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ws", type=Path, help="workspace folder (made by the teacher phase)")
    parser.add_argument("--dataset", type=Path, help="dataset to import for the teacher phase")
    parser.add_argument("--phases", default="teacher,distill,student,speed")
    parser.add_argument("--teacher-time", type=float, default=240.0)
    parser.add_argument("--views", type=int, default=2000)
    parser.add_argument("--student-time", type=float, default=480.0)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--tag", default="default")
    parser.add_argument("--set", action="append", default=[], help="student option KEY=VALUE (YAML value)")
    parser.add_argument("--teacher-set", action="append", default=[], help="teacher option KEY=VALUE (YAML value)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5, help="speed: student and teacher timed in turn this many times")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for the speed phase (0: torch's default)")
    parser.add_argument("--onnx", type=Path, action="append", default=[], help="speed phase: also time this exported model on onnxruntime")
    parser.add_argument("--variant", action="append", default=[], help="speed phase: also time a random-weight student of this spec changed so (KEY=VALUE,KEY=VALUE)")
    parser.add_argument("--onnx-variant", action="append", default=[], help="speed phase: also export such a student to fp32 ONNX (the trained grid copied in; an empty value: the trained student) and time it on onnxruntime")
    parser.add_argument("--max-autotune", action="store_true", help="speed phase on CUDA: also time each student compiled with inductor's max-autotune (minutes of tuning each)")
    parser.add_argument("--kernels", action="store_true", help="speed phase on CUDA: list the student's costliest kernels")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    opts = parser.parse_args()

    from mg3d.config import resolve_config
    from mg3d.workspace import Workspace

    opts.out.mkdir(parents=True, exist_ok=True)
    ws = Workspace(opts.ws)
    phases = opts.phases.split(",")
    t0 = time.perf_counter()

    def write(name: str, data: dict) -> None:
        data = {**data, "wall_s": round(time.perf_counter() - t0, 1)}
        (opts.out / f"{name}.json").write_text(json.dumps(data, indent=1))
        print(name, json.dumps(data), flush=True)

    if "teacher" in phases:
        from mg3d.capture import CaptureConfig
        from mg3d.capture import run as capture
        from mg3d.teacher import TeacherConfig
        from mg3d.teacher import run as teach

        if ws.manifest("capture") is None:
            capture(opts.dataset, CaptureConfig(), ws)
        config = resolve_config(TeacherConfig, "teacher", opts.preset, overrides={"steps": 100000, "max_time_s": opts.teacher_time, **_pairs(opts.teacher_set)})
        write("teacher", teach(ws, config, force=True).manifest["metrics"])
    if "distill" in phases:
        from mg3d.student.distill import DistillConfig
        from mg3d.student.distill import run as distill

        config = resolve_config(DistillConfig, "distill", opts.preset, overrides={"views": opts.views})
        write("distill", distill(ws, config, force=True).manifest["metrics"])
        shutil.copy(opts.ws / "distill" / "preview.png", opts.out / "distill_preview.png")
    if "student" in phases:
        from mg3d.student import StudentConfig
        from mg3d.student import run as teach_student

        overrides = {"steps": 10**7, "max_time_s": opts.student_time, **_pairs(opts.set)}
        config = resolve_config(StudentConfig, "student", opts.preset, overrides=overrides)
        metrics = teach_student(ws, config, force=True).manifest["metrics"]
        keep = opts.ws / f"student_{opts.tag}"
        shutil.rmtree(keep, ignore_errors=True)
        shutil.copytree(opts.ws / "student", keep)
        write(f"student_{opts.tag}", {**metrics, "set": opts.set})
        for png in sorted((keep / "renders").glob("*.png"))[:2]:
            shutil.copy(png, opts.out / f"student_{opts.tag}_{png.name}")
    if "speed" in phases:
        write(f"speed_{opts.tag}", speed(opts.ws, opts.ws / f"student_{opts.tag}", opts.repeats, opts.threads, tuple(opts.onnx), tuple(opts.variant), opts.kernels, opts.rounds, opts.max_autotune, tuple(opts.onnx_variant)))


if __name__ == "__main__":
    main()
