"""Profile student training on a GPU: images per second of the real training loop (``mg3d.student.train``)
for several batch sizes and options, and the CUDA kernels that dominate a step (torch.profiler).

The student's spec and occupancy grid come from a trained student; the pseudo views are that student's own
renders of orbit cameras drawn like the dataset's training cameras (the speed does not depend on the
pixels), written as a distill folder that ``PseudoData`` reads like any other.

    python scripts/profile_student.py STUDENT_DIR DATASET/transforms_train.json --views 256 --time 25 \
        --variant "b8:batch=8" --variant "b32:batch=32,lr=0.002" --profile b8
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch


def fake_distill(model, c2w_train: np.ndarray, views: int, folder: Path, device: torch.device) -> None:
    """Write ``views`` renders of ``model`` at orbit cameras as pseudo data (uint8 images, fp16 surfaces)."""
    from mg3d.student.cameras import sample_cameras

    spec = model.spec
    cams = sample_cameras(c2w_train, views, seed=1)
    images = np.zeros((views, spec.height_px, spec.width_px, 3), np.uint8)
    surface = np.zeros((views, spec.height_px, spec.width_px), np.float16)
    with torch.no_grad():
        for i in range(0, views, 8):
            rgb, depth = model(torch.from_numpy(cams[i : i + 8]).to(device), with_depth=True)
            images[i : i + 8] = (rgb.permute(0, 2, 3, 1).float().cpu().numpy() * 255 + 0.5).astype(np.uint8)
            surface[i : i + 8] = depth[:, 0].float().cpu().numpy().astype(np.float16)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "cameras.npy", cams)
    np.save(folder / "shard_0000.npy", images)
    np.save(folder / "surface_0000.npy", surface)
    meta = {
        "schema": 1, "count": views, "width": spec.width_px, "height": spec.height_px, "fx": spec.fx, "fy": spec.fy,
        "cx": spec.cx, "cy": spec.cy, "dtype": "uint8", "shards": ["shard_0000.npy"], "surfaces": ["surface_0000.npy"],
        "kind": "orbit", "near": spec.near, "far": spec.far, "unbounded": False, "bound": spec.radius,
        "background": [1.0, 1.0, 1.0], "source": "teacher",
    }
    (folder / "distill.json").write_text(json.dumps(meta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("student", type=Path, help="a trained student's folder (student.json + student.safetensors; without the weights: random ones)")
    parser.add_argument("cameras", type=Path, help="a transforms JSON (Blender or nerfstudio) whose cameras the orbit follows")
    parser.add_argument("--views", type=int, default=256)
    parser.add_argument("--time", type=float, default=25.0, help="seconds of training per variant")
    parser.add_argument("--variant", action="append", default=[], help="TAG:KEY=VALUE,KEY=VALUE student options (e.g. b32:batch=32)")
    parser.add_argument("--profile", action="append", default=[], help="list the costliest kernels of this variant's steps")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test of this script")
    opts = parser.parse_args()

    from mg3d.student.model import NeLF, read_spec
    from mg3d.student.synthetic import sphere_occupancy

    opts.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(opts.device)
    if (opts.student / "student.safetensors").is_file():
        trained = NeLF.load(opts.student, device).eval()
    else:  # only the spec: random weights, and for an occupancy student a solid ball half the scene's radius
        trained = NeLF(read_spec(opts.student / "student.json")).to(device).eval()
        if trained.spec.occupancy:
            r = trained.spec.occupancy  # the cells whose centre lies within 0.5 of the centre
            trained.detail.set_occupancy(torch.from_numpy(sphere_occupancy(((np.zeros(3), 0.5 - 1.0 / r),), r)).to(device))
    frames = json.loads(opts.cameras.read_text())["frames"]
    c2w_train = np.asarray([f["transform_matrix"] for f in frames], np.float64)
    with tempfile.TemporaryDirectory() as folder:  # the pseudo views and checkpoints go when it ends
        results = run(trained, c2w_train, opts, Path(folder), device)
    (opts.out / "train_speed.json").write_text(json.dumps({"gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "views": opts.views, "results": results}, indent=1))


def run(trained, c2w_train: np.ndarray, opts: argparse.Namespace, tmp: Path, device: torch.device) -> dict:
    """Pseudo views of ``trained`` in ``tmp``, then each variant's training throughput (and profile)."""
    import yaml

    from mg3d.student import StudentConfig
    from mg3d.student.distill import PseudoData
    from mg3d.student.model import NeLF
    from mg3d.student.train import train

    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    fake_distill(trained, c2w_train, opts.views, tmp / "distill", device)
    print(f"pseudo data: {opts.views} views in {time.perf_counter() - t0:.1f} s", flush=True)
    data = PseudoData(tmp / "distill")
    fields = {k: v for k, v in asdict(trained.spec).items() if k in StudentConfig.__dataclass_fields__}
    base = StudentConfig(**fields, steps=10**7, finetune_fraction=0.0, checkpoint_every=10**7, eval_views=1)
    results = {}
    for item in opts.variant or ["b8:batch=8"]:
        tag, _, sets = item.partition(":")
        values = {k: v if k == "compile" else yaml.safe_load(v) for k, v in (p.split("=", 1) for p in sets.split(",") if p)}  # YAML reads "on" as true
        config = replace(base, max_time_s=opts.time, **values)
        model = NeLF(trained.spec).to(device)
        if trained.spec.occupancy:
            model.detail.set_occupancy(trained.detail.occupied)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        metrics = train(model, data, None, config, tmp / f"ck_{tag}", tag, device)
        metrics["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None
        results[tag] = {"options": values, **metrics}
        print(tag, json.dumps(results[tag]), flush=True)
        if tag in opts.profile:
            from torch.autograd import DeviceType
            from torch.profiler import ProfilerActivity, profile

            steps = 30 if cuda else 2
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
                t = time.perf_counter()
                train(model, data, None, replace(config, max_time_s=0.0, steps=steps, warmup=1), tmp / f"ck_{tag}_p", tag + "p", device)
                if cuda:
                    torch.cuda.synchronize()
                wall = time.perf_counter() - t
            table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=30, max_name_column_width=60)
            kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]  # the kernels, not the ops that launch them
            busy = sum(e.self_device_time_total for e in kernels) / 1000 / steps
            # both figures include the run's setup (data to the GPU, the march of every view), spread over the steps
            summary = f"{tag}: {steps} steps, wall {1000 * wall / steps:.1f} ms/step (profiled)" + (f", GPU busy {busy:.1f} ms/step, {len(kernels)} kernel kinds" if cuda else "")
            print(summary, flush=True)
            print(table, flush=True)
            (opts.out / f"profile_{tag}.txt").write_text(summary + "\n" + table)
    return results


if __name__ == "__main__":
    main()
