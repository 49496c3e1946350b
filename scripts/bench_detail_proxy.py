"""Can a student learn detail finer than its ray grid? Plain vs surface-detail students on synthetic textured
spheres with exact depth (:mod:`mg3d.student.synthetic`), trained for the same time with the real training
code, scored on held-out views against the truth and against the bound of a perfect low-resolution image.

    python scripts/bench_detail_proxy.py --detail 0 --seconds 150            # the plain x8 student
    python scripts/bench_detail_proxy.py --detail 4 --seconds 150            # + surface detail
    python scripts/bench_detail_proxy.py --detail 4 --scene five --depth-weight 1.0

Prints one JSON line: test PSNR, the bicubic bound, steps, images/s, the share of the squared error within
2 px of a depth edge, and for detail students the depth error and the PSNR when the planes are read at the
true depth instead of the predicted one (how much of the loss is the depth's).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detail", type=int, default=0)
    parser.add_argument("--detail-resolution", type=int, default=256)
    parser.add_argument("--depth-weight", type=float, default=0.1)
    parser.add_argument("--occupancy", type=int, default=0, help="march each pixel's ray through an exact occupancy grid of this many cells per side (0: none)")
    parser.add_argument("--march-steps", type=int, default=128, help="steps of that march over the sample range")
    parser.add_argument("--march-box", action="store_true", help="those steps over each ray's chord through the occupied cells' box instead")
    parser.add_argument("--detail-lines", action="store_true", help="feature lines times the texture planes (TensoRF's vector-matrix form)")
    parser.add_argument("--scene", choices=["one", "five"], default="one")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--views", type=int, default=600)
    parser.add_argument("--seconds", type=float, default=150)
    parser.add_argument("--steps", type=int, default=0, help="stop after this many steps instead (0: only the time limit)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1)
    opts = parser.parse_args()

    import torch
    from PIL import Image

    from mg3d.student import StudentConfig
    from mg3d.student.distill import PseudoData
    from mg3d.student.model import NeLF, StudentSpec
    from mg3d.student.synthetic import FAR, FIVE, NEAR, ONE, sphere_occupancy, textured_spheres
    from mg3d.student.train import train

    torch.set_num_threads(opts.threads)
    spheres = ONE if opts.scene == "one" else FIVE
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "data"
        textured_spheres(folder, opts.views, opts.size, seed=0, spheres=spheres)
        data = PseudoData(folder)
        fx, half = data.meta["fx"], opts.size / 2
        spec = StudentSpec(width_px=opts.size, height_px=opts.size, fx=fx, fy=fx, cx=half, cy=half, near=NEAR, far=FAR, radius=1.0, depth=4, width=64,
                           sr_factor=8, detail=opts.detail, detail_resolution=opts.detail_resolution, occupancy=opts.occupancy,
                           march_steps=opts.march_steps, march_box=opts.march_box, detail_lines=opts.detail_lines)
        torch.manual_seed(0)
        model = NeLF(spec)
        if opts.occupancy:  # the exact grid (mg3d student bakes it from the teacher)
            model.detail.set_occupancy(torch.from_numpy(sphere_occupancy(spheres, opts.occupancy)))
        config = StudentConfig(depth=4, width=64, detail=opts.detail, steps=opts.steps or 10**7, max_time_s=0 if opts.steps else opts.seconds, batch=8, lr=opts.lr, warmup=50,
                               finetune_fraction=0, checkpoint_every=10**7, device="cpu", depth_weight=opts.depth_weight)
        metrics = train(model, data, None, config, Path(tmp) / "run", "proxy", torch.device("cpu"))
        truth, c2w = textured_spheres(Path(tmp) / "test", 16, opts.size, seed=1, spheres=spheres)
        surface = np.load(Path(tmp) / "test" / "surface_0000.npy").astype(np.float32)  # 0: no surface
    model.eval()
    hit = surface > 0
    with torch.no_grad():
        pred, depth = model(torch.from_numpy(c2w), with_depth=True)
        pred = pred.permute(0, 2, 3, 1).numpy()
        if depth is not None:  # the planes read at the true surface (the far end where a pixel has none)
            true = torch.from_numpy(np.where(hit, surface, FAR))[:, None]
            pred_true = model(torch.from_numpy(c2w), surface=true).permute(0, 2, 3, 1).numpy()
    jump = np.where(hit, surface, 2 * FAR)  # depth edges: neighbours 0.1 or more apart (a miss is far behind)
    edge = np.zeros(hit.shape, bool)
    rows, cols = np.abs(np.diff(jump, axis=1)) > 0.1, np.abs(np.diff(jump, axis=2)) > 0.1
    edge[:, 1:] |= rows
    edge[:, :-1] |= rows
    edge[:, :, 1:] |= cols
    edge[:, :, :-1] |= cols
    edge = torch.nn.functional.max_pool2d(torch.from_numpy(edge).float()[:, None], 3, 1, 1)[:, 0].numpy() > 0  # within 2 px
    error = ((pred - truth) ** 2).mean(-1)
    grid = opts.size // 8

    def bound(image: np.ndarray) -> np.ndarray:  # a perfect ray-grid image, upsampled
        low = Image.fromarray((image * 255).round().astype(np.uint8)).resize((grid, grid), Image.BOX).resize((opts.size, opts.size), Image.BICUBIC)
        return np.asarray(low).astype(np.float32) / 255

    psnr = lambda a, b: float(np.mean([-10 * np.log10(np.mean((x - y) ** 2)) for x, y in zip(a, b)]))  # noqa: E731
    print(json.dumps({"scene": opts.scene, "detail": opts.detail, "detail_resolution": opts.detail_resolution, "depth_weight": opts.depth_weight, "occupancy": opts.occupancy, "march_steps": opts.march_steps, "march_box": opts.march_box,
                      "steps": metrics["steps"], "images_per_s": metrics["images_per_s"], "test_psnr": round(psnr(pred, truth), 2),
                      "bicubic_bound": round(psnr([bound(t) for t in truth], truth), 2),
                      "edge_pixels": round(float(edge.mean()), 3), "edge_error_share": round(float(error[edge].sum() / error.sum()), 3),
                      **({"depth_mae": round(float(np.abs(depth[:, 0].numpy() - surface)[hit].mean()), 4),
                          "test_psnr_true_depth": round(psnr(pred_true, truth), 2)} if depth is not None else {})}))


if __name__ == "__main__":
    main()
