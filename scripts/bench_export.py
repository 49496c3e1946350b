"""Benchmark the export of a student: size, PSNR loss and onnxruntime CPU latency per variant, export time,
and delegate coverage for each upsampling choice.

    # a workspace that has a student:
    python scripts/bench_export.py WS
    # or a student trained elsewhere (e.g. on the GPU machine) installed into a fresh import of its dataset:
    python scripts/bench_export.py /tmp/lego-export --dataset ../shared/data/lego-400 --student-dir STUDENT_FOLDER

Writes ``bench-results/export.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np


def install_student(ws: Path, dataset: Path, student_dir: Path) -> None:
    """Import ``dataset`` into ``ws`` and add ``student_dir`` (student.json + weights, fp16 allowed) as its
    finished student stage."""
    from safetensors.torch import load_file

    from mg3d.capture import CaptureConfig, run as capture
    from mg3d.student.model import NeLF
    from mg3d.workspace import Workspace

    workspace = Workspace(ws)
    if workspace.manifest("capture") is None:
        capture(dataset, CaptureConfig(), workspace)
    weights = next(student_dir.glob("student*.safetensors"))
    meta = json.loads((student_dir / "student.json").read_text())
    with workspace.begin("student", {"imported_from": str(student_dir)}, {"weights": {"path": str(weights), "sha256": ""}}) as run_:
        (run_.path / "student.json").write_text(json.dumps(meta, indent=2))
        tensors = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(weights)).items()}
        from safetensors.torch import save_file

        save_file(tensors, str(run_.path / "student.safetensors"))
        NeLF.load(run_.path)  # fails here when the files do not fit together
        run_.outputs.update({"weights": "student.safetensors", "spec": "student.json"})


def latency(path: Path, pose: np.ndarray, threads: int, runs: int) -> dict[str, float]:
    from mg3d.bench.runners import latency_stats, time_runs
    from mg3d.export.onnxmodel import session

    t = time.perf_counter()
    sess = session(path, threads)
    load_ms = (time.perf_counter() - t) * 1e3
    first_ms, times = time_runs(lambda: sess.run(None, {"c2w": pose[None].astype(np.float32)}), 3, runs)
    return {"load_ms": round(load_ms, 1), "first_ms": round(first_ms, 1), **latency_stats(times)}


def coverage_by_upsampler(spec: dict, out: Path) -> dict[str, dict]:
    """Delegate coverage of the same architecture with each upsampler (random weights: structure only)."""
    import onnx

    from mg3d.export.mobile import delegate_coverage
    from mg3d.export.onnxmodel import export_fp32
    from mg3d.student.model import NeLF, StudentSpec, fold_batchnorm

    result = {}
    for upsample in ("shuffle", "transpose"):
        fields = {**spec, "upsample": upsample, "center": tuple(spec["center"])}
        path = out / f"coverage_{upsample}.onnx"
        onnx.save(export_fp32(fold_batchnorm(NeLF(StudentSpec(**fields)))), str(path))
        result[upsample] = delegate_coverage(path)
        path.unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ws", type=Path)
    parser.add_argument("--dataset", type=Path, help="import this dataset first (with --student-dir)")
    parser.add_argument("--student-dir", type=Path, help="folder with student.json and student*.safetensors to install")
    parser.add_argument("--targets", default="onnx,android,ios")
    parser.add_argument("--eval-views", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args()

    from mg3d.export import ExportConfig, run
    from mg3d.workspace import Workspace

    if args.student_dir:
        install_student(args.ws, args.dataset, args.student_dir)
    workspace = Workspace(args.ws)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, {args.threads} threads", "targets": {}}
    for target in args.targets.split(","):
        config = ExportConfig(target=target, eval_views=args.eval_views, palettize=6 if target == "ios" else 0,
                              precision="fp16,int8" if target == "ios" else "")
        manifest = run(workspace, config, force=True).manifest
        folder = workspace.stage_dir("export") / target
        meta = json.loads((folder / "model.json").read_text())
        pose = np.asarray(meta["cameras"]["example_pose"], np.float32)
        for v in meta["variants"]:
            if v["format"] in ("onnx", "ort"):
                v["latency"] = latency(folder / v["file"], pose, args.threads, args.runs)
        results["targets"][target] = {"export_s": manifest["metrics"]["duration_s"], **{k: meta[k] for k in ("verification", "psnr_torch", "eval_views", "student")}, "variants": meta["variants"]}
    spec = json.loads((workspace.stage_dir("student") / "student.json").read_text())["spec"]
    results["coverage_by_upsampler"] = coverage_by_upsampler(spec, args.out)
    (args.out / "export.json").write_text(json.dumps(results, indent=2) + "\n")
    for target, r in results["targets"].items():
        print(f"{target}: export {r['export_s']:.1f} s, max |onnx-torch| {r['verification']['max_abs_error_fp32']:.2e}, torch PSNR {r['psnr_torch']}")
        for v in r["variants"]:
            lat = v.get("latency", {})
            print(f"  {v['file']:34s} {v['precision']:>20s} {v['mb']:8.2f} MB  psnr {v.get('psnr')}  vs fp32 {v.get('psnr_vs_fp32')}  loss {v.get('psnr_loss_db')}  {lat.get('median_ms', '-')} ms")
    for up, cov in results["coverage_by_upsampler"].items():
        print(up, {k: (c["fraction"], c["partitions"]) for k, c in cov.items()})


if __name__ == "__main__":
    main()
