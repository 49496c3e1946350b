"""Latency and on-device agreement of the default and a small student at 256 and 400 px on one device.

Each student gets its own workspace: the dataset imported, the student installed with seeded random
weights (latency does not depend on training), exported for onnx (web for ``browser``;
nothing for ``cuda``, which runs torch), then ``mg3d bench --precision all``.

    python scripts/bench_devices.py ../shared/data/lego-400 --device host --out bench-results
    python scripts/bench_devices.py .gpudata/lego --device cuda --out $OUT
    python scripts/bench_devices.py ../shared/data/lego-400 --device browser --out bench-results   # headless Chromium

Writes ``<out>/devices_<device>.json`` and prints one line per variant.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# Seeded default initialisation with the blocks switched on (BatchNorm scales in [0.5, 1] instead of the
# zero that makes a fresh block the identity): varied images, so agreement with torch is a real test.
ARCHS = {"default": {"depth": 28, "width": 256}, "small": {"depth": 8, "width": 64}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--device", default="host")
    parser.add_argument("--sizes", default="256,400")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args()

    import torch

    from bench_export import install_student
    from mg3d.bench import BenchConfig, run as bench
    from mg3d.bench.profiles import resolve
    from mg3d.export import ExportConfig, run as export
    from mg3d.formats import load_scene
    from mg3d.student.model import NeLF, StudentSpec
    from mg3d.workspace import Workspace

    profile = resolve(args.device)
    scene = load_scene(args.dataset)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch, fields in ARCHS.items():
            for size in (int(s) for s in args.sizes.split(",")):
                scale = size / float(scene.width[0])
                spec = StudentSpec(width_px=size, height_px=size, fx=float(scene.fx[0]) * scale, fy=float(scene.fy[0]) * scale, cx=size / 2, cy=size / 2,
                                   near=2.0, far=6.0, radius=1.5, **fields)
                torch.manual_seed(0)
                model = NeLF(spec)
                with torch.no_grad():
                    for m in model.modules():
                        if isinstance(m, torch.nn.BatchNorm2d):
                            m.weight.uniform_(0.5, 1.0)
                student_dir = Path(tmp) / f"{arch}-{size}-student"
                model.save(student_dir)
                ws = Path(tmp) / f"{arch}-{size}"
                install_student(ws, args.dataset, student_dir)
                if profile.runtime != "torch":  # the browser loads the web export (fp32 + fp16), the rest the onnx one
                    target = "web" if profile.transport == "browser" else "onnx"
                    export(Workspace(ws), ExportConfig(target=target, eval_views=2, calib_views=8, max_int8_loss_db=100.0))
                report = bench(Workspace(ws), BenchConfig(device=args.device, precision="all", runs=args.runs, views=4))
                for row in report["devices"][profile.name]["rows"]:
                    rows.append({"student": arch, **fields, **row})
                    print(f"{arch:8s} {size:4d}px {row['precision']:5s} {row.get('median_ms', '-')} ms  {row.get('fps', '-')} FPS  PSNR vs torch {row.get('psnr_vs_torch')}  {row.get('error', '')}", flush=True)
    (args.out / f"devices_{profile.name}.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
